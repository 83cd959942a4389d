"""How visible a poisoning is: image distances between clean and poisoned samples, and label changes.

:func:`stealth_metrics` works on plain arrays so that the experiment runner,
a notebook or a test can call it the same way. SSIM is implemented here
(Gaussian window, per channel; Wang et al., "Image quality assessment: from
error visibility to structural similarity", 2004) so that poisonlab does not
depend on scikit-image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from poisonlab.errors import ParameterError

# Wang et al. (2004) constants for images scaled to [0, 1]
_K1, _K2 = 0.01, 0.03


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, window: int = 11, sigma: float = 1.5,
         batch_size: int = 512) -> np.ndarray:
    """Mean SSIM per image between two stacks of images in [0, 1].

    Args:
        a, b: float arrays ``(N, H, W, C)`` in [0, 1] (NHWC, like :class:`ImageSet` images after /255).
        window: side of the Gaussian window; shrunk to the largest odd size that fits
            when the images are smaller (8x8 digits use 7).
        sigma: standard deviation of the Gaussian window (1.5, as in Wang et al.).

    Returns:
        ``(N,)`` SSIM values: the SSIM map is computed per channel over the
        "valid" window positions (no padding) and averaged over positions and channels.
        Identical images give 1.
    """
    a_t = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b_t = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if a_t.shape != b_t.shape or a_t.ndim != 4:
        raise ParameterError(f"ssim needs two (N, H, W, C) stacks of the same shape, got {tuple(a_t.shape)} "
                             f"and {tuple(b_t.shape)}")
    n, h, w, c = a_t.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    kernel = _gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()
    c1, c2 = _K1 ** 2, _K2 ** 2
    out = []
    for i in range(0, n, batch_size):
        x = a_t[i:i + batch_size].permute(0, 3, 1, 2)
        y = b_t[i:i + batch_size].permute(0, 3, 1, 2)
        # one grouped convolution filters every channel of all five statistics at once
        stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y], 1), kernel.repeat(5, 1, 1, 1), groups=5 * c)
        mx, my, exx, eyy, exy = stats.split(c, 1)
        vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
        smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(smap.mean((1, 2, 3)))
    return torch.cat(out).numpy() if out else np.zeros(0)


def stealth_metrics(clean_images: np.ndarray, poisoned_images: np.ndarray, clean_labels: np.ndarray,
                    poisoned_labels: np.ndarray, indices: np.ndarray) -> dict:
    """Stealth figures of a poisoning.

    Args:
        clean_images: the training images before the attack, uint8 ``(N, H, W, C)``
            (or float in [0, 1]).
        poisoned_images: the same images after the attack, same shape and type.
        clean_labels, poisoned_labels: ``(N,)`` labels before and after.
        indices: the training indices the attack touched (``Poisoning.indices``).

    Returns:
        ``linf``, ``l2``: mean over the poisoned images of the per-image L-inf and L2
        norm of the difference, images scaled to [0, 1] (L2 over all pixels and channels);
        ``psnr``: 10 log10(1 / MSE) in dB with the MSE averaged over the poisoned images
        (``inf`` when they are unchanged; averaging per-image PSNRs would be infinite as soon
        as one image is unchanged, e.g. a label-only poison inside a mixed attack);
        ``ssim``: mean SSIM (:func:`ssim`) over the poisoned images;
        ``label_change_rate``: fraction of ALL ``N`` labels that differ;
        ``n_poisoned``: ``len(indices)``. With no indices the image figures are
        those of identical images (0, 0, inf, 1).
    """
    clean_images = np.asarray(clean_images)
    poisoned_images = np.asarray(poisoned_images)
    clean_labels = np.asarray(clean_labels)
    poisoned_labels = np.asarray(poisoned_labels)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if clean_images.shape != poisoned_images.shape:
        raise ParameterError(f"clean_images {clean_images.shape} and poisoned_images {poisoned_images.shape} "
                             "must have the same shape")
    if clean_labels.shape != poisoned_labels.shape or clean_labels.shape[:1] != clean_images.shape[:1]:
        raise ParameterError(f"labels must be ({len(clean_images)},), got {clean_labels.shape} and "
                             f"{poisoned_labels.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(clean_images)):
        raise ParameterError(f"indices must lie in [0, {len(clean_images) - 1}]")
    label_change = float((clean_labels != poisoned_labels).mean()) if len(clean_labels) else 0.0
    if len(idx) == 0:
        return {"linf": 0.0, "l2": 0.0, "psnr": math.inf, "ssim": 1.0, "label_change_rate": label_change,
                "n_poisoned": 0}
    scale = 255.0 if clean_images.dtype == np.uint8 else 1.0
    a = clean_images[idx].astype(np.float64) / scale
    b = poisoned_images[idx].astype(np.float64) / scale
    if a.ndim == 3:  # (N, H, W) grayscale
        a, b = a[..., None], b[..., None]
    d = (b - a).reshape(len(idx), -1)
    mse = float((d ** 2).mean())
    return {
        "linf": float(np.abs(d).max(1).mean()),
        "l2": float(np.sqrt((d ** 2).sum(1)).mean()),
        "psnr": math.inf if mse == 0 else float(10 * math.log10(1.0 / mse)),
        "ssim": float(ssim(a, b).mean()),
        "label_change_rate": label_change,
        "n_poisoned": int(len(idx)),
    }
