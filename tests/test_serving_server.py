"""`kseg serve` as a real subprocess on loopback: TF Serving's REST API, gRPC, cross-client batching,
32 concurrent clients, hot version reload, bad input, fuzzing, and graceful SIGTERM shutdown."""

import base64
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import HAVE_GRPC, request, start_server

import kseg
from convert.tf_serving import encode_png
from kseg.serving import Client, export
from kseg.serving.client import ServingRequestError

SIZE = (32, 32)
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """BASE with two models (segmentation `seg`, classifier `digits`), a staged digits v2, a running server."""
    root = tmp_path_factory.mktemp("serving")
    base, staging = root / "models", root / "staging"
    os.makedirs(base)
    # The server starts on an empty BASE and picks the models up as they are exported (meanwhile).
    proc, where = start_server(base, "--poll-seconds", "0.2", "--max-body-bytes", str(MAX_BODY),
                               log_path=root / "server.log")
    keras.utils.set_random_seed(0)
    export(kseg.build_model("deeplab_largefov", num_classes=5, width=0.125), str(base / "seg"), image_size=SIZE)
    export(kseg.build_model("lenet5"), str(base / "digits"), verify=False)
    keras.utils.set_random_seed(1)
    v2 = export(kseg.build_model("lenet5"), str(staging / "digits"), verify=False)
    rng = np.random.default_rng(0)
    seg_fn = tf.saved_model.load(str(base / "seg" / "1")).signatures["serving_default"]
    seg_images = rng.integers(0, 256, size=(8, *SIZE, 3)).astype("float32")
    seg_probs = np.concatenate([seg_fn(images=seg_images[i:i + 1])["probabilities"].numpy() for i in range(8)])
    digit_images = rng.integers(0, 256, size=(4, 32, 32, 1)).astype("float32")
    digits = {v: tf.saved_model.load(p).signatures["serving_default"](images=digit_images)["probabilities"].numpy()
              for v, p in ((1, str(base / "digits" / "1")), (2, v2))}
    deadline = time.monotonic() + 120
    while any(request(where["rest_url"], "GET", f"/v1/models/{m}")[0] != 200 for m in ("seg", "digits")):
        assert time.monotonic() < deadline and proc.poll() is None, Path(root / "server.log").read_text()[-3000:]
        time.sleep(0.1)
    yield {"proc": proc, "url": where["rest_url"], "grpc": where["grpc_target"], "base": base, "staged_v2": v2,
           "log": root / "server.log", "seg_images": seg_images, "seg_probs": seg_probs,
           "seg_pngs": [encode_png(a.astype(np.uint8)) for a in seg_images],
           "digit_images": digit_images, "digits": digits}
    proc.terminate()
    proc.wait(timeout=60)


