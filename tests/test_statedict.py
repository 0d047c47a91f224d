"""Tests for kseg.statedict: torch-free, code-free loading of state_dicts."""

from __future__ import annotations

import os
import pickle
import shlex
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kseg.statedict import (
    UnsafeWeightsError,
    WeightsFileError,
    load_state_dict,
    save_state_dict,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _ref(t):
    """What load_state_dict must return for tensor t."""
    import torch

    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def _assert_same(loaded, reference):
    assert type(loaded) is dict
    assert list(loaded) == list(reference)
    for key, tensor in reference.items():
        expected = _ref(tensor)
        got = loaded[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
        assert got.flags.c_contiguous and got.flags.writeable, key


# --- a tiny pickle writer for hand-made, torch-like archives -------------------------


class G:
    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args


class PID:
    def __init__(self, *pid):
        self.pid = pid


def _emit(obj) -> bytes:
    if obj is None:
        return b"N"
    if obj is True:
        return b"\x88"
    if obj is False:
        return b"\x89"
    if isinstance(obj, int):
        n = max(1, (obj.bit_length() + 8) // 8)
        return b"\x8a" + bytes([n]) + obj.to_bytes(n, "little", signed=True)
    if isinstance(obj, str):
        raw = obj.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(obj, tuple):
        return b"(" + b"".join(_emit(x) for x in obj) + b"t"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_emit(k) + _emit(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, G):
        return f"c{obj.module}\n{obj.name}\n".encode()
    if isinstance(obj, Call):
        return _emit(obj.func) + _emit(tuple(obj.args)) + b"R"
    if isinstance(obj, PID):
        return _emit(tuple(obj.pid)) + b"Q"
    raise TypeError(obj)


def _pickle(obj) -> bytes:
    return b"\x80\x02" + _emit(obj) + b"."


def _tensor(key, storage, numel, offset, size, stride, *extra):
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        PID("storage", G("torch", storage), key, "cpu", numel),
        offset, size, stride, False, Call(G("collections", "OrderedDict")), *extra,
    )


def _write_torch_zip(path, pkl, storages=(), byteorder=b"little", archive="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr(f"{archive}/byteorder", byteorder)
        for key, raw in dict(storages).items():
            zf.writestr(f"{archive}/data/{key}", raw)
        zf.writestr(f"{archive}/version", b"3\n")
    return path


def _rewrite_zip(src, dst, *, drop=(), replace=None):
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if any(info.filename.endswith(d) for d in drop):
                continue
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info.filename, data)
    return dst


class _Gadget:
    """Unpickling this runs `command` through os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpenGadget:
    """Unpickling this creates `path` through builtins.open."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- real torch.save files -------------------------------------------------------------


def _small_net(torch):
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 5))
    net.train()
    for _ in range(3):  # real running stats and num_batches_tracked == 3
        net(torch.randn(2, 3, 6, 6))
    return net.state_dict()


def test_torch_sequential_exact(torch, tmp_path):
    sd = _small_net(torch)
    assert sd["1.num_batches_tracked"].dtype == torch.int64
    path = tmp_path / "net.pth"
    torch.save(sd, path)
    loaded = load_state_dict(path)
    _assert_same(loaded, sd)
    assert loaded["1.num_batches_tracked"].dtype == np.int64
    assert loaded["1.num_batches_tracked"].shape == ()
    assert loaded["1.num_batches_tracked"] == 3


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torch_pickle_protocols(torch, tmp_path, protocol):
    sd = _small_net(torch)
    sd["u16"] = torch.tensor([3, 60000], dtype=torch.uint16)
    sd["view"] = torch.randn(3, 2).t()
    path = tmp_path / f"p{protocol}.pth"
    torch.save(sd, path, pickle_protocol=protocol)
    _assert_same(load_state_dict(path), sd)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".PTH"])
def test_torch_suffixes(torch, tmp_path, suffix):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(sd, tmp_path / f"w{suffix}")
    _assert_same(load_state_dict(str(tmp_path / f"w{suffix}")), sd)


