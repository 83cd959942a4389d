"""The artifact cache: every stage's output stored under a hash of exactly the settings that produced it.

Layout: ``CACHE/<stage>/<key>/`` holding ``arrays.npz`` (NumPy arrays,
read with ``allow_pickle=False``), ``model.pt`` (a state dict, read with
``weights_only=True``) and ``meta.json``. ``meta.json`` is written last and
atomically, so an entry exists exactly when it is complete: a process killed
half-way (SIGKILL included) leaves at most stray temporary files, never an
entry that looks finished. Two workers producing the same entry write the
same content; the later ``os.replace`` wins. ``CACHE/progress/<key>/`` holds the
progress files of a long defence run that has not finished
(:mod:`poisonlab.training.checkpoint`); it goes once the run's entry is stored.

A damaged entry (a ``meta.json`` that is not a JSON object, an ``arrays.npz`` or ``model.pt`` that is not a
whole zip or fails a member's CRC: a full disk, a truncated copy, bit rot) is found by :meth:`ArtifactCache.has`,
reported in a warning naming the file, and removed, so the stage that asked recomputes it. ``torch.load``
does not check CRCs, so ``has`` does, once per process for each version of the files.

Nothing in the cache is unpickled: triggers are stored as the name of their
:class:`~poisonlab.attacks.Trigger` sub-class plus their dataclass fields
(JSON scalars, arrays in the npz) and rebuilt only if that class is a
dataclass sub-class of ``Trigger`` already imported by poisonlab.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from poisonlab.errors import CacheError
from poisonlab.utils import atomic_write_bytes, atomic_write_json, to_json

CACHE_VERSION = 1


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able description of settings."""
    text = json.dumps(obj, sort_keys=True, default=_key_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _key_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {"__class__": type(o).__name__, **{f.name: getattr(o, f.name) for f in dataclasses.fields(o)}}
    return repr(o)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (arrays to lists); unknown objects become their repr."""
    return json.loads(json.dumps(obj, default=_key_default, allow_nan=True))


ENTRY_FILES = ("meta.json", "arrays.npz", "model.pt")  # meta.json first: removing it un-completes an entry
_AGAIN = "; run the command again to recompute it"


def _signature(d: Path) -> tuple | None:
    """(size, mtime) of an entry's files, None when it has no ``meta.json`` (absent or unfinished)."""
    sig = []
    for name in ENTRY_FILES:
        try:
            st = os.stat(d / name)
        except FileNotFoundError:
            if name == "meta.json":
                return None
            sig.append(None)
        else:
            sig.append((st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _read_meta(f: Path) -> dict[str, Any]:
    meta = json.loads(f.read_bytes())
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, found {type(meta).__name__}")
    return meta


def _damage(d: Path) -> tuple[str, str] | None:
    """``(file name, what is wrong)`` for the first damaged file of entry ``d``, None when it is intact."""
    try:
        _read_meta(d / "meta.json")
    except (OSError, ValueError, RecursionError) as e:
        return "meta.json", f"{type(e).__name__}: {e}"
    for name in ("arrays.npz", "model.pt"):
        f = d / name
        if not f.exists():
            continue
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()  # reads every member and checks its CRC-32
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, NotImplementedError) as e:
            return name, f"{type(e).__name__}: {e}"
        if bad is not None:
            return name, f"member {bad!r} fails its CRC check"
    return None


class ArtifactCache:
    """Entries under ``root``: ``has``, ``meta``, ``arrays``, ``state_dict`` and ``put``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"{self.root}: the cache must be a directory, and this is a file")
        # entry folder -> _signature() when last found intact: each version of an entry is checked once
        self._intact: dict[Path, tuple] = {}

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        """Whether a complete, intact entry exists.

        A damaged one is reported (a warning naming the file and what is wrong) and removed, and this
        returns False, so the caller recomputes it as it would a missing one.
        """
        d = self.path(stage, key)
        sig = _signature(d)
        if sig is None:
            return False
        if self._intact.get(d) == sig:
            return True
        problem = _damage(d)
        if problem is not None:
            warnings.warn(self._discard(d, *problem) + ", it will be recomputed", stacklevel=2)
            return False
        self._intact[d] = sig
        return True

    def _discard(self, d: Path, name: str, why: str) -> str:
        """Remove damaged entry ``d`` (``meta.json`` first); returns the sentence that says so, naming the file."""
        why = why.strip().splitlines()[0] if why.strip() else "unreadable"
        why = why if len(why) <= 160 else why[:157] + "..."
        self._intact.pop(d, None)
        for f in ENTRY_FILES:
            try:
                (d / f).unlink(missing_ok=True)
            except OSError:  # a read-only cache: put() will say so when it writes the new entry
                pass
        return f"{d / name}: damaged cache entry ({why}); removed"

    def _read(self, f: Path, read: Callable[[Path], Any], damaged: tuple[type[Exception], ...]) -> Any:
        """``read(f)``; a missing ``f`` or one of the ``damaged`` errors is a :class:`CacheError` naming ``f``,
        and a damaged entry is removed so that the next run recomputes it."""
        try:
            return read(f)
        except FileNotFoundError:
            raise CacheError(f"{f}: no such cache entry") from None
        except damaged as e:
            why = f"{type(e).__name__}: {str(e).removeprefix(f'{f}: ')}"
            raise CacheError(self._discard(f.parent, f.name, why) + _AGAIN) from None

    def meta(self, stage: str, key: str) -> dict[str, Any]:
        """The entry's ``meta.json``; :class:`CacheError` naming the file if it is missing or damaged."""
        return self._read(self.path(stage, key) / "meta.json", _read_meta, (OSError, ValueError, RecursionError))

    def arrays(self, stage: str, key: str) -> dict[str, np.ndarray]:
        """The entry's arrays; ``{}`` when the entry does not exist, has none, or was damaged (and removed)."""
        f = self.path(stage, key) / "arrays.npz"
        if not self.has(stage, key) or not f.is_file():
            return {}

        def read(f: Path) -> dict[str, np.ndarray]:
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

        # damaged since has() checked it
        return self._read(f, read, (OSError, EOFError, ValueError, zipfile.BadZipFile))

    def state_dict(self, stage: str, key: str) -> dict:
        """The entry's model weights (``weights_only`` load); :class:`CacheError` naming the file if damaged."""
        from poisonlab.errors import DataError
        from poisonlab.utils import load_state_dict

        return self._read(self.path(stage, key) / "model.pt", load_state_dict, (DataError, OSError, RuntimeError))

    def put(self, stage: str, key: str, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
            model: Any = None) -> None:
        """Write an entry: arrays and weights first, ``meta.json`` (the completion marker) last."""
        d = self.path(stage, key)
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
            atomic_write_bytes(d / "arrays.npz", buf.getvalue())
        if model is not None:
            from poisonlab.utils import save_state_dict

            save_state_dict(model, d / "model.pt")
        atomic_write_json(d / "meta.json", meta)
        sig = _signature(d)
        if sig is not None:  # just written whole: no need to read it back to check it
            self._intact[d] = sig

    def progress_dir(self, key: str) -> Path | None:
        """The folder where the unfinished defence run ``key`` keeps its progress files
        (:attr:`poisonlab.defenses.DefenseContext.progress_dir`); None, with a warning, when something
        other than a plain folder is there (a symbolic link is never followed out of the cache)."""
        d = self.path("progress", key)
        for f in (d.parent, d):
            if f.is_symlink() or (f.exists() and not f.is_dir()):
                warnings.warn(f"{f}: not a plain folder; this run keeps no progress file and will not resume",
                              stacklevel=2)
                return None
        return d

    def drop_progress(self, key: str) -> None:
        """Remove run ``key``'s progress folder once its entry is stored (never through a symbolic link)."""
        d = self.path("progress", key)
        if d.is_dir() and not d.is_symlink() and not d.parent.is_symlink():
            shutil.rmtree(d, ignore_errors=True)

    # timings feed the planner's time estimate
    def record_seconds(self, cost_key: str, seconds: float) -> None:
        atomic_write_json(self.root / "timings" / f"{cost_key}.json", {"seconds": float(seconds)})

    def seconds(self, cost_key: str) -> float | None:
        f = self.root / "timings" / f"{cost_key}.json"
        try:
            return float(json.loads(f.read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):  # absent or damaged: no estimate
            return None


# ---------------------------------------------------------------- poisonings

def _trigger_classes() -> dict[str, type]:
    from poisonlab.attacks.base import Trigger

    out: dict[str, type] = {}
    todo = list(Trigger.__subclasses__())
    while todo:
        c = todo.pop()
        out[f"{c.__module__}.{c.__qualname__}"] = c
        todo.extend(c.__subclasses__())
    return out


def trigger_to_spec(trigger: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """``(json_spec, arrays)`` for a dataclass trigger; None if it cannot be stored safely."""
    if trigger is None or not dataclasses.is_dataclass(trigger):
        return None
    fields, arrays = {}, {}
    for f in dataclasses.fields(trigger):
        v = getattr(trigger, f.name)
        if isinstance(v, np.ndarray):
            arrays[f"trigger.{f.name}"] = v
        elif hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch tensor
            arrays[f"trigger.{f.name}"] = v.detach().cpu().numpy()
            fields.setdefault("__tensors__", []).append(f.name)
        else:
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                return None
            fields[f.name] = v
    return {"class": f"{type(trigger).__module__}.{type(trigger).__qualname__}", "fields": fields}, arrays


def trigger_from_spec(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """Rebuild a trigger from :func:`trigger_to_spec` output (known dataclass Trigger classes only)."""
    cls = _trigger_classes().get(spec["class"])
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"cache names an unknown trigger class {spec['class']!r}")
    fields = dict(spec["fields"])
    tensors = set(fields.pop("__tensors__", []))
    for k, v in arrays.items():
        if k.startswith("trigger."):
            name = k.removeprefix("trigger.")
            if name in tensors:
                import torch

                v = torch.from_numpy(v)
            fields[name] = v
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    obj = cls(**{k: v for k, v in fields.items() if k in names})
    for k, v in fields.items():  # init=False fields
        if k not in names:
            setattr(obj, k, v)
    return obj


def poisoning_to_entry(clean_images: np.ndarray, clean_labels: np.ndarray, poisoned: Any,
                       record: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Cache entry for a poisoned set, stored as its difference from the clean set; None if not storable."""
    arrays: dict[str, np.ndarray] = {
        "indices": np.asarray(record.indices, dtype=np.int64),
        "original_labels": np.asarray(record.original_labels, dtype=np.int64),
        "labels": poisoned.labels,
    }
    if len(poisoned) == len(clean_labels) and poisoned.images.shape == clean_images.shape:
        changed = np.nonzero((poisoned.images != clean_images).reshape(len(poisoned), -1).any(1))[0]
        arrays["changed"] = changed
        arrays["changed_images"] = poisoned.images[changed]
    else:  # the attack added or removed samples: store the whole set
        arrays["images"] = poisoned.images
    for name in ("target_indices", "adversarial_labels"):
        v = getattr(record, name)
        if v is not None:
            arrays[name] = np.asarray(v)
    trig = None
    if record.trigger is not None:
        spec = trigger_to_spec(record.trigger)
        if spec is None:
            return None
        trig, tarrays = spec
        arrays.update(tarrays)
    meta = {"attack": record.attack, "params": jsonable(record.params), "target_class": record.target_class,
            "seconds": record.seconds, "extra": jsonable(record.extra), "trigger": trig}
    return meta, arrays


def poisoning_from_entry(train: Any, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """Rebuild ``(poisoned ImageSet, Poisoning)`` from a cache entry and the clean training set."""
    from poisonlab.attacks.base import Poisoning

    if "images" in arrays:
        images = arrays["images"]
    else:
        images = train.images.copy()
        images[arrays["changed"]] = arrays["changed_images"]
    poisoned = train.with_data(images=images, labels=arrays["labels"])
    trigger = trigger_from_spec(meta["trigger"], arrays) if meta.get("trigger") else None
    record = Poisoning(attack=meta["attack"], params=meta["params"], indices=arrays["indices"],
                       original_labels=arrays["original_labels"], target_class=meta.get("target_class"),
                       trigger=trigger, target_indices=arrays.get("target_indices"),
                       adversarial_labels=arrays.get("adversarial_labels"), seconds=meta.get("seconds", 0.0),
                       extra=meta.get("extra") or {})
    return poisoned, record


__all__ = ["ArtifactCache", "digest", "jsonable", "poisoning_to_entry", "poisoning_from_entry", "to_json"]
