"""Neural Attention Distillation: Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks" (ICLR 2021)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from poisonlab.validate import check_range
from poisonlab.defenses._bb_common import StageTap, batches, device_of
from poisonlab.defenses._repair import MIN_CLEAN_PER_CLASS, finetune_copy, loop_bf16, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.errors import ParameterError
from poisonlab.training.device import autocast


def attention_map(features: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Zagoruyko and Komodakis's attention map: ``sum_c |f_c|^p`` per position, L2-normalised per image.

    ``features`` (N, C, H, W) -> (N, 1, H, W).
    """
    am = features.abs().pow(p).sum(1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (NAD's distillation loss at one layer)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


@DEFENSES.register("nad")
class NAD(Defense):
    """Neural attention distillation (Li et al., ICLR 2021).

    Input: ``ctx.model`` and the trusted ``ctx.clean_set`` (``clean_fraction``, BackdoorBench 5%).
    1. Teacher: a copy of the poisoned model fine-tuned on the clean set for ``teacher_epochs``
       (SGD, cosine decay, as ``finetune``).
    2. Student: another copy of the poisoned model trained on the clean set for ``epochs`` with
       cross-entropy plus ``betas[i]`` x the attention-map distance to the teacher at the outputs
       of the network's last ``len(betas)`` stages (:class:`StageTap`: the last feature map at each
       resolution, found from the model's modules, e.g. ResNet-18's layer2-4 as in the paper).
       A network with fewer stages uses the deepest betas.
    Output: the student.

    Defaults are BackdoorBench's: 10 + 10 epochs, lr 0.01 (the student keeps it constant: its
    schedule only drops after epoch 20), betas 500 / 1000 / 1000 from the shallowest stage, p 2,
    momentum 0.9, weight decay 5e-4, batch 256. The authors' code starts at lr 0.1 for two epochs;
    BackdoorBench's PreAct-ResNet18 port taps layer3, layer4 and the pooled output (a 1x1 map, whose
    attention term is always 0). Like BackdoorBench, teacher and student see the clean set
    augmented (random crop, flip on colour images; as every fine-tune here). The distillation only
    helps if the fine-tuned teacher has lost most of the backdoor: with a teacher that keeps it,
    raise ``lr``. Teacher and student run under bfloat16 autocast where training does
    (:func:`~poisonlab.defenses._repair.loop_bf16`); before 2026-12-05 the student's loop ran in float32.

    Args:
        teacher_epochs: fine-tuning epochs of the teacher, [1, 10000].
        epochs: distillation epochs of the student, [1, 10000].
        lr: learning rate of both, (0, 10].
        batch_size: mini-batch size (capped at the clean set's size).
        betas: weight of each stage's attention loss, shallowest first, 1 to 8 values >= 0.
        p: power of the attention map, (0, 8].
        weight_decay: of the student's SGD.
    """

    kind = "repair"
    min_clean_per_class = MIN_CLEAN_PER_CLASS
    retrains = False

    def __init__(self, teacher_epochs: int = 10, epochs: int = 10, lr: float = 0.01, batch_size: int = 256,
                 betas: Sequence[float] = (500.0, 1000.0, 1000.0), p: float = 2.0, weight_decay: float = 5e-4):
        self.teacher_epochs = int(check_range(teacher_epochs, "teacher_epochs", 1, 10_000))
        self.epochs = int(check_range(epochs, "epochs", 1, 10_000))
        self.lr = float(check_range(lr, "lr", 0, 10, lo_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or not 1 <= len(betas) <= 8:
            raise ParameterError(f"betas must be a list of 1 to 8 non-negative weights, got {betas!r}")
        self.betas = [float(check_range(b, "betas[]", 0, 1e6)) for b in betas]
        self.p = float(check_range(p, "p", 0, 8, lo_open=True))
        self.weight_decay = float(check_range(weight_decay, "weight_decay", 0, 1))

    def run(self, ctx: DefenseContext) -> DefenseResult:
        who = self.registry_name or "nad"
        clean = require_clean_set(ctx, who)
        device = device_of(ctx.model)
        teacher, hist = finetune_copy(ctx.model, clean, epochs=self.teacher_epochs, lr=self.lr,
                                      batch_size=self.batch_size, seed=ctx.seed, progress=ctx.progress,
                                      description="nad teacher")
        teacher.eval()
        student = copy.deepcopy(ctx.model)
        bf16 = loop_bf16(student, clean)
        with autocast(bf16, device):  # the stage probe too: nothing here runs in another precision
            tap = StageTap(student, clean.float_tensor(device)[:2], len(self.betas), who)
        betas = self.betas[-len(tap.positions):]
        opt = torch.optim.SGD([q for q in student.parameters() if q.requires_grad], lr=self.lr, momentum=0.9,
                              weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(ctx.seed)
        ce_sum = at_sum = 0.0
        n = 0
        student.train()
        for x, y in batches(clean, self.batch_size, self.epochs, gen, device, augment=True):
            with autocast(bf16, device):  # the losses below are taken in float32
                logits, s_maps = tap.forward(student, x)
                with torch.no_grad():
                    _, t_maps = tap.forward(teacher, x)
            ce = F.cross_entropy(logits.float(), y)
            at = sum(b * attention_loss(s.float(), t.float(), self.p) for b, s, t in zip(betas, s_maps, t_maps))
            opt.zero_grad(set_to_none=True)
            (ce + at).backward()
            opt.step()
            ce_sum, at_sum, n = ce_sum + float(ce.detach()), at_sum + float(at.detach()), n + 1
        student.eval()
        return DefenseResult(model=student, metrics={
            "n_finetune": len(clean), "teacher_loss": hist[-1]["loss"], "student_ce": ce_sum / max(1, n),
            "student_attention_loss": at_sum / max(1, n), "attention_stages": [list(s) for s in tap.shapes],
            "betas_used": betas})