def test_torch_dtypes_and_scalars(torch, tmp_path):
    torch.manual_seed(1)
    param = torch.nn.Parameter(torch.randn(3))
    tagged = torch.nn.Parameter(torch.randn(2))
    tagged.tag = "extra python state"  # pickled via _rebuild_parameter_with_state
    sd = {
        "f32": torch.randn(2, 3),
        "f16": torch.randn(4, 2).half(),
        "bf16": torch.randn(3, 5).bfloat16(),
        "f64": torch.randn(3, dtype=torch.float64),
        "i64": torch.tensor([-(2**40), 7]),
        "i32": torch.tensor([-5, 6], dtype=torch.int32),
        "i16": torch.tensor([-300, 2], dtype=torch.int16),
        "i8": torch.tensor([-7, 3], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),  # lazy conj bit
        "neg": torch.randn(3)._neg_view(),  # lazy neg bit
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(9),
        "empty": torch.zeros(0, 3),
        "grad": torch.ones(2, requires_grad=True),
        "param": param,
        "tagged": tagged,
    }
    path = tmp_path / "dtypes.pt"
    torch.save(sd, path)
    loaded = load_state_dict(path)
    _assert_same(loaded, sd)
    assert loaded["bf16"].dtype == np.float32
    assert loaded["scalar"].shape == () and loaded["scalar"] == 2.5
    assert loaded["empty"].shape == (0, 3)


def test_torch_views_and_shared_storage(torch, tmp_path):
    torch.manual_seed(2)
    w = torch.randn(3, 4)
    base = torch.arange(12, dtype=torch.float32)
    sd = {
        "w": w,
        "wt": w.t(),  # non-contiguous view of the same storage as "w"
        "a": base[2:6],  # two slices sharing one storage
        "b": base[4:],
        "strided": base[1::3],
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "perm": torch.randn(2, 3, 4).permute(2, 0, 1),
    }
    assert not sd["wt"].is_contiguous()
    path = tmp_path / "views.pth"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zf:  # really shared: fewer storages than tensors
        assert len([n for n in zf.namelist() if "/data/" in n]) < len(sd)
    loaded = load_state_dict(path)
    _assert_same(loaded, sd)
    assert not np.shares_memory(loaded["a"], loaded["b"])
    loaded["a"][:] = -1  # independent, writable copies
    assert loaded["b"][0] == 4


@pytest.mark.parametrize("wrapper_key", ["state_dict", "model", "model_state_dict", "module"])
def test_checkpoint_wrappers(torch, tmp_path, wrapper_key):
    sd = _small_net(torch)
    path = tmp_path / "ckpt.ckpt"
    torch.save({"epoch": 3, "arch": "tiny", "best_acc": 0.5, "history": [1, 2],
                wrapper_key: sd}, path)
    _assert_same(load_state_dict(path), sd)


