"""The conversion core and the TensorFlow/Keras formats: round trips, fresh-process loading,
legacy files, TF1 checkpoints, verification, the CLI, and bad input."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import kseg
from convert import api, formats, verify
from convert.cli import add_parser
from convert.io import OutputExistsError, atomic_output
from convert.keras_format import save_keras
from kseg.identity import build_metadata

SIZE = (64, 64)


@pytest.fixture(scope="module")
def segnet(tmp_path_factory):
    """SegNet-Basic (argmax pooling + unpooling, BatchNorm) saved by kseg as .h5 with metadata."""
    root = tmp_path_factory.mktemp("segnet")
    # Fixed weights: argmax pooling is discontinuous at ties, and unseeded weights (drawn from whatever
    # state the tests before left) once put two pooled values within float rounding, flipping an
    # unpooling position between the runtimes (5% of a frozen graph's outputs off by up to 0.04).
    keras.utils.set_random_seed(0)
    model = kseg.build_model("segnet_basic", num_classes=5)
    path = str(root / "segnet.h5")
    save_keras(model, path, metadata=build_metadata(model))
    x = verify.make_inputs((*SIZE, 3), build_metadata(model), seed=1)
    return model, path, x, model.predict(x, verbose=0)


def _weights(model):
    return {v.path: np.asarray(v) for v in model.weights}


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("middle", ["saved_model", "frozen_graph", "checkpoint", "tf_serving"])
def test_round_trip_ends_where_it_started(segnet, middle, tmp_path):
    model, src, x, y = segnet
    mid = str(tmp_path / ("mid" + formats.FORMATS[middle].suffix))
    api.convert(src, mid, to=middle, input_size=SIZE, export_size=SIZE if middle == "tf_serving" else None)
    back = str(tmp_path / "back.keras")
    report = api.convert(mid, back, input_size=SIZE)
    assert report["verification"]["passed"]
    again = keras.saving.load_model(back)
    assert _weights(again).keys() == _weights(model).keys()
    for path, value in _weights(model).items():
        np.testing.assert_array_equal(_weights(again)[path], value, err_msg=path)
    np.testing.assert_array_equal(again.predict(x, verbose=0), y)
    assert api.inspect(back)["metadata"]["architecture"] == "segnet_basic"


FRESH = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    kind, path, x_path, y_path = sys.argv[1:]
    x = np.load(x_path)
    if kind == "saved_model":
        fn = tf.saved_model.load(path).signatures["serving_default"]
        y = fn(image=tf.constant(x))["classifier"].numpy()
    else:
        gd = tf.compat.v1.GraphDef()
        gd.ParseFromString(open(path, "rb").read())
        graph = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(gd, name=""), [])
        y = graph.prune("image:0", "classifier:0")(tf.constant(x)).numpy()
    assert "kseg" not in sys.modules and "convert" not in sys.modules
    # TF's default Grappler folds BatchNorm into the frozen convs and oneDNN's kernels depend on
    # the CPU (AVX2 vs AVX-512): reassociated float32 sums through 8 7x7 convs (K <= 3136), measured
    # 6-7e-7 (AVX2/SSE4.1) and 2.1e-6 (AVX-512) of max|y|. ~84 eps of the scale, as convert's "tf":
    np.testing.assert_allclose(y, np.load(y_path), rtol=0, atol=1e-5 * max(1, np.abs(y).max()))
    print("OK", y.shape)
""")


@pytest.mark.parametrize("fmt", ["saved_model", "frozen_graph"])
def test_loads_in_a_fresh_process_without_kseg(segnet, fmt, tmp_path):
    _, src, x, y = segnet
    dst = str(tmp_path / ("m" + formats.FORMATS[fmt].suffix))
    api.convert(src, dst, to=fmt, input_size=SIZE)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, str(script), fmt, dst, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK (2, 64, 64, 5)" in out.stdout


