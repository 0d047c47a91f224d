"""strategy(), mixed precision and XLA options; MirroredStrategy on 2 logical CPUs vs one replica."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.train import float32_outputs, set_precision, strategy


def test_single_cpu_gets_the_default_strategy_and_one_device_on_request(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    s = strategy()
    assert s is tf.distribute.get_strategy() and s.num_replicas_in_sync == 1
    assert not isinstance(s, tf.distribute.OneDeviceStrategy)  # 3x slower on the CPU (see strategy())
    one = strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy) and one.num_replicas_in_sync == 1


def test_bad_choices_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="strategy kind must be one of"):
        strategy("horovod")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        strategy()
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        strategy("multi_worker")
    with pytest.raises(ValueError, match="precision must be one of"):
        set_precision("float8")


def test_mixed_precision_keeps_logits_float32():
    import kseg

    set_precision("mixed_float16")
    try:
        model = kseg.build_model("deeplab_largefov", num_classes=3, input_shape=(33, 33, 3), width=0.125)
        assert model.outputs[0].dtype == "float16"
        wrapped = float32_outputs(model)
        assert wrapped.outputs[0].dtype == "float32"
        assert wrapped.get_layer("block1_conv1").compute_dtype == "float16"
        assert {id(w) for w in wrapped.weights} == {id(w) for w in model.weights}
    finally:
        set_precision("float32")
    assert float32_outputs(wrapped) is wrapped


def test_xla_option_compiles_and_trains(rng):
    from kseg.train import SparseCrossEntropy

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same")(inputs))
    model.compile("sgd", loss=SparseCrossEntropy(), jit_compile=True)
    x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, (4, 8, 8, 1)).astype(np.int32)
    hist = model.fit(x, y, epochs=2, verbose=0).history
    assert model.jit_compile and np.isfinite(hist["loss"]).all()


# The same training (a small conv net: BatchNorm would differ per replica by design) from the
# same initial weights and the same global batches, once on one
# device and once on 2 logical CPU devices (2 replicas, each half of every batch). The loss is
# a per-replica mean scaled by 1 / replicas, so the summed gradients equal the global mean's
# when no pixel is ignored (the labels here have none).
TRAIN = textwrap.dedent("""
    import os, sys, json
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    replicas = int(sys.argv[1])
    if replicas != 0:  # 0: one worker of a multi-worker cluster (TF_CONFIG set by the test)
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import kseg
    from kseg.train import SparseCrossEntropy, ConfusionMatrixMetric, multi_worker_fit, strategy
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, (16, 16, 16, 1)).astype("int32")
    if replicas == 0:
        s = strategy()  # "auto": TF_CONFIG names a cluster -> MultiWorkerMirroredStrategy
    elif replicas == 2:
        s = strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    else:
        s = strategy("one_device", devices=["/cpu:0"])
    with s.scope():
        # No BatchNorm (per-replica batch statistics differ by design) and no dropout.
        inputs = keras.Input((16, 16, 3))
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        h = keras.layers.Conv2D(8, 3, padding="same", dilation_rate=2, activation="relu")(h)
        model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(h))
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss=SparseCrossEntropy(),
                      metrics=[ConfusionMatrixMetric(3)])
        multi_worker_fit(model)  # a no-op except under MultiWorkerMirroredStrategy
    init = np.load(sys.argv[2], allow_pickle=True) if os.path.exists(sys.argv[2]) else None
    if init is None:
        np.save(sys.argv[2], np.array(model.get_weights(), dtype=object), allow_pickle=True)
    else:
        model.set_weights(list(init))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model.fit(ds, epochs=3, verbose=0)
    np.save(sys.argv[3], np.array(model.get_weights(), dtype=object), allow_pickle=True)
    print(json.dumps({"replicas": s.num_replicas_in_sync, "strategy": type(s).__name__}))
""")


def _run(script, *args):
    out = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mirrored_two_replicas_match_single_replica(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    init = tmp_path / "init.npy"
    assert _run(script, 1, init, tmp_path / "one.npy")["replicas"] == 1
    assert _run(script, 2, init, tmp_path / "two.npy")["replicas"] == 2
    one = np.load(tmp_path / "one.npy", allow_pickle=True)
    two = np.load(tmp_path / "two.npy", allow_pickle=True)
    start = np.load(init, allow_pickle=True)
    moved = max(float(np.abs(a - s).max()) for a, s in zip(one, start))
    assert moved > 1e-3  # training did change the weights
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


@pytest.mark.slow  # 16 s; the mirrored two-replica test runs the same distributed fit path by default
def test_two_local_workers_match_single_replica(tmp_path):
    # MultiWorkerMirroredStrategy with two real worker processes talking over 127.0.0.1: the same
    # global batches, split across the workers, must give the single-replica run's weights.
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    init = tmp_path / "init.npy"
    _run(script, 1, init, tmp_path / "one.npy")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen([sys.executable, str(script), "0", str(init), str(tmp_path / f"w{index}.npy")],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    try:
        for proc in workers:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in workers:
            proc.kill()
    # MultiWorkerMirroredStrategy is an alias of CollectiveAllReduceStrategy.
    assert all(r == {"replicas": 2, "strategy": "CollectiveAllReduceStrategy"} for r in results)
    one = np.load(tmp_path / "one.npy", allow_pickle=True)
    for index in range(2):
        for a, b in zip(one, np.load(tmp_path / f"w{index}.npy", allow_pickle=True)):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