def test_nested_wrapper_and_dataparallel_prefix(torch, tmp_path):
    sd = _small_net(torch)
    dp = {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / "dp.pth"
    torch.save({"epoch": 7, "checkpoint_version": "1", "model": {"state_dict": dp}}, path)
    _assert_same(load_state_dict(path), sd)

    torch.save(dp, tmp_path / "dp_flat.pth")
    _assert_same(load_state_dict(tmp_path / "dp_flat.pth"), sd)


def test_partial_module_prefix_is_kept(torch, tmp_path):
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    torch.save(sd, tmp_path / "p.pth")
    assert list(load_state_dict(tmp_path / "p.pth")) == ["module.a", "b"]


def test_non_array_leaves_dropped_and_no_arrays_raises(torch, tmp_path):
    torch.save({"w": torch.ones(2), "epoch": 3, "name": "x"}, tmp_path / "mixed.pth")
    loaded = load_state_dict(tmp_path / "mixed.pth")
    assert list(loaded) == ["w"]

    path = tmp_path / "noarrays.pth"
    torch.save({"epoch": 3, "state_dict": {}}, path)
    with pytest.raises(WeightsFileError, match="no tensors") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_single_tensor_file_is_not_a_state_dict(torch, tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.ones(2), path)
    with pytest.raises(WeightsFileError, match="state_dict") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_float8_is_refused_clearly(torch, tmp_path):
    path = tmp_path / "f8.pt"
    torch.save({"x": torch.ones(2).to(torch.float8_e4m3fn)}, path)
    with pytest.raises(WeightsFileError, match="float8_e4m3fn") as exc:
        load_state_dict(path)
    assert not isinstance(exc.value, UnsafeWeightsError)
    assert str(path) in str(exc.value)


# --- hand-made archives (no torch needed) ----------------------------------------------


def test_handmade_archive_views_shared_and_big_endian(tmp_path):
    data = np.arange(12, dtype=np.float32)
    ints = np.array([5, -6], dtype=np.int64)
    obj = {
        "t": _tensor("0", "FloatStorage", 12, 0, (4, 3), (1, 4)),  # transposed view
        "a": _tensor("0", "FloatStorage", 12, 2, (4,), (1,)),
        "b": _tensor("0", "FloatStorage", 12, 4, (2, 2), (4, 1)),
        "i": _tensor("1", "LongStorage", 2, 0, (2,), (1,)),
        "s": _tensor("1", "LongStorage", 2, 1, (), ()),
        "h": _tensor("2", "BFloat16Storage", 2, 0, (2,), (1,)),
    }
    bf16 = np.array([1.5, -2.0], dtype=np.float32).view(np.uint32) >> 16
    expected = {
        "t": data.reshape(3, 4).T,
        "a": data[2:6],
        "b": np.array([[4, 5], [8, 9]], dtype=np.float32),
        "i": ints,
        "s": np.array(-6),
        "h": np.array([1.5, -2.0], dtype=np.float32),
    }
    for order, fmt in ((b"little", "<"), (b"big", ">")):
        storages = {
            "0": data.astype(fmt + "f4").tobytes(),
            "1": ints.astype(fmt + "i8").tobytes(),
            "2": bf16.astype(fmt + "u2").tobytes(),
        }
        path = _write_torch_zip(tmp_path / f"{order.decode()}.pth", _pickle(obj), storages,
                                byteorder=order)
        loaded = load_state_dict(path)
        assert list(loaded) == list(expected)
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype and loaded[key].dtype.isnative, key
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_handmade_out_of_bounds_view_is_refused(tmp_path):
    obj = {"x": _tensor("0", "FloatStorage", 4, 2, (10, 10), (1, 100))}
    path = _write_torch_zip(tmp_path / "oob.pth", _pickle(obj),
                            {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(WeightsFileError, match="exceeds storage") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_handmade_huge_broadcast_view_is_refused(tmp_path):
    obj = {"x": _tensor("0", "FloatStorage", 1, 0, (1 << 20, 1 << 20), (0, 0))}
    path = _write_torch_zip(tmp_path / "bcast.pth", _pickle(obj),
                            {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(WeightsFileError, match="expand") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("payload, match", [
    (b"\x80\x02Nr" + struct.pack("<I", 2**31) + b".", "memo"),  # memo-size bomb
    (b"\x80\x05\x96\x04\x00\x00\x00\x00\x00\x00\x00abcd.", "BYTEARRAY8"),
    (b"\x80\x02c" + b"collections\nOrderedDict\n)\x81.", "NEWOBJ"),
    (b"\x80\x02\x82\x01.", "EXT1"),
    (b"\x80\x02}X\xff\xff\xff\x7fabc.", "corrupt"),  # string longer than the pickle
])
def test_handmade_hostile_opcodes_are_refused(tmp_path, payload, match):
    path = _write_torch_zip(tmp_path / "ops.pth", payload)
    with pytest.raises(WeightsFileError, match=match) as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_handmade_storage_shorter_than_declared(tmp_path):
    obj = {"x": _tensor("0", "FloatStorage", 100, 0, (100,), (1,))}
    path = _write_torch_zip(tmp_path / "short.pth", _pickle(obj),
                            {"0": np.zeros(10, np.float32).tobytes()})
    with pytest.raises(WeightsFileError, match="data/0") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


# --- malicious pickles ---------------------------------------------------------------


def _assert_refused(path, marker, names):
    with pytest.raises(UnsafeWeightsError) as exc:
        load_state_dict(path)
    message = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert str(path) in message
    assert any(name in message for name in names), message
    assert exc.value.global_name in names
    assert not Path(marker).exists(), "the payload ran"


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_reduce_os_system_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"w": _Gadget(f"touch {shlex.quote(str(marker))}")}, protocol=protocol)
    assert b"system" in pkl
    path = _write_torch_zip(tmp_path / "evil.pth", pkl)
    _assert_refused(path, marker, ("os.system", "posix.system", "nt.system"))


def test_malicious_builtins_open_is_refused_and_payload_is_live(tmp_path):
    marker = tmp_path / "created_by_open"
    pkl = pickle.dumps({"w": _OpenGadget(str(marker))}, protocol=2)
    path = _write_torch_zip(tmp_path / "evil.pt", pkl)
    _assert_refused(path, marker, ("builtins.open", "io.open"))
    pickle.loads(pkl)["w"].close()  # control: the payload really would have run
    assert marker.exists()


def test_malicious_eval_hidden_in_tensor_args(tmp_path):
    marker = tmp_path / "eval_marker"
    evil = Call(G("builtins", "eval"), f"open({str(marker)!r}, 'w').close() or (1,)")
    obj = {"ok": _tensor("0", "FloatStorage", 1, 0, (1,), (1,)),
           "x": _tensor("0", "FloatStorage", 1, 0, evil, (1,))}
    path = _write_torch_zip(tmp_path / "eval.bin", _pickle(obj),
                            {"0": np.zeros(1, np.float32).tobytes()})
    _assert_refused(path, marker, ("builtins.eval",))


def test_malicious_object_inside_real_torch_save(torch, tmp_path):
    marker = tmp_path / "pwned_torch"
    path = tmp_path / "evil_real.pth"
    torch.save({"w": torch.ones(2), "evil": _Gadget(f"touch {shlex.quote(str(marker))}")}, path)
    _assert_refused(path, marker, ("os.system", "posix.system", "nt.system"))


def test_unknown_classes_are_refused(tmp_path):
    for i, (module, name) in enumerate([("torch", "QInt8Storage"),
                                        ("torch._utils", "_rebuild_sparse_tensor"),
                                        ("collections", "defaultdict"),
                                        ("torch._utils", "_rebuild_tensor_v2.__globals__")]):
        obj = {"x": Call(G(module, name))}
        path = _write_torch_zip(tmp_path / f"u{i}.pth", _pickle(obj))
        with pytest.raises(UnsafeWeightsError, match=f"'{module}.{name}'"):
            load_state_dict(path)


def test_full_model_pickle_is_refused_with_hint(torch, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeWeightsError, match=r"torch\.nn\.modules\.linear\.Linear") as exc:
        load_state_dict(path)
    assert "state_dict()" in str(exc.value)


# --- corrupt / truncated / legacy files ----------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9, 0.999])
def test_truncated_pth(torch, tmp_path, fraction):
    full = tmp_path / "full.pth"
    torch.save(_small_net(torch), full)
    raw = full.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(WeightsFileError) as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)
    assert not isinstance(exc.value, UnsafeWeightsError)


def test_corrupted_storage_bytes(torch, tmp_path):
    path = tmp_path / "flip.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 100] ^= 0xFF  # CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsFileError, match="data/0") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_missing_storage_member(torch, tmp_path):
    full = tmp_path / "full.pth"
    torch.save(_small_net(torch), full)
    path = _rewrite_zip(full, tmp_path / "missing.pth", drop=("/data/3",))
    with pytest.raises(WeightsFileError, match="data/3") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_missing_data_pkl_and_bad_byteorder(torch, tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"w": torch.ones(2)}, full)
    nopkl = _rewrite_zip(full, tmp_path / "nopkl.pth", drop=("data.pkl",))
    with pytest.raises(WeightsFileError, match="data.pkl") as exc:
        load_state_dict(nopkl)
    assert str(nopkl) in str(exc.value)
    badorder = _rewrite_zip(full, tmp_path / "order.pth", replace={"/byteorder": b"middle"})
    with pytest.raises(WeightsFileError, match="byteorder"):
        load_state_dict(badorder)


def test_garbage_pickle_in_zip(tmp_path):
    path = _write_torch_zip(tmp_path / "garbage.pth", b"\x80\x02}q\x00(X\x01")
    with pytest.raises(WeightsFileError) as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_legacy_torch_format(torch, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    with pytest.raises(WeightsFileError, match="legacy") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)
    assert "re-save" in str(exc.value).lower()


def test_plain_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned_plain"
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": _OpenGadget(str(marker))}, protocol=2))
    with pytest.raises(WeightsFileError, match="legacy") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)
    assert not marker.exists()


