"""Small shared helpers: seeding, atomic file writes, safe checkpoint loading."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is repeatable on one machine."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets the permissions a plain ``open()`` would give it (mkstemp's 0600 would hide results
    from the other users of a shared folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a model's state dict (tensors only) atomically."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only.

    A checkpoint that tries to rebuild arbitrary Python objects is refused by
    torch's restricted unpickler rather than executed.
    """
    from poisonlab.errors import DataError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError / RuntimeError variants
        raise DataError(f"{path}: not a safe poisonlab checkpoint ({e})") from e


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast is likely to speed up inference on ``device``.

    True on CUDA and on CPUs with native bf16 matrix units (AVX512-BF16 or
    AMX, which oneDNN uses): on this project's 2-core CPU a ``fastnet``
    forward pass ran 3.2x faster under bf16 autocast. Elsewhere bf16 is
    emulated and slower, so callers fall back to float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