def test_saved_model_signature_is_dynamic_and_tf_serving_layout(segnet, tmp_path):
    _, src, _, _ = segnet
    base = tmp_path / "models" / "segnet"
    api.convert(src, base, to="tf_serving", export_size=SIZE)  # predict_images resizes to 64x64
    api.convert(src, base, to="tf_serving", input_size=(33, 47), export_size=SIZE)
    assert sorted(os.listdir(base)) == ["1", "2"]  # the next free version, never an overwrite
    assert formats.detect(base) == "tf_serving"
    # The same export as `kseg export --serving`: image-level signatures plus the raw outputs.
    signatures = tf.saved_model.load(str(base / "2")).signatures
    assert set(signatures) == {"serving_default", "predict_images", "label_images", "raw_outputs"}
    for name, arg in [("raw_outputs", "image"), ("serving_default", "images")]:
        spec = signatures[name].structured_input_signature[1][arg]
        assert spec.shape.as_list() == [None, None, None, 3] and spec.dtype == tf.float32
    meta = json.loads((base / "2" / "assets" / "kseg.json").read_text())
    assert meta["architecture"] == "segnet_basic" and meta["build_kwargs"] == {"num_classes": 5}
    assert meta["preprocessing"] == kseg.get_spec("segnet_basic").preprocessing.to_dict()
    assert meta["outputs"] == ["classifier"] and meta["input_shape"] == [None, None, 3]
    assert meta["serving"]["task"] == "segmentation" and meta["serving"]["image_size"] == list(SIZE)


def test_tf_serving_of_a_model_without_preprocessing_keeps_its_own_outputs(tmp_path):
    # A plain Keras model: no kseg metadata, so no preprocessing to put in the graph.
    inputs = keras.Input((None, None, 3), name="image")
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same", name="score")(inputs))
    src = tmp_path / "plain.keras"
    model.save(src)
    with pytest.warns(UserWarning, match="preprocessing is unknown.*own outputs only"):
        report = api.convert(src, tmp_path / "models" / "plain", to="tf_serving", input_size=SIZE)
    assert report["verification"]["passed"]
    signatures = tf.saved_model.load(report["target"]["path"]).signatures
    assert set(signatures) == {"serving_default"}


def test_frozen_graph_has_no_variables_and_named_io(segnet, tmp_path):
    _, src, _, _ = segnet
    dst = tmp_path / "m.pb"
    api.convert(src, dst, input_size=SIZE)
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(dst.read_bytes())
    ops = {n.op for n in gd.node}
    assert not ops & {"VarHandleOp", "ReadVariableOp", "VariableV2"}
    names = {n.name for n in gd.node}
    assert {"image", "classifier"} <= names
    side = json.loads((tmp_path / "m.pb.kseg.json").read_text())
    assert side["graph"]["inputs"] == ["image:0"] and side["graph"]["outputs"] == ["classifier:0"]
    assert api.inspect(dst)["parameters"] == kseg.build_model("segnet_basic", num_classes=5).count_params()


def test_frozen_graph_reproduces_batchnorm_bit_for_bit(tmp_path):
    """Grappler's constant folding pushes BN's multipliers into the frozen conv filters; the
    verifying runner turns it off, so a frozen conv-BN stack equals Keras exactly."""
    from convert import frozen_graph

    keras.utils.set_random_seed(3)
    x = inputs = keras.Input((None, None, 3), name="image")
    for i in range(6):
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="score")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 3, c), rng.normal(0, 1, c), rng.normal(0, 1, c),
                               rng.uniform(0.01, 2, c)])
    path = tmp_path / "bn.pb"
    frozen_graph.save(model, path)
    ref = verify.keras_runner(model)
    x = rng.normal(0, 50, (2, 48, 48, 3)).astype("float32")
    exact = verify.verify(ref, frozen_graph.load(path), inputs=x)
    assert exact.passed and exact.outputs[0].max_abs == 0.0
    # The case it guards against: TF's default (folding) runtime is off by float rounding.
    folded = verify.verify(ref, frozen_graph.load(path, fold_constants=True), inputs=x)
    assert 0.0 < folded.outputs[0].max_abs < 1e-4 * max(1.0, float(np.abs(ref(x)[0]).max()))


# --- legacy and foreign Keras files -----------------------------------------------------


def _legacy_tfkeras_h5(model, path):
    """A full-model .h5 as tf.keras 2.x wrote it: Conv2DTranspose configs carry `groups`."""
    model.save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        count = 0
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Conv2DTranspose":
                layer["config"]["groups"] = 1
                count += 1
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.15.0"
    return count