def test_empty_and_random_files(tmp_path):
    for name, content in (("empty.pth", b""), ("random.bin", b"\x00" + os.urandom(300))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsFileError) as exc:
            load_state_dict(path)
        assert str(path) in str(exc.value)


@pytest.mark.parametrize("name", ["weights.h5", "weights.onnx", "weights"])
def test_unknown_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"whatever")
    with pytest.raises(ValueError, match=r"\.safetensors") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)
    assert ".pth" in str(exc.value) and ".npz" in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.pth")


# --- safetensors and npz ---------------------------------------------------------------


def _sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        "half": rng.standard_normal(5).astype(np.float16),
        "double": rng.standard_normal((2, 2)),
        "ints": np.array([1, -2, 3], dtype=np.int32),
        "bytes": np.array([0, 255], dtype=np.uint8),
        "mask": np.array([True, False]),
        "fortran": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
        "empty": np.zeros((0, 2), np.float32),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip(tmp_path, suffix):
    arrays = _sample_arrays()
    path = tmp_path / f"w{suffix}"
    save_state_dict(arrays, path)
    loaded = load_state_dict(path)
    assert type(loaded) is dict
    assert set(loaded) == set(arrays)
    if suffix == ".npz":
        assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        assert loaded[key].flags.c_contiguous


