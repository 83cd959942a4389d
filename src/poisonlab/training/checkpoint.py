"""Progress files: long training continues where a stopped process left it.

A :class:`Checkpoint` is one file holding the state of one piece of resumable work (a :func:`fit` run,
a defence's phase): model and optimiser states, random-number-generator states, the epoch reached.
The work saves it after each epoch and loads it when it starts again; a stopped process (Ctrl-C,
SIGKILL, a session that ends) therefore loses at most one epoch. ABL's 100 epochs on CIFAR-10 take
about 3 hours on a 2-core CPU, more than one sitting; this is what lets them finish across several.

A progress file may come from someone else's cache, so it is treated as hostile:

- it is read with ``torch.load(weights_only=True)`` (tensors and plain containers; nothing is
  executed), and a symbolic link is never followed;
- a file that cannot be read, or whose contents do not fit the model and optimisers they are meant
  for (keys, shapes, counts, ranges), is reported in a warning naming the file and ignored: the
  work starts over, as it would without the file;
- a readable file written by a different run (another recipe, data size or seed: its ``fingerprint``
  differs) is an error naming the file rather than something silently overwritten.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from poisonlab.errors import ConfigError
from poisonlab.utils import atomic_write_bytes

FORMAT = 1
T = TypeVar("T")


class StaleProgress(ValueError):
    """A progress file whose contents do not fit the work reading it (raised by the ``check_*`` helpers)."""


class Checkpoint:
    """One progress file at ``path`` (None: a checkpoint that never saves and never resumes).

    ``fingerprint`` names the work the file belongs to (a string built from its settings); a file
    holding another fingerprint is refused with a :class:`~poisonlab.errors.ConfigError`.
    """

    def __init__(self, path: str | os.PathLike[str] | None, fingerprint: str = ""):
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint

    def __bool__(self) -> bool:
        return self.path is not None

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it was unreadable, with a warning)."""
        if self.path is None or not (self.path.exists() or self.path.is_symlink()):
            return None
        if self.path.is_symlink() or not self.path.is_file():
            return self.discard("not a plain file (a symbolic link or a folder); it is not followed")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises several kinds
            return self.discard(f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return self.discard("not a poisonlab progress file")
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"{self.path}: progress file of a different run (its settings, data size or seed "
                              "differ from this one's); delete it or point this run elsewhere")
        return state

    def resume(self, restore: Callable[[dict[str, Any]], T]) -> T | None:
        """Load the saved state and hand it to ``restore``; returns what ``restore`` returns, or None when
        there is nothing to continue from.

        ``restore`` checks the state against the work (the ``check_*`` helpers), raising
        :class:`StaleProgress` before it changes anything when the state does not fit; the file is then
        discarded with a warning and None is returned, so the work starts over as if it had no file.
        """
        state = self.load()
        if state is None:
            return None
        try:
            return restore(state)
        except StaleProgress as e:
            return self.discard(f"does not fit this run ({e})")

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors and plain containers) atomically: a reader sees the old file or the new one."""
        if self.path is None:
            return
        buf = io.BytesIO()
        torch.save({**state, "format": FORMAT, "fingerprint": self.fingerprint}, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    def clear(self) -> None:
        """Remove the file (the work it tracked is finished)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def discard(self, why: str) -> None:
        """Warn that the file is ``why``, remove it, and return None: the work starts over."""
        warnings.warn(f"{self.path}: progress file {why}; starting this work over", stacklevel=3)
        try:
            self.path.unlink(missing_ok=True)  # type: ignore[union-attr]
        except OSError:  # a read-only folder: the next save says so
            pass
        return None


def fingerprint(*parts: Any) -> str:
    """A short hash of ``parts``: tensors and arrays by dtype, shape and bytes, anything else by ``str``.

    Give it what makes a piece of work the same work: its settings, the data it reads, its seed.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(str(part).encode())
        h.update(b"|")
    return h.hexdigest()[:20]


def layer_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of ``model``'s state dict: what a fingerprint says of a model."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# --------------------------------------------------------------- validation of a loaded state
def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise StaleProgress(f"{name} must be an integer in [{lo}, {hi}], found {value!r}")
    return value


def check_model_state(state: Any, model: nn.Module, name: str = "model") -> dict[str, torch.Tensor]:
    """``state`` if it is a state dict with exactly ``model``'s keys, shapes and dtypes."""
    own = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(own):
        raise StaleProgress(f"{name}: the saved weights do not have this model's layers")
    for k, v in own.items():
        s = state[k]
        if not isinstance(s, torch.Tensor) or s.shape != v.shape or s.dtype != v.dtype:
            raise StaleProgress(f"{name}: {k} does not match this model")
    return state


