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

Example:
    >>> from kseg.serving.server import ModelServer
    >>> with ModelServer("models", rest_port=0) as server:            # doctest: +SKIP
    ...     print(server.rest_url)                                    # http://127.0.0.1:PORT
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import http.server
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import numpy as np

log = logging.getLogger("kseg.serving")

try:  # optional: 10-50x faster JSON for large float tensors
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None

DEFAULT_SIGNATURE = "serving_default"
# gRPC status code names -> HTTP status, as TF Serving's http_server.cc maps them.
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request failed: `code` is a gRPC status name (INVALID_ARGUMENT, NOT_FOUND, ...)."""

    def __init__(self, code, message, http_status=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


def _tf_error(e) -> ServingError:
    """A TensorFlow runtime error as a ServingError with TF's own status code and first message line."""
    import tensorflow as tf

    names = {getattr(tf.errors, n): n for n in HTTP_STATUS if isinstance(getattr(tf.errors, n, None), int)}
    code = names.get(getattr(e, "error_code", None), "INTERNAL")
    return ServingError(code, _first_line(getattr(e, "message", None) or str(e)) or type(e).__name__)


def _first_line(text):
    """The message of a TF error without its graph-execution preamble and node annotations."""
    skip = ("Graph execution error", "Detected at node", "<stack traces", "[[", "Traceback")
    lines = [ln.strip() for ln in str(text).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(skip)]
    line = (useful or [ln for ln in lines if ln] or [""])[0]
    return re.sub(r"\s*\[\[\{\{node .*$|\s*\[Op:\S+\]$", "", line)


# === Signatures ===============================================================================


class TensorSpec:
    """One input or output of a signature: name, numpy dtype, TF dtype name and shape (-1 = any)."""

    __slots__ = ("dtype", "dtype_name", "name", "shape")

    def __init__(self, name, info):
        import tensorflow as tf
        from tensorflow.core.framework import types_pb2

        self.name = name
        tf_dtype = tf.dtypes.as_dtype(info.dtype)
        self.dtype = np.dtype(object) if tf_dtype == tf.string else np.dtype(tf_dtype.as_numpy_dtype)
        self.dtype_name = types_pb2.DataType.Name(info.dtype)  # DT_FLOAT, DT_STRING, ... as TF Serving names them
        self.shape = None if info.tensor_shape.unknown_rank else [int(d.size) for d in info.tensor_shape.dim]

    @property
    def is_string(self):
        return self.dtype == np.dtype(object)

    def describe(self):
        return "[?]" if self.shape is None else "[" + ",".join(map(str, self.shape)) + "]"

    def check(self, array):
        """Raise INVALID_ARGUMENT unless `array` fits this input's shape."""
        if self.shape is None:
            return
        if array.ndim != len(self.shape) or any(s not in (-1, d) for s, d in zip(self.shape, array.shape)):
            raise ServingError("INVALID_ARGUMENT", f"input '{self.name}' has shape {list(array.shape)}; the signature "
                                                   f"expects {self.describe()} (-1: any size)")