def test_legacy_tfkeras_h5_with_conv2dtranspose_groups(tmp_path):
    model = kseg.build_model("hed")
    src = str(tmp_path / "hed_tfkeras.h5")
    assert _legacy_tfkeras_h5(model, src) == 4  # HED's four side-output deconvolutions
    with pytest.raises(TypeError, match="groups"):
        keras.saving.load_model(src)  # the trap: Keras 3 alone refuses the file
    report = api.convert(src, str(tmp_path / "hed.keras"), model="hed", input_size=SIZE)
    assert report["verification"]["passed"]
    x = verify.make_inputs((*SIZE, 3), build_metadata(model))
    again = keras.saving.load_model(tmp_path / "hed.keras")
    for a, b in zip(again.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)
    assert api.inspect(tmp_path / "hed.keras")["metadata"]["architecture"] == "hed"


def test_lambda_layers_need_unsafe(tmp_path):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.Conv2D(2, 1)(inputs)))
    src = str(tmp_path / "lambda.h5")
    model.save(src)
    with pytest.raises(ValueError, match="unsafe"):
        api.convert(src, str(tmp_path / "out.keras"))
    assert not os.listdir(tmp_path) == [] and not (tmp_path / "out.keras").exists()
    report = api.convert(src, str(tmp_path / "out_sm"), unsafe=True)
    assert report["verification"]["passed"]


def test_weights_h5_needs_the_right_architecture(segnet, tmp_path):
    model, src, _, _ = segnet
    weights = str(tmp_path / "segnet.weights.h5")
    model.save_weights(weights)  # plain Keras weights, no kseg metadata
    with pytest.raises(ValueError, match="--model"):
        api.convert(weights, str(tmp_path / "a.keras"))
    with pytest.raises(ValueError, match=r"segnet\.weights\.h5.*do not fit"):
        api.convert(weights, str(tmp_path / "b.keras"), model="segnet_basic")  # 11 classes, file has 5
    report = api.convert(weights, str(tmp_path / "c.keras"), model="segnet_basic",
                         build_kwargs={"num_classes": 5}, input_size=SIZE)
    assert report["verification"]["passed"]
    assert not (tmp_path / "a.keras").exists() and not (tmp_path / "b.keras").exists()


def test_keras_layout_resnet_has_no_torchvision_state_dict(tmp_path):
    # ResNet's keras layout (v1: stride on the 1x1 conv, conv biases) is not torchvision's v1.5.
    model = kseg.build_model("resnet50", include_top=False)
    src = str(tmp_path / "r50.h5")
    save_keras(model, src, metadata=build_metadata(model))
    with pytest.raises(ValueError, match=r"layout.*'keras'.*not torchvision's network.*'torchvision'"):
        api.convert(src, tmp_path / "r50.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["r50.h5"]


def test_checkpoint_of_another_architecture_is_refused(segnet, tmp_path):
    _, src, _, _ = segnet
    prefix = str(tmp_path / "ckpt")
    api.convert(src, prefix, to="checkpoint", input_size=SIZE)
    assert formats.detect(prefix) == "checkpoint"
    with pytest.raises(ValueError, match=r"ckpt.*does not fit"):
        api.load_keras(prefix, model="segnet_basic", build_kwargs={"num_classes": 7})


# --- TF1 name-based checkpoints (slim vgg_16) --------------------------------------------


def _slim_vgg16_checkpoint(prefix, rng, fc=False):
    """A TF1 checkpoint with slim's vgg_16 variable names, written by tf.compat.v1.train.Saver."""
    from kseg.models.vgg import CFGS

    arrays, cin = {}, 3
    for b, convs in enumerate(CFGS["D"], start=1):
        for c, filters in enumerate(convs, start=1):
            scope = f"vgg_16/conv{b}/conv{b}_{c}"
            arrays[f"{scope}/weights"] = rng.normal(0, np.sqrt(2 / (9 * cin)), (3, 3, cin, filters)).astype("float32")
            arrays[f"{scope}/biases"] = rng.normal(0, 0.01, filters).astype("float32")
            cin = filters
    if fc:
        for name, shape in (("fc6", (7, 7, 512, 4096)), ("fc7", (1, 1, 4096, 4096)), ("fc8", (1, 1, 4096, 1000))):
            fan_in = np.prod(shape[:3])
            arrays[f"vgg_16/{name}/weights"] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype("float32")
            arrays[f"vgg_16/{name}/biases"] = rng.normal(0, 0.01, shape[-1]).astype("float32")
    with tf.Graph().as_default():
        variables = [tf.compat.v1.get_variable(k, initializer=v) for k, v in arrays.items()]
        tf.compat.v1.get_variable("global_step", initializer=np.int64(1000))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix, write_meta_graph=False)
    assert len(variables) == len(arrays)
    return arrays


