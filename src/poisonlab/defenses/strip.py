"""STRIP input detection (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural
Networks", ACSAC 2019)."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from poisonlab.data.imageset import ImageSet, float_nchw, nchw_tensor
from poisonlab.defenses._repair import require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.training.device import autocast, use_bf16 as bf16_rule
from poisonlab.validate import check_choice, check_range

# blended copies per forward pass: on a CPU a 1,280-image batch ran 30% slower per image than
# 64-256-image ones (it no longer fits the caches)
_FORWARD_CHUNK = 256


@torch.no_grad()
def strip_entropy(model: nn.Module, images: ImageSet | np.ndarray | torch.Tensor,
                  overlay_pool: ImageSet | np.ndarray | torch.Tensor, n: int = 20, alpha: float | None = None,
                  batch_size: int = 64, seed: int = 0, bf16: bool | None = None) -> np.ndarray:
    """STRIP score per image: mean entropy (nats) of the predictions on ``n`` blends with random clean images.

    Each image ``x`` is superimposed on ``n`` overlays ``o`` drawn from
    ``overlay_pool``: by default as the saturating sum ``min(1, x + o)`` (what
    Gao et al.'s code does, so a bright trigger survives at full strength), or
    as ``alpha * x + (1 - alpha) * o`` when ``alpha`` is given; the entropy of each blended
    copy's class distribution is averaged over the ``n`` copies (Gao et al.
    2019, Eq. 2-3). A trigger that dominates the prediction keeps the blends
    in the target class, so triggered inputs score LOW. All ``n`` copies of a
    batch of ``batch_size`` images go through the model in one forward pass.

    Args:
        images / overlay_pool: ImageSet, uint8 NHWC array, or NCHW tensor (uint8 or float in [0, 1]).
        n: blended copies per image (the paper uses 100).
        alpha: None for the saturating sum, else the weight of the input in a linear blend.
        seed: draws the overlays, so scores repeat.
        bf16: run the model under bfloat16 autocast (entropies from float32 softmax);
            None (or "auto") follows the training rule (:func:`poisonlab.training.use_bf16`: bf16 units and
            images of at least 16 pixels; 3.2x faster on this project's CPU). Threshold and scores must come from the same setting.

    Returns:
        ``(N,)`` float array of mean entropies.
    """
    model.eval()
    device = next(model.parameters()).device
    x_all = float_nchw(images)
    pool = float_nchw(overlay_pool, device)
    use_bf16 = bf16_rule("auto" if bf16 is None else bf16, device, int(x_all.shape[-1]))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device)
        b = len(x)
        pick = torch.randint(0, len(pool), (b, n), generator=g).to(device)
        o = pool[pick]  # b, n, C, H, W
        blends = (x[:, None] + o).clamp_(max=1.0) if alpha is None else alpha * x[:, None] + (1 - alpha) * o
        flat = blends.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        with autocast(use_bf16, device):
            logits = torch.cat([model(c) for c in flat.split(_FORWARD_CHUNK)])
        logp = torch.log_softmax(logits.float(), 1)
        ent = -(logp.exp() * logp).sum(1).view(b, n).mean(1)
        out.append(ent.cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class StripGuard(nn.Module):
    """The model behind a STRIP gate: inputs with entropy below ``threshold`` are rejected.

    A rejected input never gets the class the model would have given it: its
    top logit is pushed below all others, so its prediction falls to the
    model's runner-up. So under the runner's metrics ``asr`` counts only the
    triggered images that pass the gate AND reach the target; ``clean_acc``
    counts a rejected clean image as correct only when the runner-up is its
    class (abstention is mostly an error, the cost of the FRR).
    """

    def __init__(self, model: nn.Module, overlay_pool: torch.Tensor, threshold: float, n: int, alpha: float | None,
                 batch_size: int, seed: int, cache_size: int = 64, bf16: bool | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("pool", overlay_pool, persistent=False)
        self.threshold, self.n, self.alpha, self.batch_size, self.seed = threshold, n, alpha, batch_size, seed
        self.bf16 = bf16
        # the runner evaluates this module on the same batches the defence scored: score each batch once
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.blake2b(x.detach().float().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(strip_entropy(self.model, x, self.pool, self.n, self.alpha,
                                                              self.batch_size, self.seed, self.bf16))
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        rejected = (self.entropy(x) < self.threshold).to(logits.device)
        if rejected.any():
            logits = logits.clone()
            top = logits.argmax(1)
            rows = torch.nonzero(rejected).squeeze(1)
            logits[rows, top[rows]] = logits[rows].min(1).values - 1
        return logits


@DEFENSES.register("strip")
class Strip(Defense):
    """Flag triggered test inputs by their low STRIP entropy (Gao et al. 2019).

    Input: ``ctx.model`` and ``ctx.clean_set``; the clean set is split in
    halves: one is the overlay pool, the other calibrates the threshold as the
    ``frr`` quantile of clean entropies (the paper fits a normal distribution to
    them; the empirical quantile needs no such assumption). The model itself is
    unchanged.

    Output model: with ``reject=True`` a :class:`StripGuard` (rejected inputs
    lose their top class, see there for what clean_acc and ASR then mean); with
    ``reject=False`` the model unchanged, so the runner's clean_acc and ASR are
    the undefended ones and only the detection metrics below say what STRIP did.

    Metrics (on the test set; the trigger from ``ctx.poisoning`` is used to build
    the triggered test images for measuring only): ``threshold``, ``frr`` (clean
    test images flagged), ``far`` (triggered non-target test images NOT flagged),
    ``det_auroc`` (entropy separating clean from triggered), mean entropies.
    Arrays (for the report's histogram): ``strip_ent_clean`` (entropy of every
    clean test image) and, with a trigger, ``strip_ent_trig`` (of every
    triggered non-target test image), float32.

    Args:
        n: blended copies per input (paper: 100; 20 is a CPU-friendly default).
        frr: target false rejection rate on clean inputs, (0, 0.5] (paper: 1%).
        alpha: None (default) superimposes by saturating sum as Gao et al.'s code;
            a value in (0, 1) blends linearly with that weight on the input.
        batch_size: inputs per forward pass (the pass holds ``n`` times as many images).
        reject: return the rejecting wrapper (True) or the unchanged model.
        bf16: bfloat16 autocast for the blended forward passes; None (default) where it
            is fast (CUDA, CPUs with bf16 units), see :func:`strip_entropy`.
    """

    kind = "detection"
    min_clean_per_class = 4
    retrains = False

    def __init__(self, n: int = 20, frr: float = 0.01, alpha: float | None = None, batch_size: int = 64,
                 reject: bool = True, bf16: bool | None = None):
        self.n = int(check_range(n, "n", 1, 10_000))
        self.frr = float(check_range(frr, "frr", 0, 0.5, lo_open=True))
        self.alpha = None if alpha is None else float(check_range(alpha, "alpha", 0, 1, lo_open=True, hi_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        self.reject = check_choice(reject, "reject", (True, False))
        self.bf16 = check_choice(bf16, "bf16", (None, True, False))

    def run(self, ctx: DefenseContext) -> DefenseResult:
        clean = require_clean_set(ctx, "strip", min_per_class=4)
        rng = np.random.default_rng(ctx.seed)
        perm = rng.permutation(len(clean))
        pool_idx, calib_idx = perm[: len(clean) // 2], perm[len(clean) // 2:]
        device = next(ctx.model.parameters()).device
        pool = clean.subset(pool_idx).float_tensor(device)
        calib = strip_entropy(ctx.model, clean.subset(calib_idx), pool, self.n, self.alpha, self.batch_size, ctx.seed,
                              self.bf16)
        threshold = float(np.quantile(calib, self.frr))
        guard = StripGuard(ctx.model, pool, threshold, self.n, self.alpha, self.batch_size, ctx.seed, bf16=self.bf16)
        metrics: dict = {"threshold": threshold, "calibration_entropy_mean": float(calib.mean())}
        t0 = time.perf_counter()
        ent_clean = self._score(guard, ctx.test.images)
        metrics.update(frr=float((ent_clean < threshold).mean()), entropy_clean_mean=float(ent_clean.mean()),
                       test_images=len(ctx.test), test_score_seconds=time.perf_counter() - t0)
        arrays = {"strip_ent_clean": ent_clean.astype(np.float32)}
        p = ctx.poisoning
        if p is not None and p.has_trigger:  # measuring only: the defence never sees the trigger
            ent_trig = self._score(guard, p.apply_trigger(ctx.test.images))
            keep = ctx.test.labels != p.target_class
            ent_trig = ent_trig[keep]
            from sklearn.metrics import roc_auc_score

            metrics.update(far=float((ent_trig >= threshold).mean()), entropy_triggered_mean=float(ent_trig.mean()),
                           det_auroc=float(roc_auc_score(np.r_[np.zeros(len(ent_clean)), np.ones(len(ent_trig))],
                                                         -np.r_[ent_clean, ent_trig])))
            arrays["strip_ent_trig"] = ent_trig.astype(np.float32)
        return DefenseResult(model=guard if self.reject else ctx.model, metrics=metrics, arrays=arrays)

    @staticmethod
    def _score(guard: StripGuard, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        # the same batches and float conversion as poisonlab.training.predict_logits, so the runner's
        # evaluation of the guard hits the entropy cache
        x = nchw_tensor(images)
        return torch.cat([guard.entropy(x[i:i + batch_size].float().div_(255))
                          for i in range(0, len(x), batch_size)]).numpy()
