"""A restricted unpickler for dataset files a user downloaded.

``pickle.load`` can run arbitrary code; the CIFAR-10 python batches are
pickles, so they are read with an unpickler that can only rebuild what the
format needs: dicts, lists, bytes, str, numbers and plain numeric numpy
arrays. Anything else (``os.system``, ``builtins.eval``, object arrays ...)
is refused before it is built.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from poisonlab.errors import UnsafePickleError


def _safe_dtype(*args: Any, **kwargs: Any) -> np.dtype:
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise UnsafePickleError("pickle asks for a numpy object array, which could hold arbitrary objects")
    return dt


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"pickle asks to rebuild array subclass {subtype!r}")
    # numpy's own pickles start from an empty array and then set its data; a full shape here would be an
    # array of uninitialised memory (as large as the pickle asks) that no data ever fills
    if not (isinstance(shape, tuple) and 0 in shape):
        raise UnsafePickleError(f"pickle asks for an array of shape {shape!r} without its data")
    from numpy._core.multiarray import _reconstruct as real  # type: ignore[attr-defined]

    return real(subtype, shape, dtype)


def _frombuffer(buf: bytes, dtype: Any, shape: Any, order: str) -> np.ndarray:
    # numpy >= 1.16 pickles protocol-5 arrays through this helper
    dt = _safe_dtype(dtype)
    return np.frombuffer(buf, dtype=dt).reshape(shape, order=order).copy()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in an allow-list."""

    def __init__(self, file: BinaryIO, source: str = "<pickle>") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle global {module}.{name}; "
                "a dataset file should contain only arrays, lists, dicts and bytes"
            ) from None


def safe_load(file: BinaryIO | bytes, source: str = "<pickle>") -> Any:
    """Load a pickle with :class:`RestrictedUnpickler`; corrupt data raises :class:`UnsafePickleError`."""
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    try:
        return RestrictedUnpickler(file, source).load()
    except UnsafePickleError as e:
        if str(e).startswith(f"{source}: "):
            raise
        raise UnsafePickleError(f"{source}: {e}") from None
    except Exception as e:
        raise UnsafePickleError(f"{source}: not a valid pickle ({type(e).__name__}: {e})") from e