def _slim_reference(arrays, rgb, fc=False):
    """slim's vgg_16 forward pass on RGB images minus the mean, straight from the checkpoint arrays."""
    from kseg.models.vgg import CFGS

    x = tf.constant(rgb - np.array([123.68, 116.78, 103.94], "float32"))
    for b, convs in enumerate(CFGS["D"], start=1):
        for c in range(1, len(convs) + 1):
            scope = f"vgg_16/conv{b}/conv{b}_{c}"
            x = tf.nn.relu(tf.nn.conv2d(x, arrays[f"{scope}/weights"], 1, "SAME") + arrays[f"{scope}/biases"])
        x = tf.nn.max_pool2d(x, 2, 2, "VALID")
    if fc:
        for name, act in (("fc6", True), ("fc7", True), ("fc8", False)):
            x = tf.nn.conv2d(x, arrays[f"vgg_16/{name}/weights"], 1, "VALID") + arrays[f"vgg_16/{name}/biases"]
            x = tf.nn.relu(x) if act else x
        x = tf.squeeze(x, [1, 2])
    return x.numpy()


def test_tf1_slim_vgg16_checkpoint_initialises_the_vgg16_trunk(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "vgg_16.ckpt")
    arrays = _slim_vgg16_checkpoint(prefix, rng)
    assert formats.detect(prefix) == "tf1_checkpoint"
    model = api.load_keras(prefix, model="vgg16", build_kwargs={"include_top": False})
    rgb = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    spec = kseg.get_spec("vgg16")
    ours = model.predict(spec.preprocessing.apply(rgb), verbose=0)  # kseg's Caffe BGR preprocessing
    ref = _slim_reference(arrays, rgb)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # ...and as a backbone: SegNet's encoder takes the 13 convs by name.
    segnet = api.load_keras(prefix, model="segnet")
    np.testing.assert_array_equal(segnet.get_layer("block3_conv2").get_weights()[0],
                                  arrays["vgg_16/conv3/conv3_2/weights"])
    # and it converts like any other source
    report = api.convert(prefix, str(tmp_path / "vgg16.keras"), model="vgg16", build_kwargs={"include_top": False},
                         input_size=SIZE)
    assert report["verification"]["passed"] and report["source"]["format"] == "tf1_checkpoint"


