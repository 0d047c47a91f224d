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
naming the file and the problem.  This module imports only the standard
library and NumPy, so it can be used on its own.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
import struct
import zipfile

import numpy as np

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
_MAX_NDIM = 64
# A saved broadcast view (stride 0) is materialized; refuse absurd expansions.
_MAX_EXPANSION_BYTES = 1 << 30


class WeightsFileError(ValueError):
    """A weights file is missing parts, truncated, corrupt or of an unsupported kind."""

    def __init__(self, message, *, path=None):
        super().__init__(message)
        self.path = path


class UnsafeWeightsError(WeightsFileError):
    """The pickle inside a torch file references a global that is not needed for tensors.

    Raised before that global could be called; ``global_name`` is e.g. ``"posix.system"``.
    """

    def __init__(self, message, *, path=None, global_name=None):
        super().__init__(message, path=path)
        self.global_name = global_name


class _Corrupt(Exception):
    """Internal: raised inside the readers, re-raised as WeightsFileError with the path."""


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


class _Tensor:
    """Result of rebuilding one tensor; unwrapped to its ndarray at the end."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __setstate__(self, state):
        raise _Corrupt("malformed pickle: BUILD applied to a tensor")


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


# --- PyTorch zip files ---------------------------------------------------------------


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. (and ``torch.storage.UntypedStorage``)."""

    __slots__ = ("name", "dtype", "itemsize")

    def __init__(self, name, dtype):
        self.name = name
        # None: untyped (sized in bytes); "bfloat16": raw uint16 bits
        self.dtype = dtype if dtype is None or dtype == "bfloat16" else np.dtype(dtype)
        self.itemsize = 1 if dtype is None else 2 if dtype == "bfloat16" else self.dtype.itemsize

    def __setstate__(self, state):
        raise _Corrupt(f"malformed pickle: BUILD applied to {self.name}")

    def __repr__(self):
        return f"<storage type {self.name}>"


class _TorchDType:
    """Stand-in for a ``torch.<dtype>`` object (written by ``_rebuild_tensor_v3``)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype  # numpy dtype, "bfloat16", or None (no numpy equivalent)

    def __setstate__(self, state):
        raise _Corrupt(f"malformed pickle: BUILD applied to torch.{self.name}")


class _Storage:
    """One storage read from ``<archive>/data/<key>``."""

    __slots__ = ("type", "key", "nbytes", "raw")

    def __init__(self, storage_type, key, nbytes, raw):
        self.type = storage_type
        self.key = key
        self.nbytes = nbytes
        self.raw = raw

    def __setstate__(self, state):
        raise _Corrupt(f"malformed pickle: BUILD applied to storage {self.key!r}")


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict`` (dicts keep order; BUILD state such as
    torch's ``_metadata`` is ignored)."""

    __slots__ = ()

    def __setstate__(self, state):
        pass


# Typed storages, as written by torch.save for every dtype that has one.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

# torch.<dtype> names.  Only _rebuild_tensor_v3 (torch >= 2.1, for dtypes without a
# typed storage) puts dtypes into the pickle; all are harmless constants, those
# without a NumPy equivalent are refused when a tensor is rebuilt with them.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32,
    "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16,
    "bfloat16": "bfloat16",
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "complex32": None, "chalf": None,
    "float8_e5m2": None, "float8_e4m3fn": None, "float8_e5m2fnuz": None,
    "float8_e4m3fnuz": None, "float8_e8m0fnu": None, "float4_e2m1fn_x2": None,
    "bits8": None, "bits16": None, "bits1x8": None, "bits2x4": None, "bits4x2": None,
    "qint8": None, "quint8": None, "qint32": None, "quint4x2": None, "quint2x4": None,
}

# Functions admitted from torch._utils, mapped to methods of _TorchZipReader.
_ALLOWED_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "_rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter_with_state",
}


_STORAGE_TYPES = {("torch", name): _StorageType(f"torch.{name}", dt)
                  for name, dt in _STORAGE_DTYPES.items()}
# torch >= 2.1 pickles tensors of dtypes without a typed storage (uint16, float8, ...)
# as _rebuild_tensor_v3(UntypedStorage, ..., dtype).
_STORAGE_TYPES[("torch.storage", "UntypedStorage")] = _StorageType(
    "torch.storage.UntypedStorage", None)
_DTYPE_OBJECTS = {("torch", name): _TorchDType(name, dt) for name, dt in _TORCH_DTYPES.items()}


def _global_hint(module, name):
    if module.startswith(("torch.nn", "torchvision", "__main__", "timm", "segmentation_models")):
        return (" The file seems to contain a pickled model object; re-save only its "
                "weights with torch.save(model.state_dict(), path).")
    if module.startswith("torch") or module in ("numpy", "numpy.core.multiarray", "_codecs"):
        return (" Only plain (nested) dicts of tensors are supported; re-save with "
                "torch.save(model.state_dict(), path).")
    return ""


def _refuse_global(module, name, path):
    raise UnsafeWeightsError(
        f"{path}: refusing to load: its pickle references the global "
        f"'{module}.{name}', which is not needed to rebuild tensors and could run "
        f"code; nothing was executed.{_global_hint(module, name)}",
        path=path,
        global_name=f"{module}.{name}",
    )


