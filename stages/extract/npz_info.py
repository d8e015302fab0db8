"""MILVLG ``.npz`` feature files keep object labels and confidences in a pickled ``info`` dict; this
reads it without running anything a file could smuggle in (issue 12 item 10).

A pickle reaches code only through ``find_class``; :class:`_PlainUnpickler` answers it for the three
numpy names an object array of plain data needs (``_reconstruct``, ``ndarray``, ``dtype``, plus numpy
scalars) and refuses every other name (``os.system``, ``builtins.eval``, ...) before anything is called.
The result is then checked to be plain data: containers of strings and numbers, and numeric arrays.
"""

from __future__ import annotations

import pickle

import numpy as np


class InfoError(ValueError):
    """An ``info`` entry that is refused or unreadable; the caller adds the file name."""


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x and 2.x pickles


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"ndarray subclass {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, str)):
        raise pickle.UnpicklingError("a numpy scalar that is not plain numeric data")
    raw = data.encode("latin1") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=dtype, count=1)[0]


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings, numbers and numeric numpy arrays; refuses every other global
    (``find_class`` is the only way a pickle reaches code)."""

    ALLOWED = {**{(m, "_reconstruct"): _reconstruct for m in _NUMPY_MODULES},
               **{(m, "scalar"): _scalar for m in _NUMPY_MODULES},
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return self.ALLOWED[(module, name)]


def _plain(obj, depth: int = 0) -> bool:
    """True if ``obj`` is plain data: containers of str/bytes/numbers/None and non-object numpy arrays."""
    if depth > 20:
        return False
    if isinstance(obj, (str, bytes, int, float, bool, type(None))) or (
            isinstance(obj, np.generic) and not isinstance(obj, np.object_)):
        return True
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind in "biufcUS"
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v, depth + 1) for v in obj)
    return False


def read_npz_info(z) -> dict:
    """The ``info`` dict of an open MILVLG ``.npz`` ``z`` (``np.savez(..., info=dict)`` pickles it in a 0-d
    object array), read with :class:`_PlainUnpickler`; :class:`InfoError` if it holds anything else."""
    try:
        with z.zip.open("info.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            if not dtype.hasobject:
                return {}  # a numeric 'info' array: not MILVLG's dict
            info = _PlainUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise InfoError(f"the pickled 'info' entry was refused ({e}); only plain containers and numeric "
                        "arrays are read") from None
    except (ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise InfoError(f"the 'info' entry cannot be read ({type(e).__name__}: {e})") from None
    if isinstance(info, np.ndarray) and info.dtype.hasobject and info.shape == () and shape == ():
        info = info.item()
    if not isinstance(info, dict) or not _plain(info):
        raise InfoError(f"the 'info' entry is not a dict of plain values and numeric arrays "
                        f"(got {type(info).__name__}); not imported")
    return info
