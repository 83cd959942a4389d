"""Anti-Backdoor Learning: Li, Lyu, Koren, Lyu, Li and Ma, "Anti-Backdoor Learning: Training Clean Models
on Poisoned Data" (NeurIPS 2021)."""

from __future__ import annotations

import copy
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_range
from poisonlab.data.imageset import ImageSet
from poisonlab.defenses._bb_common import batches, device_of
from poisonlab.defenses._repair import finetune_augment, loop_bf16
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.training.checkpoint import (
    Checkpoint,
    StaleProgress,
    check_int,
    fingerprint,
    layer_shapes,
    restore_training_state,
    training_state,
)
from poisonlab.training.device import autocast
from poisonlab.training.loop import TrainConfig, fit, predict_logits
from poisonlab.training.progress import progress_counter

ASCENTS = ("lga", "flooding")
SCHEDULES = ("step", "cosine")


def ascent_loss(loss: torch.Tensor, gamma: float, kind: str = "lga") -> torch.Tensor:
    """ABL's isolation objective on a batch's mean loss ``L``.

    ``"lga"`` (local gradient ascent, the paper): ``sign(L - gamma) * L``, i.e. descend while the loss
    is above ``gamma`` and ascend below it, so samples learnt too fast (backdoored ones) stand out;
    ``"flooding"`` (BackdoorBench's default): ``|L - gamma| + gamma``, the same gradient direction.
    """
    if kind == "lga":
        return torch.sign(loss.detach() - gamma) * loss
    return (loss - gamma).abs() + gamma