class Signature:
    """A signature of a loaded SavedModel: its function, inputs, outputs and SignatureDef proto."""

    def __init__(self, name, function, signature_def):
        self.name = name
        self.function = function
        self.signature_def = signature_def
        self.inputs = {k: TensorSpec(k, v) for k, v in sorted(signature_def.inputs.items())}
        self.outputs = {k: TensorSpec(k, v) for k, v in sorted(signature_def.outputs.items())}
        # Batched across requests when every input has a free leading (batch) dimension.
        self.batchable = bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs.values())
        # kseg's predict_images pads label maps to the batch's largest image: trimmed per request.
        self.trims_padding = {"label_map", "image_size"} <= set(self.outputs)

    def prepare(self, arrays):
        """Check names, dtypes and shapes of the request's arrays; return (arrays, rows or None)."""
        missing = sorted(set(self.inputs) - set(arrays))
        extra = sorted(set(arrays) - set(self.inputs))
        if missing or extra:
            raise ServingError("INVALID_ARGUMENT", f"signature '{self.name}' takes inputs {sorted(self.inputs)}; "
                                                   f"missing {missing}, unexpected {extra}")
        out = {}
        for name, spec in self.inputs.items():
            array = arrays[name]
            if not isinstance(array, np.ndarray) or not _same_dtype(array.dtype, spec):
                given = getattr(array, "dtype", type(array).__name__)
                raise ServingError("INVALID_ARGUMENT", f"input '{name}' is {given}; the signature expects "
                                                       f"{spec.dtype_name}")
            spec.check(array)
            out[name] = array.astype(object) if spec.is_string and array.dtype != object else array
        rows = None
        if self.batchable:
            leading = {a.shape[0] for a in out.values()}
            if len(leading) > 1:
                raise ServingError("INVALID_ARGUMENT", f"inputs of '{self.name}' have different batch sizes "
                                                       f"{ {k: a.shape[0] for k, a in out.items()} }")
            rows = leading.pop()
        return out, rows

    def run(self, arrays):
        """Call the signature on numpy arrays; numpy outputs."""
        import tensorflow as tf

        try:
            tensors = {k: tf.constant(list(a.reshape(-1)), dtype=tf.string, shape=a.shape) if a.dtype == object
                       else tf.constant(a) for k, a in arrays.items()}
            result = self.function(**tensors)
            return {k: v.numpy() for k, v in result.items()}
        except tf.errors.OpError as e:
            raise _tf_error(e) from None
        except (ValueError, TypeError) as e:
            raise ServingError("INVALID_ARGUMENT", str(e).strip().splitlines()[0]) from None


def _same_dtype(dtype, spec):
    # Strings arrive as object arrays of bytes (JSON, tf.make_ndarray) or fixed-width bytes (numpy).
    return dtype.kind in "OS" if spec.is_string else dtype == spec.dtype