def check_optimizer_state(state: Any, opt: torch.optim.Optimizer, name: str = "optimizer") -> dict:
    """``state`` if it fits ``opt``: the same groups and parameter counts, per-parameter tensors shaped as
    their parameter (or scalars such as a step count)."""
    own = opt.state_dict()
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if (not isinstance(groups, list) or len(groups) != len(own["param_groups"])
            or not isinstance(state.get("state"), dict)):
        raise StaleProgress(f"{name}: the saved optimiser does not have this optimiser's groups")
    shapes = {}
    for g, mine in zip(groups, own["param_groups"]):
        if not isinstance(g, dict) or g.get("params") != mine["params"]:
            raise StaleProgress(f"{name}: the saved parameter groups differ from this optimiser's")
    for pid, p in zip((i for g in own["param_groups"] for i in g["params"]),
                      (p for g in opt.param_groups for p in g["params"])):
        shapes[pid] = p.shape
    for pid, per_param in state["state"].items():
        if pid not in shapes or not isinstance(per_param, dict):
            raise StaleProgress(f"{name}: state for an unknown parameter {pid!r}")
        for k, v in per_param.items():
            if isinstance(v, torch.Tensor) and v.numel() != 1 and v.shape != shapes[pid]:
                raise StaleProgress(f"{name}: {k} of parameter {pid} has the wrong shape")
    return state


def check_scheduler_state(state: Any, own: dict[str, Any], counters: tuple[str, ...], name: str) -> dict:
    """``state`` if it is a scheduler's state dict equal to ``own`` (the live scheduler's) except in the
    numeric ``counters``: a hostile file may then move the schedule along, never change its settings or
    add attributes (schedulers load a state dict by updating their ``__dict__``)."""
    if not isinstance(state, dict) or set(state) != set(own):
        raise StaleProgress(f"{name}: the saved schedule does not have this schedule's fields")
    for k, mine in own.items():
        v = state[k]
        if k not in counters:
            if v != mine:
                raise StaleProgress(f"{name}: {k} differs from this run's ({v!r} vs {mine!r})")
        elif isinstance(mine, list):
            if (not isinstance(v, list) or len(v) != len(mine)
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise StaleProgress(f"{name}: {k} must be {len(mine)} numbers")
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            raise StaleProgress(f"{name}: {k} must be a number")
    return state


def check_generator_state(state: Any, gen: torch.Generator, name: str = "generator") -> torch.Tensor:
    own = gen.get_state()
    if not isinstance(state, torch.Tensor) or state.dtype != own.dtype or state.shape != own.shape:
        raise StaleProgress(f"{name}: not a random-number-generator state")
    try:  # tried on a scratch generator of the same device: the real one is changed only once all is checked
        torch.Generator(device=gen.device).set_state(state)
    except RuntimeError as e:
        raise StaleProgress(f"{name}: not a valid random-number-generator state ({e})") from None
    return state


def training_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], gen: torch.Generator) -> dict:
    """What continuing an optimisation needs: weights, optimiser states and both RNG states, as tensors."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizers": [o.state_dict() for o in optimizers], "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state()}


def restore_training_state(state: dict, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                           gen: torch.Generator) -> None:
    """Load :func:`training_state`'s output back; everything is checked before anything is changed
    (a :class:`StaleProgress` leaves model, optimisers and generator as they were)."""
    weights = check_model_state(state.get("model"), model)
    opts = state.get("optimizers")
    if not isinstance(opts, list) or len(opts) != len(optimizers):
        raise StaleProgress("optimizers: the saved run had a different number of optimisers")
    for o, s in zip(optimizers, opts):
        check_optimizer_state(s, o)
    g = check_generator_state(state.get("generator"), gen)
    rng = check_generator_state(state.get("torch_rng"), torch.default_generator, "torch_rng")
    model.load_state_dict(weights)
    for o, s in zip(optimizers, opts):
        o.load_state_dict(s)
    gen.set_state(g)
    torch.set_rng_state(rng)