def test_npz_keys_that_clash_with_savez_arguments(tmp_path):
    arrays = {"file": np.ones(1), "allow_pickle": np.zeros(2), "a/b.c": np.arange(3)}
    save_state_dict(arrays, tmp_path / "clash.npz")
    loaded = load_state_dict(tmp_path / "clash.npz")
    assert list(loaded) == list(arrays)
    np.testing.assert_array_equal(loaded["allow_pickle"], np.zeros(2))


def test_npz_written_by_numpy_and_pickled_npz_refused(tmp_path):
    np.savez_compressed(tmp_path / "np.npz", b=np.arange(3), a=np.ones((2, 2)))
    loaded = load_state_dict(tmp_path / "np.npz")
    assert list(loaded) == ["b", "a"]
    np.testing.assert_array_equal(loaded["a"], np.ones((2, 2)))

    obj = np.empty(1, dtype=object)
    obj[0] = {"x": 1}
    np.savez(tmp_path / "obj.npz", x=obj)
    with pytest.raises(WeightsFileError) as exc:
        load_state_dict(tmp_path / "obj.npz")
    assert "obj.npz" in str(exc.value)


def test_truncated_npz(tmp_path):
    save_state_dict(_sample_arrays(), tmp_path / "full.npz")
    raw = (tmp_path / "full.npz").read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsFileError) as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_safetensors_bf16_from_torch(torch, tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(3)
    sd = {"b": torch.randn(4, 3).bfloat16(), "f": torch.randn(2), "i": torch.arange(3),
          "a_scalar": torch.tensor(1.25).bfloat16()}
    path = tmp_path / "bf.safetensors"
    st_torch.save_file(sd, str(path))
    loaded = load_state_dict(path)
    assert set(loaded) == set(sd)
    for key, tensor in sd.items():
        expected = _ref(tensor)
        assert loaded[key].dtype == expected.dtype, key
        assert loaded[key].shape == expected.shape, key
        np.testing.assert_array_equal(loaded[key], expected, err_msg=key)
    assert loaded["b"].dtype == np.float32


def test_safetensors_module_prefix_stripped(tmp_path):
    save_state_dict({"module.a": np.ones(1), "module.b": np.zeros(1)}, tmp_path / "dp.safetensors")
    assert sorted(load_state_dict(tmp_path / "dp.safetensors")) == ["a", "b"]


@pytest.mark.parametrize("cut", ["header", "tail", "tiny"])
def test_cut_safetensors(tmp_path, cut):
    full = tmp_path / "full.safetensors"
    save_state_dict(_sample_arrays(), full)
    raw = full.read_bytes()
    size = {"header": 20, "tail": len(raw) - 5, "tiny": 4}[cut]
    path = tmp_path / f"cut_{cut}.safetensors"
    path.write_bytes(raw[:size])
    with pytest.raises(WeightsFileError) as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


def test_corrupt_safetensors_header(tmp_path):
    header = b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # no closing brace
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(WeightsFileError, match="header") as exc:
        load_state_dict(path)
    assert str(path) in str(exc.value)


# --- saving ----------------------------------------------------------------------------


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_state_dict({"a": np.ones(1)}, tmp_path / "w.pth")
    with pytest.raises(TypeError):
        save_state_dict({1: np.ones(1)}, tmp_path / "w.npz")
    with pytest.raises(TypeError):
        save_state_dict({"a": np.array([object()])}, tmp_path / "w.npz")
    assert list(tmp_path.iterdir()) == []


def test_save_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_state_dict({"a": np.ones(1)}, tmp_path / "w.npz")
    finally:
        os.umask(old)
    if os.name == "posix":
        assert (tmp_path / "w.npz").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_is_atomic(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"w{suffix}"
    save_state_dict({"old": np.ones(2)}, path)
    before = path.read_bytes()

    if suffix == ".npz":
        real = np.lib.format.write_array
        calls = []

        def failing_write(fp, arr, *args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise OSError("disk full")
            return real(fp, arr, *args, **kwargs)

        monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    else:
        import safetensors.numpy

        def failing_save(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a file")
            raise OSError("disk full")

        monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)

    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"a": np.zeros(3), "b": np.zeros(4)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- import hygiene --------------------------------------------------------------------


def _run(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_statedict_does_not_import_torch(torch, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(3.0)}, path)
    out = _run(
        "import sys, kseg.statedict as s\n"
        f"d = s.load_state_dict({str(path)!r})\n"
        "assert list(d) == ['w'] and d['w'].tolist() == [0.0, 1.0, 2.0], d\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.strip().splitlines()[-1] == "False"


def test_statedict_module_stands_alone(tmp_path):
    pth = _write_torch_zip(tmp_path / "w.pth",
                           _pickle({"w": _tensor("0", "FloatStorage", 2, 0, (2,), (1,))}),
                           {"0": np.array([1.5, 2.5], np.float32).tobytes()})
    npz = tmp_path / "w.npz"
    np.savez(npz, w=np.ones(2))
    package = REPO / "kseg" / "statedict"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sd', {str(package / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(package)!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['sd'] = mod; spec.loader.exec_module(mod)\n"
        f"assert mod.load_state_dict({str(pth)!r})['w'].tolist() == [1.5, 2.5]\n"
        f"assert mod.load_state_dict({str(npz)!r})['w'].tolist() == [1.0, 1.0]\n"
        "heavy = ('torch', 'tensorflow', 'keras', 'safetensors', 'kseg')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    assert _run(code).strip().splitlines()[-1] == "[]"