def read_signature_defs(directory):
    """The serving meta graph's SignatureDef map, read from saved_model.pb (what TF Serving reports)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    graphs = [g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags] or list(saved.meta_graphs)
    if not graphs:
        raise ValueError(f"{directory}: saved_model.pb holds no meta graph")
    return graphs[0].signature_def


# === Batching =================================================================================


class _Task:
    __slots__ = ("done", "error", "inputs", "key", "result", "rows")

    def __init__(self, inputs, rows, key):
        self.inputs, self.rows, self.key = inputs, rows, key
        self.done = threading.Event()
        self.result = self.error = None


class Batcher:
    """Merges concurrent requests to one signature into batches of up to max_batch_size rows.

    A worker takes the oldest queued request, adds queued requests of the same input shapes
    until the batch is full or batch_timeout has passed since it started waiting, runs one
    call and splits the outputs by request. A request larger than max_batch_size runs alone.
    If a merged batch fails (one request's image does not decode), each of its requests
    runs alone, so only the bad one gets the error.
    """

    def __init__(self, signature, *, max_batch_size=32, batch_timeout=0.002, num_threads=1, max_queued_rows=4096):
        self.signature = signature
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout = max(0.0, float(batch_timeout))
        self.max_queued_rows = max_queued_rows
        self._queue = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = self.batched_rows = 0  # counters: mean batch size = batched_rows / batches
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{signature.name}-{i}", daemon=True)
                         for i in range(max(1, int(num_threads)))]
        for t in self._threads:
            t.start()

    def submit(self, inputs, rows):
        key = tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(inputs.items()))
        task = _Task(inputs, rows, key)
        with self._cond:
            if self._stopped:
                raise ServingError("UNAVAILABLE", "the servable is shutting down")
            if self._queued_rows + rows > self.max_queued_rows and self._queue:
                raise ServingError("UNAVAILABLE", f"the batch queue is full ({self._queued_rows} rows waiting)")
            self._queue.append(task)
            self._queued_rows += rows
            self._cond.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=60)

    def _take(self):
        """The next batch (under the lock), or None when stopped and drained."""
        with self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.timeout
            while rows < self.max_batch_size:
                i = 0
                while i < len(self._queue) and rows < self.max_batch_size:
                    task = self._queue[i]
                    if task.key == first.key and rows + task.rows <= self.max_batch_size:
                        batch.append(task)
                        rows += task.rows
                        del self._queue[i]
                    else:
                        i += 1
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch_size or remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            self._queued_rows -= rows
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch):
        self.batches += 1
        self.batched_rows += sum(t.rows for t in batch)
        try:
            if len(batch) == 1:
                batch[0].result = self.signature.run(batch[0].inputs)
            else:
                self._run_merged(batch)
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request
            if len(batch) > 1:
                for task in batch:
                    self._execute([task])
                return
            batch[0].error = e if isinstance(e, ServingError) else ServingError("INTERNAL", f"{type(e).__name__}: {e}")
        for task in batch:
            task.done.set()

    def _run_merged(self, batch):
        names = list(batch[0].inputs)
        merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in names}
        outputs = self.signature.run(merged)
        total = sum(t.rows for t in batch)
        if any(v.ndim == 0 or v.shape[0] != total for v in outputs.values()):
            raise RuntimeError("outputs without a batch dimension cannot be split")  # each runs alone
        start = 0
        for task in batch:
            part = {k: v[start:start + task.rows] for k, v in outputs.items()}
            if self.signature.trims_padding and task.rows and part["label_map"].ndim == 3:
                h, w = part["image_size"].reshape(task.rows, -1)[:, :2].max(axis=0)
                part["label_map"] = part["label_map"][:, :h, :w]
            task.result = part
            start += task.rows


# === Models and versions ======================================================================


class Servable:
    """One loaded version of a model: its signatures, batchers and in-flight request count."""

    def __init__(self, name, version, path, batching):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        self.signature_defs = read_signature_defs(path)
        self._loaded = tf.saved_model.load(path)
        self.signatures = {k: Signature(k, self._loaded.signatures[k], v) for k, v in self.signature_defs.items()
                           if k in self._loaded.signatures}
        if not self.signatures:
            raise ValueError(f"{path}: the SavedModel has no signatures to serve")
        self._batching = batching
        self._batchers = {}
        self._lock = threading.Lock()
        self.inflight = 0
        self.retired = False

    def signature(self, name):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise ServingError("INVALID_ARGUMENT", f'Serving signature name: "{name}" not found in signature def '
                                                   f"(model {self.name} version {self.version} has "
                                                   f"{', '.join(sorted(self.signatures))})")
        return self.signatures[name]

    def predict(self, signature, arrays):
        arrays, rows = signature.prepare(arrays)
        if rows is None or self._batching["max_batch_size"] <= 1:
            return signature.run(arrays)
        with self._lock:
            batcher = self._batchers.get(signature.name)
            if batcher is None:
                batcher = self._batchers[signature.name] = Batcher(signature, **self._batching)
        return batcher.submit(arrays, rows)

    def unload(self):
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.stop()
        self.signatures = {}
        self._loaded = None


class ModelState:
    """A model name: its served version and the status of every version seen."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.current = None
        self.status = {}  # version -> (state, error_code, error_message)
        self.failures = collections.Counter()
        self.lock = threading.Lock()


def discover(base):
    """{model name: {version: path}} under BASE (BASE/NAME/VERSION, or BASE/VERSION for one model)."""
    def versions(directory):
        found = {}
        try:
            names = os.listdir(directory)
        except OSError:
            return found
        for n in names:
            p = os.path.join(directory, n)
            if n.isdigit() and (os.path.isfile(os.path.join(p, "saved_model.pb"))):
                found[int(n)] = p
        return found

    models = {}
    own = versions(base)
    if own:
        models[os.path.basename(os.path.abspath(base))] = own
    for n in sorted(os.listdir(base)):
        p = os.path.join(base, n)
        if not n.startswith(".") and os.path.isdir(p) and not n.isdigit():
            v = versions(p)
            if v:
                models[n] = v
    return models


class ModelManager:
    """Loads the highest version of every model under BASE and follows new versions by polling."""

    MAX_LOAD_ATTEMPTS = 3

    def __init__(self, base, *, poll_seconds=1.0, max_batch_size=32, batch_timeout=0.002, num_batch_threads=1,
                 max_queued_rows=4096):
        base = os.fspath(base)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"{base}: no such model base directory (expected BASE/NAME/VERSION/saved_model.pb)")
        self.base = base
        self.poll_seconds = poll_seconds
        self.batching = {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout,
                         "num_threads": num_batch_threads, "max_queued_rows": max_queued_rows}
        self.models = {}
        self._models_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # --- lifecycle ---

    def start(self):
        self.poll()
        if not self.models:
            log.warning("no models under %s yet (expected NAME/VERSION/saved_model.pb); waiting for one", self.base)
        if self.poll_seconds and self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="kseg-model-poller", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for state in list(self.models.values()):
            with state.lock:
                current, state.current = state.current, None
            if current is not None:
                current.unload()

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:
                log.exception("polling %s failed", self.base)

    def poll(self):
        """Load the highest version of each model where it is not the one served."""
        for name, versions in discover(self.base).items():
            with self._models_lock:
                state = self.models.get(name)
                if state is None:
                    state = self.models[name] = ModelState(name, os.path.dirname(next(iter(versions.values()))))
            latest = max(versions)
            current = state.current
            if current is not None and current.version == latest:
                continue
            if state.failures[latest] >= self.MAX_LOAD_ATTEMPTS or self._stop.is_set():
                continue
            self._load(state, latest, versions[latest])

    def _load(self, state, version, path):
        with state.lock:
            state.status[version] = ("LOADING", "OK", "")
        start = time.perf_counter()
        try:
            servable = Servable(state.name, version, path, self.batching)
        except Exception as e:  # noqa: BLE001 - a broken version must not stop the server
            state.failures[version] += 1
            final = state.failures[version] >= self.MAX_LOAD_ATTEMPTS
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            with state.lock:
                state.status[version] = ("END" if final else "LOADING", "UNKNOWN", message)
            log.error("model %s version %d failed to load (attempt %d): %s", state.name, version,
                      state.failures[version], message)
            return
        with state.lock:
            old, state.current = state.current, servable
            state.status[version] = ("AVAILABLE", "OK", "")
            if old is not None:
                old.retired = True
                state.status[old.version] = ("UNLOADING", "OK", "")
                idle = old.inflight == 0
        log.info("model %s version %d loaded in %.1f s from %s", state.name, version, time.perf_counter() - start, path)
        if old is not None and idle:
            self._unload(state, old)

    def _unload(self, state, servable):
        servable.unload()
        with state.lock:
            state.status[servable.version] = ("END", "OK", "")
        log.info("model %s version %d unloaded", state.name, servable.version)

    # --- requests ---

    def state(self, name):
        state = self.models.get(name)
        if state is None:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        return state

    @contextlib.contextmanager
    def acquire(self, name, version=None):
        """The servable for a request; it stays loaded until the request is done."""
        state = self.models.get(name)
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        if state is None:
            raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
        with state.lock:
            servable = state.current
            if servable is None or (version is not None and servable.version != version):
                raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
            servable.inflight += 1
        try:
            yield servable
        finally:
            with state.lock:
                servable.inflight -= 1
                done = servable.retired and servable.inflight == 0 and servable.signatures
            if done:
                self._unload(state, servable)

    def predict(self, name, version, signature_name, arrays):
        """Numpy inputs -> (version served, signature name, numpy outputs) through the batcher."""
        with self.acquire(name, version) as servable:
            signature = servable.signature(signature_name)
            return servable.version, signature.name, servable.predict(signature, arrays)

    def model_status(self, name, version=None):
        state = self.state(name)
        with state.lock:
            items = sorted(state.status.items(), reverse=True)
        if version is not None:
            items = [(v, s) for v, s in items if v == version]
            if not items:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        return [{"version": str(v), "state": s, "status": {"error_code": code, "error_message": message}}
                for v, (s, code, message) in items]


