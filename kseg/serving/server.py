"""`kseg serve BASE`: TensorFlow Serving's REST API (and gRPC PredictionService) for BASE/NAME/VERSION.

The same URLs, request and response bodies, status codes and error bodies as
`tensorflow_model_server`, so client code written against one runs against the other:

    POST /v1/models/NAME[/versions/V]:predict   {"signature_name": ..., "instances": [...]}  (row)
                                                {"signature_name": ..., "inputs": {...}}     (columnar)
    GET  /v1/models/NAME[/versions/V]           model_version_status
    GET  /v1/models/NAME[/versions/V]/metadata  signature_def map

Binary inputs (DT_STRING) travel as {"b64": "..."}. Each model directory under BASE serves its
highest version; a new version directory is loaded while the old one keeps serving, then
requests switch to it and the old one is unloaded once its in-flight requests finish. Requests
to one signature are batched across clients (max_batch_size rows, waiting at most
batch_timeout_ms for more, like TF Serving's batching parameters). Written on the standard
library's ThreadingHTTPServer; JSON goes through orjson when it is installed (a large speed-up
for big float outputs), else the json module.

With broker="redis://HOST:PORT/DB" the same front end queues each checked request on Redis for
`kseg worker` processes instead of running it (kseg.serving.remote, kseg.serving.worker).

Example:
    >>> from kseg.serving.server import ModelServer
    >>> with ModelServer("models", rest_port=0) as server:            # doctest: +SKIP
    ...     print(server.rest_url)                                    # http://127.0.0.1:PORT

This module assembles the parts: errors (ServingError), signatures, batching, models
(ModelManager) or remote (BrokerManager), rest (JSON and HTTP) and grpc_server; nothing imports it back.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

from kseg.serving.errors import ServingError
from kseg.serving.grpc_server import start_grpc_server
from kseg.serving.models import ModelManager
from kseg.serving.rest import (
    LABELS_PATH,
    METADATA_PATH,
    PREDICT_PATH,
    STATUS_PATH,
    RestHandler,
    _has_nonfinite,
    _HTTPServer,
    dumps,
    format_outputs,
    orjson,
    parse_predict,
    signature_defs_json,
)

log = logging.getLogger("kseg.serving")


class ModelServer:
    """The model manager plus the REST (and optionally gRPC) front ends; start(), stop()."""

    def __init__(self, base, *, host="127.0.0.1", rest_port=8501, grpc_port=None, max_batch_size=8,
                 batch_timeout_ms=2.0, num_batch_threads=1, max_body_bytes=64 << 20, poll_seconds=1.0,
                 max_queued_rows=4096, grpc_max_message_bytes=None, broker=None, request_timeout=30.0):
        if broker is not None:  # queued serving: kseg worker processes run the models (kseg.serving.remote)
            from kseg.serving.remote import BrokerManager

            self.manager = BrokerManager(broker, request_timeout=request_timeout, max_queued=max_queued_rows)
        else:
            self.manager = ModelManager(base, poll_seconds=poll_seconds, max_batch_size=max_batch_size,
                                        batch_timeout=batch_timeout_ms / 1000.0, num_batch_threads=num_batch_threads,
                                        max_queued_rows=max_queued_rows)
        self.host, self.rest_port, self.grpc_port = host, rest_port, grpc_port
        self.max_body_bytes = int(max_body_bytes)
        self.grpc_max_message_bytes = grpc_max_message_bytes or max(self.max_body_bytes, 64 << 20)
        self.draining = False
        self._active = 0
        self._active_cond = threading.Condition()
        self._http = None
        self._http_thread = None
        self._grpc = None
        self._stopped = threading.Event()

    # --- lifecycle ---

    def start(self):
        self.manager.start()
        if self.rest_port is not None:
            self._http = _HTTPServer((self.host, self.rest_port), RestHandler)
            self._http.app = self
            self.rest_port = self._http.server_address[1]
            self._http_thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                                 name="kseg-rest", daemon=True)
            self._http_thread.start()
        if self.grpc_port is not None:
            self._grpc, self.grpc_port = start_grpc_server(self.manager, self.host, self.grpc_port,
                                                           self.grpc_max_message_bytes)
        return self

    @property
    def rest_url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.rest_port}"

    @property
    def grpc_target(self):
        return None if self._grpc is None else f"{self.host}:{self.grpc_port}"

    def stop(self, grace=30.0):
        """Stop accepting, let in-flight requests finish (at most `grace` s), unload every model."""
        if self._stopped.is_set():
            return
        self.draining = True
        if self._http is not None:
            self._http.shutdown()  # no new connections
            self._http.server_close()
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
        deadline = time.monotonic() + grace
        with self._active_cond:
            while self._active and time.monotonic() < deadline:
                self._active_cond.wait(deadline - time.monotonic())
            left = self._active
        if left:
            log.warning("stopping with %d requests still in flight after %.0f s", left, grace)
        if grpc_done is not None:
            grpc_done.wait(grace)
        self.manager.stop()
        self._stopped.set()

    def wait(self, timeout=None):
        return self._stopped.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def request_started(self):
        with self._active_cond:
            self._active += 1

    def request_finished(self):
        with self._active_cond:
            self._active -= 1
            self._active_cond.notify_all()

    # --- REST dispatch ---

    def handle(self, request):
        """(status, payload, close) for one request, TF Serving's routes and error bodies."""
        method = request.command
        path = request.path.split("?", 1)[0]
        body = None
        if method == "POST":
            body, failure = request.read_body()
            if failure:
                return failure
        try:
            return (200, *self._route(method, path, body))
        except ServingError as e:
            return e.http_status, {"error": e.message}, False

    def _route(self, method, path, body):
        if not path.lower().startswith("/v1/"):
            raise ServingError("NOT_FOUND", f"Malformed request: {method} {path} (the API is under /v1/models/)")
        match = PREDICT_PATH.fullmatch(path)
        if method == "POST" and match:
            name, version, verb = match.group(1), match.group(2), match.group(3).lower()
            if verb != "predict":
                raise ServingError("UNIMPLEMENTED", f"kseg serve implements :predict, not :{verb}")
            return self._predict(name, int(version) if version else None, body), False
        if method == "GET":
            match = METADATA_PATH.fullmatch(path)
            if match:
                return self._metadata(match.group(1), int(match.group(2)) if match.group(2) else None), False
            match = STATUS_PATH.fullmatch(path)
            if match:
                if not match.group(1):
                    raise ServingError("INVALID_ARGUMENT", "Missing model name in request.")
                version = int(match.group(2)) if match.group(2) else None
                return {"model_version_status": self.manager.model_status(match.group(1), version)}, False
        if LABELS_PATH.fullmatch(path):
            raise ServingError("UNIMPLEMENTED", "version labels are not supported by kseg serve; use /versions/N")
        raise ServingError("INVALID_ARGUMENT", f"Malformed request: {method} {path}")

    def _predict(self, name, version, body):
        with self.manager.acquire(name, version) as servable:
            signature, arrays, fmt = parse_predict(body, servable.signature)
            outputs = servable.predict(signature, arrays)
        payload = format_outputs(outputs, fmt)
        if orjson is not None and _has_nonfinite(outputs):
            # orjson writes NaN as null; TF Serving writes NaN / Infinity, as the json module does.
            return json.dumps(payload, default=lambda a: a.tolist() if hasattr(a, "tolist") else a).encode()
        return dumps(payload)

    def _metadata(self, name, version):
        with self.manager.acquire(name, version) as servable:
            return {"model_spec": {"name": name, "signature_name": "", "version": str(servable.version)},
                    "metadata": {"signature_def": {"signature_def": signature_defs_json(servable)}}}