@pytest.mark.slow
def test_tf1_slim_vgg16_checkpoint_full_classifier(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "vgg_16.ckpt")
    arrays = _slim_vgg16_checkpoint(prefix, rng, fc=True)
    model = api.load_keras(prefix)  # the layout names its classifier: vgg16
    rgb = rng.uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    ours = model.predict(kseg.get_spec("vgg16").preprocessing.apply(rgb), verbose=0)
    ref = _slim_reference(arrays, rgb, fc=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    fcn = api.load_keras(prefix, model="fcn8s")  # fc6/fc7 convolutionalised back
    np.testing.assert_array_equal(fcn.get_layer("fc6").get_weights()[0], arrays["vgg_16/fc6/weights"])


def test_tf1_checkpoint_missing_tensors_are_named(tmp_path):
    prefix = str(tmp_path / "partial.ckpt")
    with tf.Graph().as_default():
        tf.compat.v1.get_variable("vgg_16/conv1/conv1_1/weights", initializer=np.zeros((3, 3, 3, 64), "float32"))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as s:
            s.run(tf.compat.v1.global_variables_initializer())
            saver.save(s, prefix, write_meta_graph=False)
    with pytest.raises(ValueError, match=r"partial\.ckpt.*vgg_16/conv1/conv1_1/biases"):
        api.load_keras(prefix, model="vgg16", build_kwargs={"include_top": False})


# --- verification ---------------------------------------------------------------------


def test_verify_reports_differences_and_near_ties():
    x = np.zeros((1, 4, 4, 3), "float32")
    ref = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype("float32")
    same = verify.Runner(lambda _: [ref], (4, 4, 3))
    off = verify.Runner(lambda _: [ref + 1e-3], (4, 4, 3), runtime="onnxruntime")
    report = verify.verify(same, verify.Runner(lambda _: [ref.copy()], (4, 4, 3)), inputs=x)
    assert report.passed and report.kind == "tf" and report.outputs[0].max_abs == 0
    bad = verify.verify(same, off, inputs=x)
    assert bad.kind == "runtime" and not bad.passed
    assert bad.outputs[0].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert json.loads(bad.to_json())["passed"] is False
    # A swapped argmax where the scores are far apart fails even at full agreement elsewhere.
    swapped = ref.copy()
    swapped[0, 0, 0] = swapped[0, 0, 0][::-1] * 10
    r = verify.verify(same, verify.Runner(lambda _: [swapped], (4, 4, 3)), inputs=x, tolerance="runtime")
    assert not r.passed and r.outputs[0].argmax_agreement < 1


def test_verification_failure_writes_nothing(segnet, tmp_path):
    _, src, _, _ = segnet
    with pytest.raises(api.VerificationError) as info:
        api.convert(src, str(tmp_path / "m.pb"), input_size=SIZE, tolerance={"atol": -1.0})
    assert not info.value.report.passed
    assert os.listdir(tmp_path) == []


# --- bad input and atomic output ---------------------------------------------------------


def test_truncated_h5_is_a_clear_error(segnet, tmp_path):
    _, src, _, _ = segnet
    bad = tmp_path / "cut.h5"
    bad.write_bytes(open(src, "rb").read()[:5000])
    with pytest.raises(ValueError, match=r"cut\.h5"):
        api.convert(str(bad), str(tmp_path / "out.keras"))
    assert sorted(os.listdir(tmp_path)) == ["cut.h5"]


def test_directory_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "notsm").mkdir()
    (tmp_path / "notsm" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notsm.*not a SavedModel"):
        api.convert(str(tmp_path / "notsm"), str(tmp_path / "out.keras"))


def test_existing_output_needs_force(segnet, tmp_path):
    _, src, _, _ = segnet
    dst = tmp_path / "m.pb"
    dst.write_text("precious")
    with pytest.raises(OutputExistsError, match=r"m\.pb"):
        api.convert(src, str(dst), input_size=SIZE)
    assert dst.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["m.pb"]
    api.convert(src, str(dst), input_size=SIZE, force=True)
    assert formats.detect(dst) == "frozen_graph"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".kseg-tmp-")]


def test_atomic_output_removes_temporaries_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "x.ckpt") as tmp:
            open(tmp + ".index", "w").close()
            raise RuntimeError("writer died")
    assert os.listdir(tmp_path) == []


# --- CLI ------------------------------------------------------------------------------


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kseg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_verify_inspect(segnet, tmp_path, capsys):
    _, src, _, _ = segnet
    dst = str(tmp_path / "m_sm")
    assert _cli(["convert", src, "--to", "saved_model", "-o", dst, "--input-size", "64x64"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert _cli(["verify", src, dst, "--input-size", "48x40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["input_shape"] == [2, 48, 40, 3]
    other = str(tmp_path / "other.h5")
    m = kseg.build_model("segnet_basic", num_classes=5)
    save_keras(m, other, metadata=build_metadata(m))
    assert _cli(["verify", src, other, "--input-size", "32x32"]) == 1  # other weights: beyond tolerance
    capsys.readouterr()
    assert _cli(["inspect", dst]) == 0
    out = capsys.readouterr().out
    assert "saved_model" in out and "segnet_basic" in out and f"{m.count_params():,}" in out
    with pytest.raises(ValueError, match="--force"):
        _cli(["convert", src, "--to", "saved_model", "-o", dst])


@pytest.mark.slow
def test_full_size_fcn8s_to_frozen_graph_and_back(tmp_path):
    """134M parameters: a ~540 MB GraphDef (under protobuf's 2 GB limit) and back to .keras by name."""
    model = kseg.build_model("fcn8s")
    src = str(tmp_path / "fcn8s.h5")
    save_keras(model, src, metadata=build_metadata(model))
    report = api.convert(src, str(tmp_path / "fcn8s.pb"), input_size=(128, 128))
    assert report["verification"]["passed"], report["summary"]
    assert api.inspect(tmp_path / "fcn8s.pb")["parameters"] == kseg.get_spec("fcn8s").params == 134_489_759
    back = api.convert(str(tmp_path / "fcn8s.pb"), str(tmp_path / "fcn8s.keras"), input_size=(128, 128))
    assert back["verification"]["passed"]