# === REST: JSON <-> tensors ===================================================================


def _loads(body):
    if not body:
        raise ServingError("INVALID_ARGUMENT", "JSON Parse error: The document is empty")
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # the json module also accepts NaN/Infinity, as TF Serving does; it reports the error
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
    except UnicodeDecodeError as e:
        raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: invalid UTF-8 at offset: {e.start}") from None
    except RecursionError:
        raise ServingError("INVALID_ARGUMENT", "JSON Parse error: nested too deeply") from None


def _short(value, limit=80):
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _json_shape(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _string_tensor(value, name):
    """Nested lists of str / {"b64": ...} -> object array of bytes, with TF Serving's shape rules."""
    shape = _json_shape(value)
    flat = []

    def walk(v, level):
        if isinstance(v, list):
            if level >= len(shape) or len(v) != shape[level]:
                raise ServingError("INVALID_ARGUMENT", f"input '{name}': lists of unequal lengths (a ragged "
                                                       f"tensor) at level {level}")
            for item in v:
                walk(item, level + 1)
            return
        if level != len(shape):
            raise ServingError("INVALID_ARGUMENT", f"input '{name}': value {_short(v)} found at level {level}, "
                                                   f"expected at level {len(shape)}")
        if _is_b64(v):
            try:
                flat.append(base64.b64decode(v["b64"], validate=True))
            except (binascii.Error, ValueError):
                raise ServingError("INVALID_ARGUMENT", f"input '{name}': Unable to base64 decode "
                                                       f"{_short(v['b64'], 40)}") from None
        elif isinstance(v, str):
            flat.append(v.encode("utf8"))
        else:
            raise ServingError("INVALID_ARGUMENT", f"JSON Value: {_short(v)} is not of expected type: DT_STRING "
                                                   f"(input '{name}'; binary data goes as {{\"b64\": ...}})")

    walk(value, 0)
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def json_to_array(value, spec):
    """A JSON value as a numpy array of `spec`'s dtype, refusing lossy or mistyped values."""
    if spec.is_string:
        return _string_tensor(value, spec.name)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError):
        raise ServingError("INVALID_ARGUMENT", f"input '{spec.name}': not a dense tensor (lists of unequal lengths "
                                               "or mixed types)") from None
    kind, target = array.dtype.kind, spec.dtype.kind
    ok = {"f": "fiu", "c": "fiuc", "i": "iu", "u": "iu", "b": "b"}.get(target, "")
    if array.size and kind not in ok:
        example = array.reshape(-1)[0] if array.ndim else array.item()
        raise ServingError("INVALID_ARGUMENT", f"JSON Value: {_short(example if kind != 'O' else value)} is not of "
                                               f"expected type: {spec.dtype_name} (input '{spec.name}')")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(spec.dtype)
    if array.size and target == "f" and kind == "f":
        bad = np.isfinite(array) & ~np.isfinite(cast)
        if bad.any():
            raise ServingError("INVALID_ARGUMENT", f"Cannot convert JSON value: {array[bad][0]} to "
                                                   f"{spec.dtype_name} without loss of precision (input '{spec.name}')")
    if array.size and target in "iu" and not np.array_equal(cast, array):
        raise ServingError("INVALID_ARGUMENT", f"input '{spec.name}': values out of range for {spec.dtype_name}")
    return cast