def assert_segmentation(out, probs):
    """Served outputs equal in-process ones (label maps exactly, where the top two classes are not tied)."""
    np.testing.assert_allclose(out["probabilities"], probs, atol=2e-5)
    top2 = np.sort(probs, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-4
    np.testing.assert_array_equal(np.asarray(out["label_map"])[decided], probs.argmax(-1)[decided])


def test_binds_loopback_and_reports_status_and_metadata(served):
    assert served["url"].startswith("http://127.0.0.1:")
    status, body = request(served["url"], "GET", "/v1/models/seg")
    assert status == 200
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}
    status, body = request(served["url"], "GET", "/v1/models/seg/versions/1/metadata")
    assert status == 200 and body["model_spec"] == {"name": "seg", "signature_name": "", "version": "1"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "predict_images", "label_images"} <= set(sigs)
    assert sigs["predict_images"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert sigs["serving_default"]["inputs"]["images"]["tensor_shape"]["dim"][-1]["size"] == "3"
    assert request(served["url"], "GET", "/v1/models/digits")[0] == 200  # a second model under the same base


def test_row_and_columnar_formats_with_b64(served):
    url, x, probs = served["url"], served["seg_images"][:2], served["seg_probs"][:2]
    status, body = request(url, "POST", "/v1/models/seg:predict", json.dumps({"instances": x.tolist()}))
    assert status == 200 and len(body["predictions"]) == 2
    assert_segmentation({k: np.array([p[k] for p in body["predictions"]]) for k in ("probabilities", "label_map")},
                        probs)
    status, body = request(url, "POST", "/v1/models/seg/versions/1:predict",
                           json.dumps({"signature_name": "serving_default", "inputs": {"images": x.tolist()}}))
    assert status == 200
    assert_segmentation({k: np.array(v) for k, v in body["outputs"].items()}, probs)
    pngs = [{"b64": base64.b64encode(p).decode()} for p in served["seg_pngs"][:2]]
    for payload, key in (({"signature_name": "predict_images", "instances": pngs}, "predictions"),
                         ({"signature_name": "predict_images", "inputs": {"image_bytes": pngs}}, "outputs")):
        status, body = request(url, "POST", "/v1/models/seg:predict", json.dumps(payload))
        assert status == 200, body
        out = body[key] if key == "outputs" else {k: [p[k] for p in body[key]] for k in body[key][0]}
        assert np.array(out["image_size"]).tolist() == [[32, 32], [32, 32]]
        assert_segmentation({k: np.array(v) for k, v in out.items()}, probs)


def _client_loop(client, served, deadline, errors, counts, k):
    rng = np.random.default_rng(k)
    while time.monotonic() < deadline:
        i = int(rng.integers(0, 8))
        try:
            if rng.random() < 0.5:
                out = client.predict(served["seg_images"][i:i + 1])
            else:
                out = client.predict_images([served["seg_pngs"][i]])
                assert out["image_size"].tolist() == [[32, 32]]
            assert_segmentation(out, served["seg_probs"][i:i + 1])
            counts[k] += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported by the test
            errors.append(f"client {k}: {type(e).__name__}: {str(e)[:300]}")


def test_32_concurrent_clients_get_correct_answers(served):
    rest = Client(served["url"], "seg")
    grpc = Client("grpc://" + served["grpc"], "seg") if served["grpc"] else rest
    errors, counts = [], [0] * 32
    deadline = time.monotonic() + 4.0
    threads = [threading.Thread(target=_client_loop, args=(grpc if k % 4 == 3 else rest, served, deadline,
                                                           errors, counts, k)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]
    assert min(counts) >= 1, counts  # every client was served
    log = Path(served["log"]).read_text()
    assert log.count('"POST /v1/models/seg:predict" 200') >= sum(counts[k] for k in range(32) if k % 4 != 3)


def test_batcher_merges_requests_across_clients_and_isolates_failures(served):
    from kseg.serving.batching import Batcher
    from kseg.serving.errors import ServingError
    from kseg.serving.signatures import Signature, read_signature_defs

    path = str(served["base"] / "seg" / "1")
    loaded = tf.saved_model.load(path)
    defs = read_signature_defs(path)
    signature = Signature("predict_images", loaded.signatures["predict_images"], defs["predict_images"])
    batcher = Batcher(signature, max_batch_size=64, batch_timeout=0.5)
    results, errors = {}, {}

    def one(i):
        data = b"not an image" if i == 5 else served["seg_pngs"][i]
        array = np.empty(1, dtype=object)
        array[:] = [data]
        try:
            results[i] = batcher.submit({"image_bytes": array}, 1)
        except ServingError as e:
            errors[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    batcher.stop()
    # Requests were merged (fewer batches than rows run), and the batch holding the bad image re-ran one by one.
    assert batcher.batches < batcher.batched_rows and batcher.batched_rows > 8
    assert list(errors) == [5] and errors[5].code == "INVALID_ARGUMENT" and "image" in errors[5].message
    for i, out in results.items():
        assert out["label_map"].shape == (1, 32, 32)  # padding to the batch's largest image trimmed per request
        assert_segmentation(out, served["seg_probs"][i:i + 1])


@pytest.mark.skipif(not HAVE_GRPC, reason="tensorflow-serving-api is not installed")
def test_grpc_matches_rest(served):
    rest, grpc = Client(served["url"], "seg"), Client("grpc://" + served["grpc"], "seg")
    x = served["seg_images"][:3]
    a, b = rest.predict(x), grpc.predict(x)
    assert sorted(a) == sorted(b) == ["label_map", "probabilities"]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    assert grpc.status()[0]["state"] == "AVAILABLE" and grpc.status() == rest.status()
    assert set(grpc.metadata()) == set(rest.metadata())
    only = grpc.predict(x, output_filter=["label_map"])
    assert list(only) == ["label_map"]
    with pytest.raises(ServingRequestError, match="NOT_FOUND"):
        Client("grpc://" + served["grpc"], "nope").predict(x)
    with pytest.raises(ServingRequestError, match="INVALID_ARGUMENT"):
        grpc.predict(x[..., :2])


def _classify(probs, expected):
    for version, exp in expected.items():
        if np.allclose(probs, exp, atol=1e-5):
            return version
    return None


def test_new_version_is_picked_up_without_failed_requests(served):
    url, images, expected = served["url"], served["digit_images"], served["digits"]
    client = Client(url, "digits")
    seen, errors = [[] for _ in range(8)], []
    stop = threading.Event()

    def loop(k):
        while not stop.is_set():
            try:
                probs = client.predict(images)["probabilities"]
                seen[k].append(_classify(probs, expected))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.rename(served["staged_v2"], served["base"] / "digits" / "2")  # an atomic drop-in, as export() does
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s[-3:] == [2, 2, 2] for s in seen):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    for s in seen:
        assert None not in s, "a response matched neither version"
        assert s[0] == 1 and s[-1] == 2 and s == sorted(s), "each client switches once, from v1 to v2"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {s["version"]: s["state"] for s in client.status()}
        if states.get("1") == "END":
            break
        time.sleep(0.1)
    assert states == {"2": "AVAILABLE", "1": "END"}
    status, body = request(url, "POST", "/v1/models/digits/versions/1:predict",
                           json.dumps({"instances": images.tolist()}))
    assert status == 404 and "Specific(digits, 1)" in body["error"]
    assert "version 1 unloaded" in Path(served["log"]).read_text()


def _raw(url, data, read_body=True):
    """Send raw bytes on a socket; return (status, JSON body)."""
    parsed = urllib.parse.urlsplit(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as s:
        s.sendall(data)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, json.loads(response.read())


def test_bad_requests_get_tf_serving_errors_and_the_server_keeps_serving(served):
    url = served["url"]
    image = served["seg_images"][:1].tolist()
    not_an_image = {"b64": base64.b64encode(b"definitely not an image").decode()}
    cases = [
        ("POST", "/v1/models/seg:predict", b'{"instances": [1,', 400, "JSON Parse error"),
        ("POST", "/v1/models/seg:predict", b"", 400, "document is empty"),
        ("POST", "/v1/models/seg:predict", b"[1, 2]", 400, "Is not object"),
        ("POST", "/v1/models/seg:predict", b'{"signature_name": "serving_default"}', 400, "Missing 'inputs' or"),
        ("POST", "/v1/models/seg:predict", json.dumps({"instances": image, "inputs": image}), 400, "only one of"),
        ("POST", "/v1/models/seg:predict", json.dumps({"instances": [[[1.0, 2.0]]]}), 400, "expects [-1,-1,-1,3]"),
        ("POST", "/v1/models/seg:predict", json.dumps({"inputs": [[["a", "b", "c"]]]}), 400, "DT_FLOAT"),
        ("POST", "/v1/models/seg:predict", json.dumps({"instances": [[[1, 2, 3]], [[1, 2]]]}), 400, "dense"),
        ("POST", "/v1/models/seg:predict", json.dumps({"instances": [[[1e300, 2, 3]]]}), 400, "loss of precision"),
        ("POST", "/v1/models/seg:predict",
         json.dumps({"signature_name": "predict_images", "instances": [not_an_image]}), 400,
         "Unknown image file format"),
        ("POST", "/v1/models/seg:predict", json.dumps({"signature_name": "predict_images",
                                                       "instances": [{"b64": "@@@"}]}), 400, "base64"),
        ("POST", "/v1/models/seg:predict", json.dumps({"signature_name": "predict_images", "instances": [[1.5]]}),
         400, "DT_STRING"),
        ("POST", "/v1/models/seg:predict", json.dumps({"signature_name": "nope", "instances": image}), 400,
         'Serving signature name: "nope" not found'),
        ("POST", "/v1/models/nope:predict", json.dumps({"instances": image}), 404, "Servable not found"),
        ("POST", "/v1/models/seg/versions/9:predict", json.dumps({"instances": image}), 404, "Specific(seg, 9)"),
        ("POST", "/v1/models/seg:classify", b"{}", 501, ":predict"),
        ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
        ("GET", "/v1/models/seg/versions/9", None, 404, "Could not find version 9"),
        ("GET", "/v1/models/nope/metadata", None, 404, "Servable not found"),
        ("GET", "/v1/models", None, 400, "Missing model name"),
        ("GET", "/v1/models/seg:predict", None, 400, "Malformed request"),
        ("GET", "/", None, 404, "Malformed request"),
    ]
    for method, path, body, code, message in cases:
        status, reply = request(url, method, path, body)
        assert (status, list(reply)) == (code, ["error"]), (path, body, reply)
        assert message in reply["error"], (path, body, reply)
    # An oversized body: read and refused; announced with Expect: 100-continue, refused before it is sent.
    big = json.dumps({"instances": [[[[0.5, 0.5, 0.5]] * 300] * 300]}).encode()
    assert len(big) > MAX_BODY
    status, reply = request(url, "POST", "/v1/models/seg:predict", big)
    assert status == 413 and "exceeds the limit" in reply["error"]
    status, reply = _raw(url, b"POST /v1/models/seg:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
                              b"Expect: 100-continue\r\n\r\n")
    assert status == 413
    status, reply = _raw(url, b"POST /v1/models/seg:predict HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411 and "Content-Length" in reply["error"]
    status, reply = _raw(url, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 501 and "error" in reply
    # Still serving, with the right answers.
    assert_segmentation(Client(url, "seg").predict(served["seg_images"][:1]), served["seg_probs"][:1])


def _fuzz_bodies(rng, valid):
    keys = ["instances", "inputs", "signature_name", "b64", "images", "image_bytes", "x"]
    sigs = ["serving_default", "predict_images", "label_images", "raw_outputs", "", "nope"]

    def value(depth):
        kind = rng.integers(0, 9 if depth < 4 else 6)
        if kind == 0:
            return int(rng.integers(-1000, 1000))
        if kind == 1:
            return float(rng.normal() * 10.0 ** int(rng.integers(-3, 40)))
        if kind == 2:
            return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, size=int(rng.integers(0, 12))))
        if kind == 3:
            return bool(rng.integers(0, 2))
        if kind == 4:
            return None
        if kind == 5:
            return {"b64": base64.b64encode(rng.bytes(int(rng.integers(0, 40)))).decode()}
        if kind in (6, 7):
            n = int(rng.integers(0, 4))
            return [value(depth + 1) for _ in range(n)] if kind == 6 else [value(depth + 1)] * n
        return {keys[int(rng.integers(0, len(keys)))]: value(depth + 1) for _ in range(int(rng.integers(0, 3)))}

    for i in range(300):
        kind = i % 4
        if kind == 0:
            yield rng.bytes(int(rng.integers(0, 300)))
        elif kind == 1:
            body = {keys[int(rng.integers(0, 3))]: value(0)}
            if rng.random() < 0.5:
                body["signature_name"] = sigs[int(rng.integers(0, len(sigs)))]
            yield json.dumps(body).encode()
        else:
            data = bytearray(valid[int(rng.integers(0, len(valid)))])
            for _ in range(int(rng.integers(0 if kind == 3 else 1, 4))):
                op, at = rng.integers(0, 3), int(rng.integers(0, len(data)))
                if op == 0:
                    data[at] = int(rng.integers(0, 256))
                elif op == 1:
                    del data[at:at + int(rng.integers(1, 20))]
                else:
                    data[at:at] = rng.bytes(int(rng.integers(1, 8)))
            yield bytes(data)


def test_fuzzed_bodies_never_crash_the_server(served):
    url = served["url"]
    rng = np.random.default_rng(1234)
    png = {"b64": base64.b64encode(served["seg_pngs"][0]).decode()}
    valid = [json.dumps({"instances": served["seg_images"][:1].tolist()}).encode(),
             json.dumps({"signature_name": "predict_images", "instances": [png]}).encode(),
             json.dumps({"signature_name": "label_images", "inputs": {"image_bytes": [png]}}).encode(),
             json.dumps({"inputs": served["digit_images"][:1].tolist()}).encode()]
    paths = ["/v1/models/seg:predict", "/v1/models/digits:predict", "/v1/models/seg/versions/1:predict",
             "/v1/models/seg:predict?x=1", "/v1/models/seg%20:predict"]
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    statuses = []
    for body in _fuzz_bodies(rng, valid):
        path = paths[int(rng.integers(0, len(paths)))]
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        statuses.append(response.status)
        assert response.status < 500, (path, body[:200], reply)
        assert response.status == 200 or list(reply) == ["error"], (path, body[:200], reply)
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    conn.close()
    assert served["proc"].poll() is None
    assert 200 in statuses and 400 in statuses
    assert request(url, "GET", "/v1/models/seg")[0] == 200


def test_sigterm_drains_in_flight_requests_and_exits(served, tmp_path):
    base = tmp_path / "models"
    os.makedirs(base)
    os.symlink(served["base"] / "digits", base / "digits")
    # A long batch timeout keeps a request waiting in the batcher while SIGTERM arrives.
    proc, where = start_server(base, "--batch-timeout-ms", "2000", "--max-batch-size", "64", "--port", "off",
                               log_path=tmp_path / "server.log")
    images = served["digit_images"]
    result = {}

    def in_flight():
        result["reply"] = request(where["rest_url"], "POST", "/v1/models/digits:predict",
                                  json.dumps({"inputs": images.tolist()}))

    thread = threading.Thread(target=in_flight)
    started = time.monotonic()
    thread.start()
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert proc.wait(timeout=60) == 0
    status, body = result["reply"]
    assert status == 200 and time.monotonic() - started >= 1.5  # answered after the batch timeout, not cut off
    assert _classify(np.array(body["outputs"]["probabilities"]), served["digits"]) is not None
    log = Path(tmp_path / "server.log").read_text()
    assert "REST API at http://127.0.0.1:" in log and "shutting down" in log and "stopped" in log
    assert '"POST /v1/models/digits:predict" 200' in log  # the access log line
    with pytest.raises(OSError):
        request(where["rest_url"], "GET", "/v1/models/digits")


def test_a_classifier_answers_classify_images_over_rest(served):
    # The classification task's own signature: encoded images in, its evaluation transform
    # inside, the top-5 classes, scores and class names out.
    rng = np.random.default_rng(5)
    pngs = [encode_png(a) for a in rng.integers(0, 256, size=(2, 40, 52, 1)).astype(np.uint8)]
    body = json.dumps({"signature_name": "classify_images",
                       "instances": [{"b64": base64.b64encode(p).decode()} for p in pngs]})
    status, out = request(served["url"], "POST", "/v1/models/digits:predict", body)
    assert status == 200, out
    preds = out["predictions"]
    assert [len(p["classes"]) for p in preds] == [5, 5]
    assert all(p["class_names"] == [str(c) for c in p["classes"]] for p in preds)  # no names given: indices
    # Equal to the signature run in this process, for whichever version of `digits` answered.
    in_process = []
    for path in [*map(str, (served["base"] / "digits").iterdir()), served["staged_v2"]]:
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            sig = tf.saved_model.load(path).signatures["classify_images"]
            in_process.append(sig(image_bytes=tf.constant(pngs)))
    assert any(np.array_equal([p["classes"] for p in preds], o["classes"].numpy())
               and np.allclose([p["scores"] for p in preds], o["scores"].numpy(), atol=1e-6) for o in in_process)
    if served["grpc"]:
        out = Client("grpc://" + served["grpc"], "digits").predict(np.array(pngs, dtype=object),
                                                                    signature_name="classify_images")
        assert out["classes"].shape == (2, 5) and out["class_names"].tolist() == [
            [str(c).encode() for c in row] for row in out["classes"].tolist()]
