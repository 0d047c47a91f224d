"""PyTorch's zip checkpoints (torch.save since torch 1.6), read without torch and without running code.

The pickle inside is scanned opcode by opcode, then unpickled with a restricted Unpickler that
admits only the globals tensor rebuilding needs, each mapped to a NumPy stand-in; see
kseg.statedict for the policy.
"""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np

from ._common import (
    _MAX_EXPANSION_BYTES,
    _MAX_NDIM,
    UnsafeWeightsError,
    WeightsFileError,
    _Corrupt,
    _Tensor,
)


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