def parse_predict(body, signature_of):
    """(signature name, {input: array}, format) of a :predict body; signature_of(name) -> Signature."""
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise ServingError("INVALID_ARGUMENT", f"JSON Value: {_short(doc)} Is not object")
    name = doc.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(name, str):
        raise ServingError("INVALID_ARGUMENT", "'signature_name' key must be a string value")
    signature = signature_of(name)
    specs = signature.inputs
    if not specs:
        raise ServingError("INVALID_ARGUMENT", f"Failed to get input map for signature: {name}")
    if "instances" in doc and "inputs" in doc:
        raise ServingError("INVALID_ARGUMENT", "Not formatted correctly expecting only one of 'inputs' or "
                                               "'instances' keys to exist")
    if "instances" in doc:
        return signature, _rows(doc["instances"], specs), "row"
    if "inputs" in doc:
        return signature, _columns(doc["inputs"], specs), "columnar"
    raise ServingError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key")


def _rows(instances, specs):
    if not isinstance(instances, list):
        raise ServingError("INVALID_ARGUMENT", "Excepting 'instances' to be an list/array")
    if not instances:
        raise ServingError("INVALID_ARGUMENT", "No values in 'instances' array")
    objects = isinstance(instances[0], dict) and not _is_b64(instances[0])
    if not objects:
        if len(specs) > 1:
            raise ServingError("INVALID_ARGUMENT", "instances is a plain list, but expecting list of objects as "
                                                   f"multiple input tensors required: {', '.join(specs)}")
        if any(isinstance(v, dict) and not _is_b64(v) for v in instances):
            raise ServingError("INVALID_ARGUMENT", "instances mixes objects and values")
        (spec,) = specs.values()
        return {spec.name: json_to_array(instances, spec)}
    columns = {k: [] for k in specs}
    for i, item in enumerate(instances):
        if not isinstance(item, dict) or _is_b64(item):
            raise ServingError("INVALID_ARGUMENT", f"Expecting object but got list at item {i} of input list")
        if set(item) != set(specs):
            raise ServingError("INVALID_ARGUMENT", f"Failed to process element: {i} of 'instances' list. JSON "
                                                   f"object keys {sorted(item)} must be equal to: {sorted(specs)}")
        for k, spec in specs.items():
            columns[k].append(json_to_array(item[k], spec))
    out = {}
    for k, parts in columns.items():
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise ServingError("INVALID_ARGUMENT", f"input '{k}': instances of different shapes "
                                                   f"{sorted(map(list, shapes))}")
        out[k] = np.stack(parts)
    return out