def reinitialised_copy(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised (``reset_parameters``), for training from scratch.

    A model with data-dependent initialisation (fastnet's whitened stem) is re-initialised from
    ``sample`` (float NCHW in [0, 1]).
    """
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if m is not fresh and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    if callable(getattr(fresh, "data_init", None)):
        fresh.data_init(sample)
    return fresh


def _sgd(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                           weight_decay=weight_decay, nesterov=True)


def per_sample_loss(model: nn.Module, data: ImageSet) -> np.ndarray:
    """Cross-entropy of every sample of ``data`` under ``model`` (eval mode)."""
    logits = predict_logits(model, data)
    return F.cross_entropy(logits, torch.from_numpy(data.labels), reduction="none").numpy()


class Isolation(NamedTuple):
    """What ABL's isolation phase hands on."""

    losses: np.ndarray  # every training sample's loss after the isolation epochs
    last_loss: float  # the last batch's mean loss (near gamma when LGA / flooding works)
    seconds: float  # of every isolation epoch and the loss pass, those of a stopped earlier run included
    resumed: bool  # whether it continued a stopped run's progress file


@DEFENSES.register("abl")
class ABL(Defense):
    """Anti-backdoor learning, ABL (Li et al., NeurIPS 2021): train a clean model on the poisoned data.

    Input: ``ctx.train`` (the poisoned set; no clean data is needed) and ``ctx.model`` (only its
    architecture: ABL trains from scratch). Steps, each on a re-initialised copy of the model:

    1. Isolation: ``isolation_epochs`` of training with the local-gradient-ascent loss
       (:func:`ascent_loss`, ``gamma``), which keeps the loss of normal samples near ``gamma`` while
       backdoored samples, learnt much faster, drop far below it.
    2. The ``isolation_ratio`` of samples with the lowest loss are isolated as suspected poison.
    3. The model keeps training on the other samples for ``finetune_epochs``.
    4. Unlearning: ``unlearning_epochs`` of gradient ASCENT on the isolated samples only.

    Output: the final model. ``det_*`` metrics compare the isolated samples with the true poison
    (ground truth, for measurement only). The isolation and unlearning phases run in their own loop
    (their loss is not a normal training loss); step 3 is :func:`poisonlab.training.fit`.

    Settings: the paper's gamma 0.5, 1% isolated, LGA, unlearning lr 5e-4; BackdoorBench's SGD
    (momentum 0.9, Nesterov, weight decay 1e-4), lr 0.01, batch 256 and "flooding" loss. The paper
    isolates after 20 epochs; BackdoorBench runs 20 isolation, 60 fine-tuning (lr 0.01, then 0.001
    after epoch 40: ``finetune_schedule="step"``, a tenth after two thirds of the epochs) and 20
    unlearning epochs (its code unlearns at 1e-4); the CPU defaults are 5, 10 and 5. As the paper's
    code and BackdoorBench, the isolation sees the images as they are and the fine-tuning batches
    are augmented (``augment``: random crop and, on colour images, flip, as every fine-tune here,
    :func:`~poisonlab.defenses._repair.finetune_augment`; the paper's code adds a 3-pixel cutout).
    The unlearning batches are not augmented, as in the paper's code (BackdoorBench augments them,
    at its lower unlearning lr 1e-4). On the BadNets MNIST slice of the tests, ABL left ASR 0.67 with
    both phases augmented, 0.04 with the fine-tuning alone augmented and 0.004 with neither. Every
    phase runs under bfloat16 autocast where training does (:func:`~poisonlab.defenses._repair.loop_bf16`:
    32x32 images on a CPU with bf16 units, CUDA); before 2026-12-05 the isolation and unlearning loops
    ran in float32.

    Resuming: with ``ctx.progress_dir`` set, the isolation and the fine-tuning save their progress
    after every epoch (:mod:`poisonlab.training.checkpoint`) and a stopped run continues from there
    to the same model. ABL with BackdoorBench's 100 epochs takes about 3 hours on CIFAR-10 on a
    2-core CPU: more than one sitting.

    Args:
        isolation_ratio: share of the training set isolated, (0, 0.5].
        gamma: LGA / flooding level, (0, 10].
        ascent: ``"lga"`` (paper) or ``"flooding"`` (BackdoorBench).
        isolation_epochs: [1, 10000]; finetune_epochs: [0, 10000]; unlearning_epochs: [0, 10000].
        lr: learning rate of isolation and fine-tuning, (0, 10]; lr_unlearning: (0, 10].
        batch_size: mini-batch size; weight_decay: of every phase, [0, 1].
        finetune_schedule: ``"step"`` (BackdoorBench) or ``"cosine"`` (decay to 0).
        augment: augment the fine-tuning batches (the paper's code, BackdoorBench) or not.
    """

    kind = "training"
    retrains = True

    def __init__(self, isolation_ratio: float = 0.01, gamma: float = 0.5, ascent: str = "lga",
                 isolation_epochs: int = 5, finetune_epochs: int = 10, unlearning_epochs: int = 5, lr: float = 0.01,
                 lr_unlearning: float = 5e-4, batch_size: int = 256, weight_decay: float = 1e-4,
                 finetune_schedule: str = "step", augment: bool = True):
        self.isolation_ratio = float(check_range(isolation_ratio, "isolation_ratio", 0, 0.5, lo_open=True))
        self.gamma = float(check_range(gamma, "gamma", 0, 10, lo_open=True))
        self.ascent = check_choice(ascent, "ascent", ASCENTS)
        self.isolation_epochs = int(check_range(isolation_epochs, "isolation_epochs", 1, 10_000))
        self.finetune_epochs = int(check_range(finetune_epochs, "finetune_epochs", 0, 10_000))
        self.unlearning_epochs = int(check_range(unlearning_epochs, "unlearning_epochs", 0, 10_000))
        self.lr = float(check_range(lr, "lr", 0, 10, lo_open=True))
        self.lr_unlearning = float(check_range(lr_unlearning, "lr_unlearning", 0, 10, lo_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        self.weight_decay = float(check_range(weight_decay, "weight_decay", 0, 1))
        self.finetune_schedule = check_choice(finetune_schedule, "finetune_schedule", SCHEDULES)
        if not isinstance(augment, bool):
            raise ParameterError(f"augment must be true or false, got {augment!r}")
        self.augment = augment

    def run(self, ctx: DefenseContext) -> DefenseResult:
        from poisonlab.metrics import detection_metrics

        train = ctx.train
        device = device_of(ctx.model)
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            sample = torch.randperm(len(train), generator=gen)[:5000]
            model = reinitialised_copy(ctx.model, train.subset(sample.numpy()).float_tensor(device))
        folder = ctx.progress_dir
        isolation = Checkpoint(folder / "abl_isolation.pt" if folder else None,
                               fingerprint(self.params(), layer_shapes(model), ctx.seed, train.images, train.labels))

        # 1-2. isolation epochs, then the share of samples with the lowest loss
        iso = self.isolate(model, train, gen, device, isolation, ctx.progress)
        losses = iso.losses
        k = max(1, int(len(train) * self.isolation_ratio))
        order = np.argsort(losses, kind="stable")
        isolated = np.sort(order[:k])
        rest = np.sort(order[k:])

        # 3. training goes on without them (fit's progress file: a stopped run continues)
        history: list[dict] = []
        if self.finetune_epochs:
            cfg = TrainConfig(epochs=self.finetune_epochs, batch_size=min(self.batch_size, len(rest)), lr=self.lr,
                              weight_decay=self.weight_decay, schedule=self.finetune_schedule, warmup_fraction=0.0,
                              step_milestones=(2 / 3,), step_factor=0.1,
                              **(finetune_augment(train) if self.augment else {}))
            history = fit(model, train.subset(rest), cfg, seed=ctx.seed, progress=ctx.progress,
                          description="abl fine-tune", checkpoint=folder / "abl_finetune.pt" if folder else None)

        # 4. unlearning: gradient ASCENT on the isolated samples
        t2 = time.perf_counter()
        opt = _sgd(model, self.lr_unlearning, self.weight_decay)
        model.train()
        bf16 = loop_bf16(model, train)
        for x, y in batches(train.subset(isolated), self.batch_size, self.unlearning_epochs, gen, device):
            with autocast(bf16, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            opt.step()
        model.eval()

        flagged = np.zeros(len(train), dtype=bool)
        flagged[isolated] = True
        # seconds of every epoch, those run before a resume included
        metrics = {"n_isolated": int(k), "isolation_loss": iso.last_loss, "isolation_seconds": iso.seconds,
                   "finetune_seconds": float(sum(r["seconds"] for r in history)),
                   "unlearning_seconds": time.perf_counter() - t2}
        if ctx.poisoning is not None:  # ground truth: measurement only
            metrics.update(detection_metrics(ctx.poisoning.poison_mask(len(train)), flagged, -losses))
        total = iso.seconds + metrics["finetune_seconds"] + metrics["unlearning_seconds"]
        return DefenseResult(model=model, metrics=metrics | {"resumed": iso.resumed},
                             seconds=total if iso.resumed else None)

    def isolate(self, model: nn.Module, train: ImageSet, gen: torch.Generator, device: torch.device,
                progress: Checkpoint, show: bool = False) -> Isolation:
        """Steps 1-2: ``isolation_epochs`` of the ascent loss on ``model`` (in place), then every sample's loss.

        Progress is saved to ``progress`` after every epoch and at the end (with the losses); a run that
        finds it continues from there.
        """
        opt = _sgd(model, self.lr, self.weight_decay)
        done, last, seconds, losses = _resume_isolation(progress, model, opt, gen, self.isolation_epochs, len(train))
        resumed = done > 0
        bar = progress_counter(show, "abl isolation", self.isolation_epochs, done=done)
        bf16 = loop_bf16(model, train)
        while done < self.isolation_epochs:
            t0 = time.perf_counter()
            model.train()
            for x, y in batches(train, self.batch_size, 1, gen, device):
                with autocast(bf16, device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                ascent_loss(loss, self.gamma, self.ascent).backward()
                opt.step()
                last = float(loss.detach())
            seconds += time.perf_counter() - t0
            done += 1
            progress.save({**training_state(model, [opt], gen), "epoch": done, "last": last, "seconds": seconds})
            bar.advance(f"loss {last:.3f}")
        bar.stop()
        if losses is None:
            t0 = time.perf_counter()
            losses = per_sample_loss(model, train)
            seconds += time.perf_counter() - t0
            progress.save({**training_state(model, [opt], gen), "epoch": done, "last": last, "seconds": seconds,
                           "losses": torch.from_numpy(losses)})
        return Isolation(losses, last, seconds, resumed)


def _resume_isolation(progress: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                      epochs: int, n: int) -> tuple[int, float, float, np.ndarray | None]:
    """``(epochs done, last loss, seconds, losses or None)`` from an isolation progress file, restored into
    ``model``, ``opt`` and ``gen``; ``(0, 0.0, 0.0, None)`` when there is none or it does not fit."""
    def restore(state: dict) -> tuple[int, float, float, np.ndarray | None]:
        done = check_int(state.get("epoch"), "epoch", 1, epochs)
        last, seconds, losses = state.get("last"), state.get("seconds"), state.get("losses")
        if not isinstance(last, float) or not isinstance(seconds, float) or seconds < 0:
            raise StaleProgress("last and seconds must be numbers")
        if losses is not None and (not isinstance(losses, torch.Tensor) or losses.shape != (n,)
                                   or not losses.is_floating_point() or not bool(torch.isfinite(losses).all())):
            raise StaleProgress(f"losses must be {n} finite numbers")
        restore_training_state(state, model, [opt], gen)
        return done, last, seconds, (losses.numpy() if losses is not None and done == epochs else None)

    return progress.resume(restore) or (0, 0.0, 0.0, None)
