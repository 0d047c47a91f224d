"""TF Serving's REST API for kseg serve: JSON request bodies <-> numpy tensors (row and columnar
formats, {"b64": ...} strings), the URL patterns, and the HTTP/1.1 request handler."""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import logging
import re
import socket
import time

import numpy as np

from kseg.serving.errors import DEFAULT_SIGNATURE, ServingError

log = logging.getLogger("kseg.serving")

try:  # optional: 10-50x faster JSON for large float tensors
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None


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
    """A numpy output as what the JSON encoder takes (orjson: the array itself). Strings stay text,
    except outputs named *_bytes: {"b64": ...}, as TF Serving encodes binary outputs."""
    array = np.asarray(array)  # one row of a string output is a bare bytes object
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