def _is_allowed_global(module, name):
    key = (module, name)
    return (key == ("collections", "OrderedDict") or key in _ALLOWED_FUNCTIONS
            or key in _STORAGE_TYPES or key in _DTYPE_OBJECTS)


# Opcodes a state_dict pickle may use (torch.save writes protocol 2 by default; 3-5
# with pickle_protocol=...).  Left out: object construction that bypasses REDUCE
# (INST, OBJ, NEWOBJ, NEWOBJ_EX), the extension registry (EXT1/2/4) and protocol-5
# out-of-band buffers (BYTEARRAY8, NEXT_BUFFER, READONLY_BUFFER).
_SAFE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8
    UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET
    GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE
    GLOBAL STACK_GLOBAL REDUCE BUILD PERSID BINPERSID
""".split())
_MEMO_OPCODES = frozenset("GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT".split())


def _scan_pickle(data, path):
    """Check every opcode before unpickling: only known opcodes, memo indices that
    cannot make the unpickler allocate far beyond the pickle's size, and (for
    GLOBAL) only admitted names.  STACK_GLOBAL is checked again in find_class."""
    import pickletools

    ops = 0
    try:
        for opcode, arg, pos in pickletools.genops(data):
            ops += 1
            if opcode.name not in _SAFE_OPCODES:
                raise _Corrupt(f"pickle opcode {opcode.name} at byte {pos} is not allowed "
                               "in a state_dict")
            if opcode.name in _MEMO_OPCODES and not 0 <= int(arg) <= len(data):
                raise _Corrupt(f"malformed pickle: memo index {arg} at byte {pos}")
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if not _is_allowed_global(module, name):
                    _refuse_global(module, name, path)
    except WeightsFileError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise _Corrupt(f"corrupt data.pkl ({e})") from None
    return ops


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data, reader):
        super().__init__(io.BytesIO(data))
        self._reader = reader

    def find_class(self, module, name):
        key = (module, name)
        if not _is_allowed_global(module, name):
            _refuse_global(module, name, self._reader.path)
        if key == ("collections", "OrderedDict"):
            return _OrderedDict
        if key in _ALLOWED_FUNCTIONS:
            return getattr(self._reader, _ALLOWED_FUNCTIONS[key])
        if key in _STORAGE_TYPES:
            return _STORAGE_TYPES[key]
        return _DTYPE_OBJECTS[key]

    def persistent_load(self, pid):
        return self._reader.persistent_load(pid)


def _check_int(value, what):
    if type(value) is not int:
        raise _Corrupt(f"malformed tensor record: {what} is {value!r}, not an int")
    return value


def _check_shape(value, what):
    if not isinstance(value, tuple) or len(value) > _MAX_NDIM:
        raise _Corrupt(f"malformed tensor record: {what} is {value!r}, not a tuple of ints")
    for v in value:
        if type(v) is not int or v < 0:
            raise _Corrupt(f"malformed tensor record: {what} {value!r} has an invalid entry")
    return value


class _TorchZipReader:
    def __init__(self, path, zf):
        self.path = path
        self.zf = zf
        names = zf.namelist()
        self.prefix = self._find_prefix(names)
        members = set(names)
        if (f"{self.prefix}constants.pkl" in members
                or any(n.startswith(f"{self.prefix}code/") for n in names)):
            raise _Corrupt("this is a TorchScript archive (torch.jit.save), not a state_dict; "
                           "save the weights with torch.save(model.state_dict(), path)")
        byteorder = f"{self.prefix}byteorder"
        if byteorder in members:
            mark = zf.read(byteorder).strip()
            if mark not in (b"little", b"big"):
                raise _Corrupt(f"invalid byteorder record {mark[:20]!r}")
            self.endian = "<" if mark == b"little" else ">"
        else:
            self.endian = "<"  # torch's default for files without the record
        self.storages = {}

    def _find_prefix(self, names):
        if not names:
            raise _Corrupt("empty zip archive, not a torch.save checkpoint")
        first = names[0]
        candidates = []
        if "/" in first:
            candidates.append(first.split("/", 1)[0] + "/")
        candidates += [n[: -len("data.pkl")] for n in names
                       if n.endswith("/data.pkl") and n.count("/") == 1]
        for prefix in candidates:
            if f"{prefix}data.pkl" in names:
                return prefix
        if "data.pkl" in names:
            return ""
        raise _Corrupt("zip archive without '<archive>/data.pkl': not a torch.save checkpoint "
                       f"(or a member is missing); members: {', '.join(names[:5])}"
                       + (", ..." if len(names) > 5 else ""))

    def load(self):
        data = self.zf.read(f"{self.prefix}data.pkl")
        _scan_pickle(data, self.path)
        return _RestrictedUnpickler(data, self).load()

    # persistent ids: ('storage', storage_type, key, location, numel)
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Corrupt(f"malformed pickle: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Corrupt(f"malformed pickle: storage type {storage_type!r:.80}")
        if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
            raise _Corrupt(f"malformed pickle: storage key {key!r:.80}")
        _check_int(numel, "storage size")
        if numel < 0:
            raise _Corrupt(f"malformed pickle: negative storage size {numel}")
        itemsize = storage_type.itemsize
        cached = self.storages.get(key)
        if cached is None:
            name = f"{self.prefix}data/{key}"
            try:
                raw = self.zf.read(name)
            except KeyError:
                raise _Corrupt(f"missing zip member '{name}' (storage {key!r}); "
                               "the file is incomplete") from None
            except Exception as e:
                raise _Corrupt(f"cannot read zip member '{name}' ({type(e).__name__}: {e}); "
                               "the file is corrupt or truncated") from None
            cached = self.storages[key] = raw
        if len(cached) < numel * itemsize:
            raise _Corrupt(f"storage '{self.prefix}data/{key}' holds {len(cached)} bytes, "
                           f"expected {numel * itemsize}; the file is corrupt or truncated")
        return _Storage(storage_type, key, numel * itemsize, cached)

    def _build(self, storage, offset, size, stride, dtype, metadata, dtype_name):
        if not isinstance(storage, _Storage):
            raise _Corrupt(f"malformed tensor record: storage is {storage!r:.80}")
        _check_int(offset, "storage offset")
        _check_shape(size, "size")
        _check_shape(stride, "stride")
        if len(size) != len(stride) or offset < 0:
            raise _Corrupt(
                f"malformed tensor record: size {size}, stride {stride}, offset {offset}")
        bf16 = isinstance(dtype, str) and dtype == "bfloat16"
        dt = np.dtype(np.uint16 if bf16 else dtype)
        dt_file = dt.newbyteorder(self.endian) if dt.itemsize > 1 else dt
        avail = storage.nbytes // dt.itemsize  # elements in the storage
        if 0 in size:
            arr = np.zeros(size, dtype=dt)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= avail:
                raise _Corrupt(
                    f"tensor view (offset {offset}, size {size}, stride {stride}) exceeds "
                    f"storage {storage.key!r} of {avail} {dtype_name} elements")
            nelem = 1
            for n in size:
                nelem *= n
            if nelem > avail and nelem * dt.itemsize > _MAX_EXPANSION_BYTES:
                raise _Corrupt(
                    f"tensor view (size {size}, stride {stride}) would expand storage "
                    f"{storage.key!r} of {avail} elements to {nelem}; refusing")
            flat = np.frombuffer(storage.raw, dtype=dt_file, count=avail)
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=tuple(s * dt.itemsize for s in stride),
                writeable=False)
            if dt == np.bool_:
                arr = np.array(view.view(np.uint8) != 0, order="C")
            else:
                arr = np.array(view, dtype=dt.newbyteorder("="), order="C", copy=True)
        if bf16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if metadata:
            if not isinstance(metadata, dict):
                raise _Corrupt(f"malformed tensor metadata {metadata!r:.80}")
            if metadata.get("neg"):
                arr = np.negative(arr)
            if metadata.get("conj"):
                arr = np.conj(arr)
        return _Tensor(arr)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride,
                           requires_grad=False, backward_hooks=None, metadata=None):
        if not isinstance(storage, _Storage) or storage.type.dtype is None:
            raise _Corrupt(f"malformed tensor record: _rebuild_tensor_v2 on {storage!r:.80}")
        return self._build(storage, storage_offset, size, stride, storage.type.dtype,
                           metadata, storage.type.name)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride,
                           requires_grad, backward_hooks, dtype, metadata=None):
        if not isinstance(dtype, _TorchDType):
            raise _Corrupt(f"malformed tensor record: dtype {dtype!r:.80}")
        if dtype.dtype is None:
            raise _Corrupt(f"tensor dtype torch.{dtype.name} has no NumPy equivalent "
                           "and is not supported")
        if not isinstance(storage, _Storage):
            raise _Corrupt(f"malformed tensor record: storage is {storage!r:.80}")
        return self._build(storage, storage_offset, size, stride, dtype.dtype,
                           metadata, f"torch.{dtype.name}")

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        if not isinstance(data, _Tensor):
            raise _Corrupt(f"malformed parameter record: data is {data!r:.80}")
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self._rebuild_parameter(data, requires_grad, backward_hooks)


def _load_torch(path, head):
    if not head.startswith(b"PK"):
        if not head:
            raise _Corrupt("the file is empty")
        if head.startswith(b"\x80"):
            raise _Corrupt(
                "this is a legacy (pre-1.6, non-zip) PyTorch file or a plain pickle, which is "
                "not supported (and is never unpickled). Re-save it with a newer torch: "
                "torch.save(torch.load(old_path, weights_only=True), new_path), "
                "or convert it to .safetensors")
        if len(head) >= 9 and head[8:9] == b"{":
            raise _Corrupt("this looks like a safetensors file; rename it to *.safetensors")
        raise _Corrupt("not a PyTorch zip checkpoint (unrecognized content)")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise _Corrupt(f"truncated or corrupt PyTorch zip archive ({e})") from None
    with zf:
        return _TorchZipReader(path, zf).load()


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
