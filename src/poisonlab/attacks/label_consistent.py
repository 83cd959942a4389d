"""Label-consistent backdoor: Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks" (2019).

Target-class training images are first made hard to classify with an L-inf
PGD perturbation from an adversarially trained surrogate model (so that a model
cannot fit them from their natural features and leans on the trigger instead),
then a corner trigger is stamped on them. Labels are never changed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger, sample_from_class
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_range, check_rate
from poisonlab.training.device import autocast

CORNER_SETS = ("all", "bottom-right")


CORNER_PATTERNS = ("checkerboard", "turner")

# Turner et al.'s released 3x3 bottom-right pattern, rows top to bottom (+1 whitens, -1 blackens); it is
# not a perfect checkerboard (its top-left pixel is black)
_TURNER = np.array([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.float32)


@dataclass
class CornerPatternTrigger(Trigger):
    """A ``size`` x ``size`` black-and-white pattern in one or all four corners.

    Each trigger pixel is pushed towards its pattern value: ``x + amplitude * 255``
    on white squares, ``x - amplitude * 255`` on black ones, clipped; with
    ``amplitude=1`` the pixels become exactly white/black (Turner et al.'s
    full-amplitude trigger), smaller values give their reduced-amplitude trigger
    (the paper tries 16/255, 32/255 and 64/255; its released code adds
    ``+-amplitude * 255`` and clips, as here).

    ``pattern="checkerboard"``: a checkerboard of any ``size``; with ``corners="all"`` the
    other corners are mirror images of the bottom-right one, so a horizontal flip maps
    the trigger onto itself. ``pattern="turner"``: the released code's 3x3 pattern
    (``size`` must be 3) laid out as its ``"all-corners"`` trigger: the right-hand
    corners carry the bottom-right pattern, the left-hand corners its left-right mirror
    (so it is flip-invariant too), the top corners the same as the bottom ones.
    """

    size: int = 3
    amplitude: float = 1.0
    corners: str = "all"
    pattern: str = "checkerboard"

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        h, w, _ = shape
        if self.pattern == "turner" and self.size != 3:
            raise ParameterError(f"trigger pattern='turner' is Turner et al.'s 3x3 pattern: size must be 3, "
                                 f"got {self.size}")
        need = 2 * self.size if self.corners == "all" else self.size
        if need > min(h, w):
            raise ParameterError(f"trigger size={self.size} in corners={self.corners!r} does not fit in {h}x{w} "
                                 f"images (needs {need} pixels per side)")

    def signs(self, shape: tuple[int, int, int]) -> np.ndarray:
        """``(H, W, 1)`` array: +1 where the trigger whitens, -1 where it blackens, 0 elsewhere."""
        h, w, _ = shape
        s = self.size
        out = np.zeros((h, w), dtype=np.float32)
        if self.pattern == "turner":
            board = _TURNER
            out[h - s:, w - s:] = board
            if self.corners == "all":
                out[:s, w - s:] = board
                out[h - s:, :s] = board[:, ::-1]
                out[:s, :s] = board[:, ::-1]
            return out[..., None]
        board = np.where((np.add.outer(np.arange(s), np.arange(s)) % 2) == 0, 1.0, -1.0)
        out[h - s:, w - s:] = board
        if self.corners == "all":
            out[h - s:, :s] = board[:, ::-1]
            out[:s, w - s:] = board[::-1, :]
            out[:s, :s] = board[::-1, ::-1]
        return out[..., None]

    def apply(self, images: np.ndarray) -> np.ndarray:
        self.check_fits(images.shape[1:])
        x = images.astype(np.float32) + np.float32(self.amplitude * 255) * self.signs(images.shape[1:])
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float,
             random_start: bool = True, generator: torch.Generator | None = None,
             batch_size: int = 500, bf16: bool = False) -> torch.Tensor:
    """Untargeted L-inf PGD (Madry et al. 2018): maximise the cross-entropy of ``y``.

    Args:
        model: classifier taking float NCHW in [0, 1]; used in eval mode, its weights are not changed.
        x: float NCHW images in [0, 1]; y: their labels.
        eps: L-inf radius in [0, 1] units; steps, step_size: PGD iterations and step (signed gradient).
        random_start: start from a uniform point of the eps-ball.
        bf16: run the model under bfloat16 autocast (the loss and the step stay float32).

    Returns:
        The perturbed images (same shape, in [0, 1], within ``eps`` of ``x``), computed in batches.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        # channels_last is the faster convolution layout on CPU (and what fit() trains in)
        xb = x[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        yb = y[i:i + batch_size].to(device)
        if random_start and eps > 0:
            noise = torch.rand(xb.shape, generator=generator).to(device)
            delta = ((noise * 2 - 1) * eps)
            delta = (xb + delta).clamp(0, 1) - xb
        else:
            delta = torch.zeros_like(xb)
        for _ in range(steps if eps > 0 else 0):
            delta.requires_grad_(True)
            with autocast(bf16, device):
                logits = model(xb + delta)
            loss = F.cross_entropy(logits.float(), yb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)  # gradient w.r.t. the input only, not the weights
            with torch.no_grad():
                delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
                delta = (xb + delta).clamp(0, 1) - xb
        out.append((xb + delta.detach()).cpu())
    return torch.cat(out) if out else x.clone()


def pgd_batch_transform(eps: float, steps: int, step_size: float, bf16: bool = False,
                        generator: torch.Generator | None = None) -> Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                                                              torch.Tensor]:
    """A :func:`~poisonlab.training.fit` ``batch_transform`` for PGD adversarial training (Madry et al. 2018).

    Every training batch is replaced by its untargeted L-inf PGD examples (random start, ``steps`` signed
    steps of ``step_size`` within ``eps``) against the model being trained. The attack runs with the
    model in eval mode (batch-norm running statistics, none updated), as TRADES' reference code does;
    every module's train/eval mode is restored afterwards.
    """

    def transform(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modes = [m.training for m in model.modules()]
        adv = pgd_linf(model, x, y, eps, steps, step_size, True, generator, batch_size=len(x), bf16=bf16)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        return adv.to(x.device)

    return transform


def fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised (the same architecture, trained from scratch)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()  # batch norms also reset their running statistics
    flag = getattr(m, "data_initialised", None)
    if isinstance(flag, torch.Tensor):  # fastnet's data-dependent stem is set again from the new data
        flag.fill_(False)
    return m


@dataclass
class AdversarialSurrogate:
    """How the label-consistent attack's surrogate was adversarially trained."""

    init: str
    epochs: int
    eps: float
    steps: int
    step_size: float
    seconds: float
    adversarial_train_acc: float


def adversarially_trained(template: nn.Module, train: ImageSet, epochs: int, eps: float, steps: int,
                          step_size: float, lr: float, seed: int, from_scratch: bool = True,
                          bf16: bool | None = None) -> tuple[nn.Module, AdversarialSurrogate]:
    """PGD adversarial training (Madry et al. 2018) of ``template``'s architecture on ``train``.

    ``from_scratch`` re-initialises the weights (:func:`fresh_copy`), as Madry et al.'s robust model that
    Turner et al. perturb with; otherwise a copy of ``template`` is adversarially fine-tuned (cheaper).
    The recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle rate peaking at ``lr``,
    batches of 512 (fewer on small sets, so that an epoch has at least 50 steps), random crops of 1/8
    of the side and flips; bf16 autocast where :func:`poisonlab.training.use_bf16` says so
    (``bf16=None``). Deterministic for ``seed``.

    Returns:
        The trained model (eval mode) and an :class:`AdversarialSurrogate` with the seconds it took.
    """
    from poisonlab.training import TrainConfig, fit
    from poisonlab.training.device import use_bf16

    dev = next(template.parameters()).device
    h = train.shape[0]
    bf16 = use_bf16("auto" if bf16 is None else bf16, dev, h)
    cfg = TrainConfig(epochs=epochs, batch_size=max(1, min(512, len(train) // 50)), lr=lr,
                      crop_padding=max(1, round(h / 8)), flip=True, warmup_fraction=0.15, bf16=bf16)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the re-initialisation draws from the global generator
        model = fresh_copy(template) if from_scratch else copy.deepcopy(template)
        hist = fit(model, train, cfg, seed=seed, batch_transform=pgd_batch_transform(eps, steps, step_size, bf16, gen))
    info = AdversarialSurrogate("scratch" if from_scratch else "clean", epochs, eps, steps, step_size,
                                time.perf_counter() - t0, float(hist[-1]["acc"]))
    return model.eval(), info


SURROGATES = ("adversarial", "adversarial_finetune", "clean")


@ATTACKS.register("label_consistent")
class LabelConsistentBackdoor(Attack):
    """Label-consistent backdoor (Turner, Tsipras and Madry 2019), clean label.

    What goes in: the training set and ``context.clean_model`` (the runner's clean model: the
    architecture, and with ``surrogate="clean"`` or ``"adversarial_finetune"`` the weights, of the
    surrogate). What comes out: ``rate`` of the TARGET-CLASS training images perturbed and stamped
    with a corner trigger, labels unchanged, and a record with the test-time trigger.

    1. Surrogate (``surrogate``): ``"adversarial"`` (default, the paper's choice) trains the clean
       model's architecture from scratch with PGD adversarial training on the clean training set
       (:func:`adversarially_trained`: ``surrogate_epochs`` epochs, ``surrogate_steps`` PGD steps of
       ``surrogate_step_size`` within ``surrogate_eps``); ``"adversarial_finetune"`` adversarially
       fine-tunes a copy of the clean model instead (cheaper); ``"clean"`` uses the clean model as it
       is (the earlier, weaker variant). The seconds the adversarial training took are in
       ``extra["surrogate"]``.
    2. The poisons: untargeted L-inf PGD against the surrogate (``steps`` of ``step_size`` within
       ``eps``, random start), rounded back to uint8 within ``eps``. An adversarially trained model's
       adversarial examples change the image's salient features, which makes the poisons hard to fit
       from their content, so the network leans on the trigger.
    3. The trigger (:class:`CornerPatternTrigger`): ``pattern="turner"`` (default) is the released
       code's 3x3 pattern; ``corners="all"`` its four-corner layout (flip-invariant, the paper's
       improved trigger), ``"bottom-right"`` the first one. ``amplitude`` scales it on the training
       poisons: 1 is the full trigger (pixels set black/white); the paper's reduced-amplitude trigger
       uses 16/255, 32/255 or 64/255 on the training poisons and the full trigger at test time
       (``test_amplitude=1``; its released code can stamp the test set at the reduced amplitude too).

    Budgets and the paper: Turner et al. perturb with Madry et al.'s adversarially trained
    ResNet at eps 8/255 and 16/255 (16/255 gives the higher ASR); our default is 8/255, with
    Madry et al.'s PGD step of 2/255 and 10 steps. The surrogate's adversarial training defaults
    to Madry et al.'s CIFAR-10 attack (7 steps of 2/255 within 8/255) for 10 epochs of the fast
    recipe, far fewer than Madry et al.'s ~200 epochs of a wide ResNet; ``surrogate_epochs`` raises it.

    The work is batched: PGD runs on ``batch_size`` images at a time, no per-image Python loop.
    ``extra`` records the share of poisons the surrogate misclassifies after PGD (``pgd_fooled``)
    and before (``clean_fooled``).

    Args:
        rate: fraction of the target class's training images poisoned, (0, 1].
        target: the target class.
        eps: L-inf budget of the PGD perturbation, [0, 1] (pixel units / 255).
        steps: PGD iterations, >= 0 (0 = trigger only).
        step_size: PGD step, (0, 1].
        random_start: start PGD from a random point of the eps-ball.
        trigger_size: side of each corner pattern, pixels (3 for ``pattern="turner"``).
        amplitude: training-time trigger amplitude, (0, 1].
        test_amplitude: test-time trigger amplitude, (0, 1].
        corners: ``"all"`` or ``"bottom-right"``.
        pattern: ``"turner"`` or ``"checkerboard"`` (any size; fits 8x8 digits with size 2).
        surrogate: ``"adversarial"``, ``"adversarial_finetune"`` or ``"clean"``.
        surrogate_epochs: adversarial-training epochs, [1, 10000].
        surrogate_eps, surrogate_steps, surrogate_step_size: its PGD attack.
        surrogate_lr: its peak learning rate.
        batch_size: PGD batch size.
    """

    family = "clean-label"
    needs_clean_model = True

    def __init__(self, rate: float = 0.5, target: int = 0, eps: float = 8 / 255, steps: int = 10,
                 step_size: float = 2 / 255, random_start: bool = True, trigger_size: int = 3,
                 amplitude: float = 1.0, test_amplitude: float = 1.0, corners: str = "all",
                 pattern: str = "turner", surrogate: str = "adversarial", surrogate_epochs: int = 10,
                 surrogate_eps: float = 8 / 255, surrogate_steps: int = 7, surrogate_step_size: float = 2 / 255,
                 surrogate_lr: float = 0.2, batch_size: int = 500):
        self.rate = check_rate(rate)
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise ParameterError(f"target must be a class index (int), got {target!r}")
        self.target = int(check_range(int(target), "target", 0, 10_000))
        self.eps = float(check_range(eps, "eps", 0, 1))
        self.steps = int(check_range(steps, "steps", 0, 10_000))
        self.step_size = float(check_range(step_size, "step_size", 0, 1, lo_open=True))
        self.random_start = bool(random_start)
        self.trigger_size = int(check_range(trigger_size, "trigger_size", 1, 4096))
        self.amplitude = float(check_range(amplitude, "amplitude", 0, 1, lo_open=True))
        self.test_amplitude = float(check_range(test_amplitude, "test_amplitude", 0, 1, lo_open=True))
        self.corners = check_choice(corners, "corners", CORNER_SETS)
        self.pattern = check_choice(pattern, "pattern", CORNER_PATTERNS)
        if self.pattern == "turner" and self.trigger_size != 3:
            raise ParameterError(f"pattern='turner' is Turner et al.'s 3x3 pattern: trigger_size must be 3, got "
                                 f"{self.trigger_size} (pattern='checkerboard' takes any size)")
        self.surrogate = check_choice(surrogate, "surrogate", SURROGATES)
        self.surrogate_epochs = int(check_range(surrogate_epochs, "surrogate_epochs", 1, 10_000))
        self.surrogate_eps = float(check_range(surrogate_eps, "surrogate_eps", 0, 1))
        self.surrogate_steps = int(check_range(surrogate_steps, "surrogate_steps", 1, 10_000))
        self.surrogate_step_size = float(check_range(surrogate_step_size, "surrogate_step_size", 0, 1,
                                                     lo_open=True))
        self.surrogate_lr = float(check_range(surrogate_lr, "surrogate_lr", 0, 100, lo_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 1_000_000))
        self.train_trigger = CornerPatternTrigger(self.trigger_size, self.amplitude, self.corners, self.pattern)
        self.trigger = CornerPatternTrigger(self.trigger_size, self.test_amplitude, self.corners, self.pattern)

    def _pool_size(self, train: ImageSet) -> int:
        return int((train.labels == self.target).sum())

    def _surrogate(self, train: ImageSet, rng: np.random.Generator,
                   context: AttackContext) -> tuple[nn.Module, dict | None]:
        if self.surrogate == "clean":
            return context.clean_model, None
        model, info = adversarially_trained(context.clean_model, train, self.surrogate_epochs, self.surrogate_eps,
                                            self.surrogate_steps, self.surrogate_step_size, self.surrogate_lr,
                                            int(rng.integers(2 ** 31)), from_scratch=self.surrogate == "adversarial")
        return model, asdict(info)

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        from poisonlab.data.imageset import to_uint8_nhwc
        from poisonlab.training import predict_proba

        idx = sample_from_class(train, self.target, self.rate, rng, self.registry_name)
        model, surrogate_info = self._surrogate(train, rng, context)
        x8 = torch.from_numpy(np.ascontiguousarray(train.images[idx])).permute(0, 3, 1, 2)
        x = x8.float().div(255)
        y = torch.from_numpy(train.labels[idx])
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        adv = pgd_linf(model, x, y, self.eps, self.steps, self.step_size, self.random_start, gen, self.batch_size)
        # rounding to uint8 may add half a grey level: clip so the stored poison stays inside the eps-ball
        e = int(np.floor(self.eps * 255 + 1e-6))
        clean = train.images[idx].astype(np.int16)
        adv8 = np.clip(to_uint8_nhwc(adv).astype(np.int16), clean - e, clean + e).astype(np.uint8)
        fooled = float((predict_proba(model, adv8, batch_size=self.batch_size).argmax(1) != self.target).mean())
        fooled0 = float((predict_proba(model, train.images[idx], batch_size=self.batch_size).argmax(1)
                         != self.target).mean())
        images = train.images.copy()
        images[idx] = self.train_trigger.apply(adv8)
        extra = {"pgd_fooled": fooled, "clean_fooled": fooled0, "train_amplitude": self.amplitude,
                 "surrogate": surrogate_info or {"init": "clean model, not adversarially trained"}}
        return (train.with_data(images=images),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=self.trigger, extra=extra))
