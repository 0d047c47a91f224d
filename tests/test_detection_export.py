"""SSD300 through every format with its NMS inside: ONNX (dynamic batch, ONNX NonMaxSuppression,
run in ONNX Runtime), TFLite (builtin ops only, NON_MAX_SUPPRESSION_V5), SavedModel, frozen .pb and
.keras, each verified against Keras on the raw outputs and on the detections as sets.

A width-reduced SSD300 (width=0.125, the same 8,732 anchors and decoder) keeps this in the fast
suite; the full-size model goes through the same paths in test_convert_onnx / test_convert_tflite
(slow)."""

import keras
import numpy as np
import pytest

import kseg
from convert.api import convert
from convert.verify import Runner, keras_runner, make_inputs, verify
from kseg import identity as md
from kseg.api import DETECTION_OUTPUTS, deployment_model
from kseg.cli import main

OUTPUTS = ["mbox_loc", "mbox_conf", *DETECTION_OUTPUTS]


@pytest.fixture(scope="module")
def ssd(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = kseg.build_model("ssd300", width=0.125)
    path = str(tmp_path_factory.mktemp("ssd") / "ssd.keras")
    model.save(path)
    return model, path


def _inputs(model, batch):
    return make_inputs(model.input_shape[1:], md.build_metadata(model), batch=batch, seed=batch)


def _detections_pass(report):
    names = [o.name for o in report.outputs]
    assert names == OUTPUTS, names
    assert report.passed, report.summary()
    boxes = report.outputs[names.index("detection_boxes")]
    assert "0 unmatched" in boxes.note and boxes.max_abs <= 0.3
    return report


def test_deployment_model_appends_named_detections(ssd):
    model, _ = ssd
    deployed = deployment_model(model)
    assert deployed.output_names == OUTPUTS
    assert md.model_info(deployed) == md.model_info(model) and deployed.count_params() == model.count_params()
    lenet = kseg.build_model("lenet5")
    assert deployment_model(lenet) is lenet  # other models: unchanged
    decoding = kseg.build_model("ssd300", width=0.125, postprocess=True)
    assert deployment_model(decoding).output_names == OUTPUTS  # a model built with its decoder too


def test_onnx_has_nms_inside_and_a_dynamic_batch(ssd, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from convert.onnx_format import load_onnx

    model, path = ssd
    out = tmp_path / "ssd.onnx"
    assert main(["convert", path, "-o", str(out)]) == 0
    assert "as sets" in capsys.readouterr().out  # the printed verification says how detections compared
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "NonMaxSuppression" in ops
    runner = load_onnx(out)
    assert runner.output_names == OUTPUTS and runner.input_shape[0] == 300
    for batch in (1, 3):
        _detections_pass(verify(keras_runner(model, md.build_metadata(model)), runner,
                                inputs=_inputs(model, batch)))


def _tflite_ops(path):
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        data = f.read()
    flat = schema.Model.GetRootAsModel(data, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [flat.OperatorCodes(i) for i in range(flat.OperatorCodesLength())]
    return {c.CustomCode().decode() if c.CustomCode() else names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())]
            for c in codes}


def test_tflite_builtin_ops_only_with_nms_v5(ssd, tmp_path):
    pytest.importorskip("tensorflow.lite")
    from convert.tflite_format import load_tflite

    model, path = ssd
    result = convert(path, str(tmp_path / "ssd.tflite"))
    ops = _tflite_ops(result["target"]["path"])
    assert "NON_MAX_SUPPRESSION_V5" in ops and "WHILE" in ops
    assert not [op for op in ops if op.startswith("Flex") or op.islower()], ops  # no Flex, no custom ops
    runner = load_tflite(result["target"]["path"])
    assert runner.metadata["tflite"]["select_tf_ops"] == [] and runner.output_names == OUTPUTS
    for batch in (1, 3):  # the interpreter resizes the input to each batch
        _detections_pass(verify(keras_runner(model, md.build_metadata(model)), runner,
                                inputs=_inputs(model, batch)))


@pytest.mark.parametrize("target", ["ssd_saved_model", "ssd.pb", "ssd.h5"])
def test_tf_formats_carry_and_verify_detections(ssd, tmp_path, target):
    _, path = ssd
    result = convert(path, str(tmp_path / target))
    assert [o["name"] for o in result["verification"]["outputs"]] == OUTPUTS
    assert result["verification"]["passed"] and "as sets" in result["summary"]
    if target != "ssd.h5":  # the graph formats hold the decoder; back to Keras gives the network
        back = convert(result["target"]["path"], str(tmp_path / "back.keras"))
        assert back["verification"]["passed"] and back["architecture"] == "ssd300"
        assert keras.models.load_model(tmp_path / "back.keras").output_names == ["mbox_loc", "mbox_conf"]


def test_verification_fails_on_other_detections(ssd):
    # Same network, an NMS at IoU 0.3 instead of 0.45: raw outputs equal, detections not.
    model, _ = ssd
    deployed = deployment_model(model)
    decoder = deployed.get_layer("ssd_decoder")
    other = type(decoder).from_config({**decoder.get_config(), "iou_threshold": 0.3})
    found = other([deployed.get_layer("mbox_loc").output, deployed.get_layer("mbox_conf").output])
    changed = keras.Model(deployed.input, [deployed.outputs[0], deployed.outputs[1],
                                            *[found[k] for k in DETECTION_OUTPUTS]])
    runner = Runner(lambda x: [np.asarray(o) for o in changed(x)], tuple(model.input_shape[1:]),
                    md.build_metadata(model), "tf", OUTPUTS)
    report = verify(keras_runner(model, md.build_metadata(model)), runner, inputs=_inputs(model, 1))
    raw = {o.name: o.passed for o in report.outputs}
    assert raw["mbox_loc"] and raw["mbox_conf"] and not raw["detection_boxes"] and not report.passed
    assert "unmatched" in report.summary()