def _columns(inputs, specs):
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(specs) > 1:
            raise ServingError("INVALID_ARGUMENT", "inputs is a plain value/list, but expecting an object as "
                                                   f"multiple input tensors required: {', '.join(specs)}")
        (spec,) = specs.values()
        return {spec.name: json_to_array(inputs, spec)}
    for k in specs:
        if k not in inputs:
            raise ServingError("INVALID_ARGUMENT", f"Missing named input: {k} in 'inputs' object.")
    extra = sorted(set(inputs) - set(specs))
    if extra:
        raise ServingError("INVALID_ARGUMENT", f"'inputs' has unknown names {extra}; the signature takes "
                                               f"{sorted(specs)}")
    return {k: json_to_array(inputs[k], spec) for k, spec in specs.items()}


def _jsonable(name, array):
    """A numpy output as what the JSON encoder takes (orjson: the array itself)."""
    if array.dtype == object or array.dtype.kind == "S":
        def conv(v):
            if isinstance(v, list):
                return [conv(x) for x in v]
            if isinstance(v, bytes):
                return {"b64": base64.b64encode(v).decode()} if name.endswith("_bytes") else v.decode("utf8", "replace")
            return v
        return conv(array.tolist())
    if orjson is not None:
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        return np.ascontiguousarray(array) if array.ndim else array.item()
    return array.tolist()


def format_outputs(outputs, fmt):
    """TF Serving's response body: {"predictions": [...]} (row) or {"outputs": ...} (columnar)."""
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _jsonable(names[0], outputs[names[0]])}
        return {"outputs": {k: _jsonable(k, outputs[k]) for k in names}}
    sizes = {k: (outputs[k].shape[0] if outputs[k].ndim else None) for k in names}
    batch = sizes[names[0]]
    for k in names:
        if sizes[k] is None or sizes[k] != batch:
            raise ServingError("INVALID_ARGUMENT", f"Tensor name: {k} has inconsistent batch size: {sizes[k]} "
                                                   f"expecting: {batch}; use the columnar ('inputs') format")
    if len(names) == 1:
        return {"predictions": [_jsonable(names[0], outputs[names[0]][i]) for i in range(batch)]}
    return {"predictions": [{k: _jsonable(k, outputs[k][i]) for k in names} for i in range(batch)]}


def dumps(payload) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:
            pass
    return json.dumps(payload, default=lambda a: a.tolist() if hasattr(a, "tolist") else str(a)).encode()


def _has_nonfinite(outputs):
    return any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in outputs.values())


def signature_defs_json(servable):
    from google.protobuf import json_format

    return {k: json_format.MessageToDict(v, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
            for k, v in sorted(servable.signature_defs.items())}


# === REST: HTTP ===============================================================================

PREDICT_PATH = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/(\d+))?:(classify|regress|predict)")
METADATA_PATH = re.compile(r"(?i)/v1/models/([^/:]+)(?:/versions/(\d+))?/metadata")
STATUS_PATH = re.compile(r"(?i)/v1/models(?:/([^/:]+))?(?:/versions/(\d+))?")
LABELS_PATH = re.compile(r"(?i)/v1/models/([^/:]+)/labels/.*")


class RestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive; every response is JSON; one access-log line per request."""

    protocol_version = "HTTP/1.1"
    server_version = "kseg-serve"
    timeout = 120  # an idle keep-alive connection or a stalled body is dropped after this

    # --- plumbing ---

    def log_message(self, fmt, *args):  # http.server's own messages go to our logger
        log.debug("%s %s", self.address_string(), fmt % args)

    def log_request(self, code="-", size="-"):  # replaced by _access_log
        pass

    def send_error(self, code, message=None, explain=None):
        """Malformed request lines and headers get a JSON error too, then the connection closes."""
        self.close_connection = True
        self._started = getattr(self, "_started", time.perf_counter())
        self._reply(code, {"error": message or explain or self.responses.get(code, ("error",))[0]}, close=True)
        self._access_log(code)

    def handle_expect_100(self):
        length = self._length()
        if length is not None and length > self.server.app.max_body_bytes:
            self._started = time.perf_counter()
            self._reply(413, {"error": self._too_large(length)}, close=True)
            self._access_log(413)
            return False
        return super().handle_expect_100()

    def _length(self):
        try:
            return int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None

    def _too_large(self, length):
        return (f"Request body of {length} bytes exceeds the limit of {self.server.app.max_body_bytes} bytes "
                "(kseg serve --max-body-bytes)")

    def setup(self):
        super().setup()
        # Responses go out in one write; no Nagle delay on the small ones.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _reply(self, status, payload, close=False):
        body = payload if isinstance(payload, bytes) else dumps(payload)
        draining = self.server.app.draining
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close or draining:
                self.send_header("Connection", "close")
                self.close_connection = True
            # Headers and body in a single write: two small writes meet the client's delayed ACK.
            head = b"".join(self._headers_buffer) + b"\r\n"
            self._headers_buffer = []
            self.wfile.write(head + body if self.command != "HEAD" else head)
            self.wfile.flush()
        except OSError:  # the client went away
            self.close_connection = True
        self._bytes = len(body)

    def _access_log(self, status):
        ms = (time.perf_counter() - getattr(self, "_started", time.perf_counter())) * 1000
        log.info('%s "%s %s" %s %d %.1fms', self.client_address[0], getattr(self, "command", "-"),
                 getattr(self, "path", "-"), status, getattr(self, "_bytes", 0), ms)

    # --- methods ---

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _handle(self):
        self._started = time.perf_counter()
        self._bytes = 0
        app = self.server.app
        app.request_started()
        status = 500
        try:
            status, payload, close = app.handle(self)
            self._reply(status, payload, close)
        except Exception:
            log.exception("internal error on %s %s", self.command, self.path)
            status = 500
            self._reply(500, {"error": "internal server error (see the server log)"}, close=True)
        finally:
            app.request_finished()
            self._access_log(status)

    def read_body(self):
        """(body, None) or (None, (status, payload, close)) when the body is missing or too large."""
        if self.headers.get("Transfer-Encoding"):
            return None, (411, {"error": "chunked request bodies are not supported; send Content-Length"}, True)
        length = self._length()
        if length is None or length < 0:
            return None, (411, {"error": "a POST needs a valid Content-Length header"}, True)
        limit = self.server.app.max_body_bytes
        if length > limit:
            # Read (and drop) a moderately oversized body so the client sees the 413, not a reset.
            if length <= 4 * limit:
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            return None, (413, {"error": self._too_large(length)}, True)
        body = self.rfile.read(length)
        if len(body) != length:
            return None, (400, {"error": f"request body ended after {len(body)} of {length} bytes"}, True)
        return body, None


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 512
    allow_reuse_address = True


class ModelServer:
    """The model manager plus the REST (and optionally gRPC) front ends; start(), stop()."""

    def __init__(self, base, *, host="127.0.0.1", rest_port=8501, grpc_port=None, max_batch_size=8,
                 batch_timeout_ms=2.0, num_batch_threads=1, max_body_bytes=64 << 20, poll_seconds=1.0,
                 max_queued_rows=4096, grpc_max_message_bytes=None):
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
            from kseg.serving.grpc_server import start_grpc_server

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
        models = ", ".join(f"{n} v{s.current.version}" for n, s in sorted(server.manager.models.items())
                           if s.current is not None) or "none yet"
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