# === entry point ==============================================================================


def serve(base, *, host="127.0.0.1", rest_port=8501, grpc_port=8500, ready_file=None, **options):
    """Run `kseg serve` in the foreground until SIGTERM/SIGINT; returns the exit code.

    grpc_port=None disables gRPC; when tensorflow-serving-api is missing and the port was
    not asked for explicitly (grpc_port="auto"), gRPC is skipped with a warning.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if grpc_port == "auto":
        try:
            import tensorflow_serving.apis.prediction_service_pb2_grpc  # noqa: F401
            grpc_port = 8500
        except ImportError:
            log.warning("gRPC disabled: tensorflow-serving-api is not installed "
                        "(pip install --no-deps tensorflow-serving-api; pip install grpcio)")
            grpc_port = None
    server = ModelServer(base, host=host, rest_port=rest_port, grpc_port=grpc_port, **options)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        models = server.manager.summary()
        grpc = f", gRPC at {server.grpc_target}" if server.grpc_target else ""
        print(f"kseg serve: REST API at {server.rest_url}{grpc}; models: {models}", flush=True)
        if ready_file:
            with open(ready_file, "w") as f:
                json.dump({"rest_url": server.rest_url, "grpc_target": server.grpc_target}, f)
        while not stop.wait(0.5):
            pass
        log.info("shutting down: draining in-flight requests")
        server.stop()
        log.info("stopped")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not server._stopped.is_set():
            server.stop(grace=5)
