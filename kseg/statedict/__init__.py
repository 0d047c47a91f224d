"""Read and write PyTorch-layout state_dicts without PyTorch, and without running code.

``load_state_dict(path)`` returns an ordinary ``dict[str, numpy.ndarray]`` from

* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: PyTorch's zip serialization (what
  ``torch.save`` writes since torch 1.6: ``<archive>/data.pkl`` plus one raw
  ``<archive>/data/<key>`` member per storage, ``<archive>/byteorder``, ...);
* ``.safetensors`` (via ``safetensors.numpy``, imported only when needed);
* ``.npz`` (``numpy.load(..., allow_pickle=False)``).

``save_state_dict(state, path)`` writes ``.safetensors`` or ``.npz`` atomically.

Safety.  ``data.pkl`` is a pickle, and unpickling an arbitrary pickle can run
arbitrary code.  It is therefore read with a restricted ``pickle.Unpickler``
whose ``find_class`` admits only the handful of globals that tensor rebuilding
needs (see ``_ALLOWED_FUNCTIONS`` / ``_STORAGE_DTYPES`` / ``_TORCH_DTYPES``) and
maps each to a pure-NumPy stand-in defined here; torch itself is never
imported.  Any other global (``os.system``, ``builtins.eval``, a pickled
``nn.Module``, an unknown class ...) raises :class:`UnsafeWeightsError` at the
moment the pickle *names* it, before anything could be called.  Every
``(size, stride, offset)`` view is bounds-checked against its storage before
NumPy touches memory.  Legacy (pre-1.6, non-zip) torch files are refused
without being unpickled at all.

Conversions and policies:

* ``torch.bfloat16`` has no NumPy dtype: bf16 tensors (from ``.pth`` or
  ``.safetensors``) are returned as **float32** (exact: bf16 is the upper half
  of a float32).
* Every array is a fresh, C-contiguous, writable, native-byte-order copy, even
  for tensors that were saved as non-contiguous views or that share a storage.
* Tensors saved with the lazy ``conj``/``neg`` bits set are materialized.
* ``torch.uint16/uint32/uint64`` are supported; float8 / complex32 / bits
  dtypes, sparse and quantized tensors are refused with :class:`WeightsFileError`.
* Checkpoint wrappers: if the top-level object is a dict whose values are not
  all tensors but which holds a nested dict under ``state_dict``, ``model``,
  ``model_state_dict`` or ``module`` (tried in that order, repeatedly, e.g.
  ``{"epoch": 3, "state_dict": {...}}``), that nested dict is used.
  Non-tensor leaves of the chosen dict (ints, strings, lists, ...) are dropped.
* A ``module.`` prefix shared by *all* keys (``nn.DataParallel``) is stripped.
* A file without any tensor raises :class:`WeightsFileError`.
* Key order is the file's order (``torch.save`` insertion order, npz member
  order, safetensors header order, which ``safetensors`` sorts on writing).

Truncated or corrupt files raise :class:`WeightsFileError` (a ``ValueError``)
naming the file and the problem.  This package (this module, torch_zip.py for
PyTorch's zip files, _common.py) imports only the standard library and NumPy, with
relative imports, so it can be used on its own.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zipfile

import numpy as np

from ._common import UnsafeWeightsError, WeightsFileError, _Corrupt, _Tensor
from .torch_zip import _load_torch

__all__ = [
    "SUPPORTED_SUFFIXES",
    "TORCH_SUFFIXES",
    "UnsafeWeightsError",
    "WeightsFileError",
    "load_state_dict",
    "save_state_dict",
]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUPPORTED_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
SAVE_SUFFIXES = (".safetensors", ".npz")

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_DP_PREFIX = "module."


# --- public API ----------------------------------------------------------------------


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a state_dict from a ``.pth/.pt/.bin/.ckpt``, ``.safetensors`` or ``.npz`` file.

    Returns an ordinary ``dict`` of name -> ``numpy.ndarray`` in file order.
    bfloat16 tensors come back as float32.  For torch files, a checkpoint wrapper
    (a dict holding the weights under ``state_dict``, ``model``,
    ``model_state_dict`` or ``module``, next to e.g. an ``epoch`` counter) is
    unwrapped, non-tensor entries are dropped, and a ``module.`` prefix common to
    all keys (``nn.DataParallel``) is removed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeWeightsError: the torch pickle references anything other than what
            rebuilding tensors needs (nothing is executed).
        WeightsFileError: unknown suffix, legacy (non-zip) torch format,
            truncated or corrupt file, unsupported dtype, no tensors.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise WeightsFileError(
            f"{path}: unsupported weights file suffix {suffix or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}",
            path=path,
        )
    with open(path, "rb") as f:  # FileNotFoundError / PermissionError as usual
        head = f.read(16)
    try:
        if suffix in TORCH_SUFFIXES:
            obj = _load_torch(path, head)
            state = _select_state(obj, path)
        elif suffix == ".safetensors":
            state = _load_safetensors(path)
        else:
            state = _load_npz(path)
    except WeightsFileError:
        raise
    except _Corrupt as e:
        raise WeightsFileError(f"{path}: {e}", path=path) from None
    except MemoryError as e:
        raise WeightsFileError(f"{path}: not enough memory to load ({e})", path=path) from e
    except Exception as e:  # anything a corrupt file can provoke in zipfile/pickle/struct/...
        raise WeightsFileError(
            f"{path}: cannot read weights file, it is corrupt or truncated "
            f"({type(e).__name__}: {e})",
            path=path,
        ) from e
    return _finalize(state, path)


def save_state_dict(state, path) -> None:
    """Write ``state`` (a mapping of str -> array-like) to ``.safetensors`` or ``.npz``.

    The file is written to a temporary file in the same directory and moved into
    place with ``os.replace``, so ``path`` is either the complete new file or left
    untouched (an existing file survives a failed save).  Arrays are written
    C-contiguous; key order is kept in ``.npz`` (safetensors sorts its header).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SAVE_SUFFIXES:
        raise ValueError(
            f"{path}: cannot save a state_dict as {suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(SAVE_SUFFIXES)}"
        )
    if not hasattr(state, "items"):
        raise TypeError(f"state must be a mapping of str -> array, got {type(state).__name__}")
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        arr = np.asarray(value, order="C")  # keeps 0-d arrays 0-d
        if arr.dtype.hasobject:
            raise TypeError(f"{key!r}: cannot save an object array")
        arrays[key] = arr

    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp{suffix}")
        try:
            # 0o666 & ~umask, like a normal open(); O_EXCL: never clobber a stranger's file
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        if suffix == ".npz":
            with os.fdopen(fd, "wb") as f:
                _write_npz(f, arrays)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            import safetensors.numpy

            safetensors.numpy.save_file(arrays, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_npz(f, arrays):
    # Like numpy.savez, minus its keyword-argument API (keys such as "file" would clash).
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


# --- selecting the weights -----------------------------------------------------------

def _is_array(value):
    return isinstance(value, (_Tensor, np.ndarray))


def _select_state(obj, path):
    """Descend through checkpoint wrappers to the dict that holds the tensors."""
    seen = set()
    while True:
        if not isinstance(obj, dict):
            raise WeightsFileError(
                f"{path}: expected a state_dict (a dict of tensors), found {_describe(obj)}",
                path=path,
            )
        if id(obj) in seen:
            raise WeightsFileError(f"{path}: checkpoint wrappers form a cycle", path=path)
        seen.add(id(obj))
        values = list(dict.values(obj))
        if values and all(_is_array(v) for v in values):
            return obj
        for key in WRAPPER_KEYS:
            inner = dict.get(obj, key)
            if isinstance(inner, dict):
                obj = inner
                break
        else:
            return obj


def _finalize(state, path):
    out = {}
    for key, value in dict.items(state):
        if not _is_array(value):
            continue  # epoch counters, strings, optimizer leftovers ...
        if not isinstance(key, str):
            raise WeightsFileError(f"{path}: state_dict key {key!r} is not a string", path=path)
        out[key] = value.array if isinstance(value, _Tensor) else value
    if not out:
        keys = ", ".join(repr(k) for k in list(dict.keys(state))[:10])
        raise WeightsFileError(
            f"{path}: no tensors found" + (f" (top-level keys: {keys})" if keys else ""),
            path=path,
        )
    while all(k.startswith(_DP_PREFIX) and len(k) > len(_DP_PREFIX) for k in out):
        out = {k[len(_DP_PREFIX):]: v for k, v in out.items()}
    return out


def _describe(obj):
    if isinstance(obj, _Tensor):
        return "a single tensor"
    return f"an object of type {type(obj).__name__}"


# --- safetensors ---------------------------------------------------------------------

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4,
                "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "C64": 8}


def _read_safetensors_header(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise _Corrupt(f"truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", first)
        if n > size - 8:
            raise _Corrupt(f"truncated safetensors file: header of {n} bytes declared, "
                           f"only {size - 8} bytes follow")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Corrupt(f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise _Corrupt("corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _Corrupt(f"corrupt safetensors header entry for {key!r}") from None
        if dtype not in _ST_ITEMSIZE:
            raise _Corrupt(f"tensor {key!r} has dtype {dtype}, which is not supported")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or type(begin) is not int or type(end) is not int or not 0 <= begin <= end):
            raise _Corrupt(f"corrupt safetensors header entry for {key!r}")
        if end > data_size:
            raise _Corrupt(f"truncated safetensors file: tensor {key!r} needs data up to byte "
                           f"{end}, but the data section has {data_size} bytes")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dtype]:
            raise _Corrupt(f"corrupt safetensors header: size of {key!r} does not match its shape")
        entries[key] = (dtype, tuple(shape), 8 + n + begin, end - begin)
    return entries


def _load_safetensors(path):
    entries = _read_safetensors_header(path)
    import safetensors.numpy

    bf16 = {k for k, (dtype, *_rest) in entries.items() if dtype == "BF16"}
    if not bf16:
        loaded = safetensors.numpy.load_file(path)
    else:  # safetensors.numpy cannot represent bf16 (TypeError); read those ourselves
        loaded = {}
        with safetensors.numpy.safe_open(path, framework="np") as f:
            for key in entries:
                if key not in bf16:
                    loaded[key] = f.get_tensor(key)
        with open(path, "rb") as f:
            for key in bf16:
                _, shape, start, nbytes = entries[key]
                f.seek(start)
                raw = f.read(nbytes)
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
                loaded[key] = (bits << 16).view(np.float32).reshape(shape)
    out = {}
    for key in entries:  # header (= data) order
        arr = np.asarray(loaded[key])
        if not (arr.flags.c_contiguous and arr.flags.writeable and arr.dtype.isnative):
            arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)
        out[key] = arr
    return out


# --- npz -----------------------------------------------------------------------------


def _load_npz(path):
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.ndarray):
        raise _Corrupt("this is a single .npy array, not an .npz archive of named arrays")
    with data:
        return {key: data[key] for key in data.files}
