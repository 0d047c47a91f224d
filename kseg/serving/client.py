"""`kseg.serving.Client(url, model)`: one client for kseg serve and TensorFlow Serving, REST or gRPC.

    >>> from kseg.serving import Client
    >>> c = Client("http://127.0.0.1:8501", "deeplab")       # REST   # doctest: +SKIP
    >>> c = Client("grpc://127.0.0.1:8500", "deeplab")       # gRPC   # doctest: +SKIP
    >>> out = c.predict_images(["cat.jpg", open("dog.png", "rb").read()])     # doctest: +SKIP
    >>> out["label_map"].shape, out["image_size"]                             # doctest: +SKIP
    >>> [m.shape for m in Client.label_maps(out)]      # each image's map at its own size
    >>> c.predict(images_float32_nhwc)["probabilities"]                       # doctest: +SKIP

Only the standard TF Serving API is used (POST :predict, GET status and metadata; gRPC
PredictionService.Predict / GetModelMetadata and ModelService.GetModelStatus), so the same
code talks to `tensorflow_model_server`. REST uses the columnar format with {"b64": ...}
for binary inputs and keeps one HTTP/1.1 connection per thread; a Client is thread-safe.
gRPC raises the channel's receive limit (segmentation outputs exceed gRPC's 4 MiB default).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
import urllib.parse

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32, "DT_INT64": np.int64,
           "DT_INT16": np.int16, "DT_INT8": np.int8, "DT_UINT8": np.uint8, "DT_UINT16": np.uint16,
           "DT_BOOL": np.bool_, "DT_HALF": np.float16, "DT_STRING": object}


class ServingRequestError(RuntimeError):
    """The server answered with an error: `status` (HTTP status or gRPC code name) and its message."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _read_image(image):
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    with open(os.fspath(image), "rb") as f:
        return f.read()


class Client:
    """A model on a TF Serving-compatible server.

    url: "http://host:8501" (REST) or "grpc://host:8500" (gRPC). version: pin a version
    (default: the server's latest). timeout: seconds per request.
    """

    def __init__(self, url, model, *, version=None, timeout=120.0, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parsed.scheme not in ("http", "https", "grpc"):
            raise ValueError(f"{url}: the URL must start with http://, https:// or grpc://")
        self.url, self.model, self.version, self.timeout = url, model, version, timeout
        self.protocol = "grpc" if parsed.scheme == "grpc" else "rest"
        self._parsed = parsed
        self._local = threading.local()
        self._metadata = None
        self._grpc = None
        if self.protocol == "grpc":
            self._grpc = _GrpcTransport(parsed.netloc, max_message_bytes, timeout)

    # --- public API ---

    def predict(self, inputs, *, signature_name="serving_default", output_filter=None):
        """{output name: numpy array} for `inputs` (an array for single-input signatures, or a dict)."""
        specs = self._signature(signature_name)["inputs"]
        if not isinstance(inputs, dict):
            if len(specs) != 1:
                raise ValueError(f"signature {signature_name!r} takes {sorted(specs)}; pass a dict")
            inputs = {next(iter(specs)): inputs}
        # The signature's dtypes (TF Serving refuses float64 for a float32 input over gRPC).
        inputs = {k: _as_dtype(v, specs.get(k, {}).get("dtype")) for k, v in inputs.items()}
        if self._grpc is not None:
            return self._grpc.predict(self.model, self.version, signature_name, inputs, output_filter)
        return self._rest_predict(inputs, signature_name, output_filter)

    def predict_images(self, images, *, signature_name="predict_images"):
        """Encoded images (bytes or file paths) through kseg's predict_images signature."""
        data = np.empty(len(images), dtype=object)
        data[:] = [_read_image(i) for i in images]
        return self.predict({"image_bytes": data}, signature_name=signature_name)

    @staticmethod
    def label_maps(outputs):
        """predict_images' padded label_map as one array per image, at that image's own size."""
        return [m[:h, :w] for m, (h, w) in zip(outputs["label_map"], outputs["image_size"])]

    def status(self):
        """[{"version": "1", "state": "AVAILABLE", "status": {...}}, ...] (TF Serving's model status)."""
        if self._grpc is not None:
            return self._grpc.status(self.model, self.version)
        return self._rest("GET", self._path())["model_version_status"]

    def metadata(self):
        """{signature name: SignatureDef as JSON} (REST's metadata body; gRPC's converted alike)."""
        if self._grpc is not None:
            return self._grpc.metadata(self.model, self.version)
        return self._rest("GET", self._path() + "/metadata")["metadata"]["signature_def"]["signature_def"]

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._grpc is not None:
            self._grpc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- REST ---

    def _signature(self, name):
        """The signature's metadata (fetched once per client; the same over REST and gRPC)."""
        if self._metadata is None:
            self._metadata = self.metadata()
        if name not in self._metadata:
            raise ValueError(f"model {self.model} has no signature {name!r} (has {sorted(self._metadata)})")
        return self._metadata[name]

    def _path(self):
        path = f"{self._parsed.path.rstrip('/')}/v1/models/{urllib.parse.quote(self.model, safe='')}"
        return path + (f"/versions/{int(self.version)}" if self.version is not None else "")

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._parsed.hostname, self._parsed.port, timeout=self.timeout)
        return conn

    def _rest(self, method, path, body=None):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            conn = self._connection()
            fresh = conn.sock is None
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                # A kept-alive connection the server closed meanwhile: retry once on a new one.
                if fresh or attempt:
                    raise
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            self._local.conn = None
        payload = orjson.loads(data) if orjson is not None and data[:1] == b"{" else json.loads(data or b"{}")
        if response.status != 200:
            raise ServingRequestError(response.status, payload.get("error", data[:200]))
        return payload

    def _rest_predict(self, inputs, signature_name, output_filter):
        columns = {}
        for name, value in inputs.items():
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind in "SU":
                columns[name] = _b64_nested(array)
            else:
                columns[name] = array
        payload = {"signature_name": signature_name, "inputs": columns}
        body = (orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY) if orjson is not None
                else json.dumps(payload, default=lambda a: a.tolist()).encode())
        result = self._rest("POST", self._path() + ":predict", body)["outputs"]
        outputs_spec = self._signature(signature_name)["outputs"]
        if not isinstance(result, dict) or set(result) != set(outputs_spec):
            (only,) = outputs_spec  # a single-output signature answers with the value itself
            result = {only: result}
        out = {}
        for name, value in result.items():
            dtype = _DTYPES.get(outputs_spec[name].get("dtype"), None)
            if dtype is object:
                out[name] = np.asarray(_unb64_nested(value), dtype=object)
            else:
                out[name] = np.asarray(value, dtype=dtype)
        if output_filter:
            out = {k: out[k] for k in output_filter}
        return out


def _as_dtype(value, dtype_name):
    dtype = _DTYPES.get(dtype_name)
    if dtype is object:  # DT_STRING: bytes objects (numpy treats bytes as scalars)
        return value.astype(object) if isinstance(value, np.ndarray) else np.asarray(value, dtype=object)
    array = np.asarray(value)
    return array.astype(dtype) if dtype is not None and array.dtype != dtype else array


def _b64_nested(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return [_b64_nested(v) for v in value]
    return {"b64": base64.b64encode(value if isinstance(value, bytes) else str(value).encode()).decode()}


def _unb64_nested(value):
    if isinstance(value, list):
        return [_unb64_nested(v) for v in value]
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    return value


class _GrpcTransport:
    def __init__(self, target, max_message_bytes, timeout):
        import grpc
        from tensorflow_serving.apis import (
            model_service_pb2_grpc,
            prediction_service_pb2_grpc,
        )

        options = [("grpc.max_receive_message_length", int(max_message_bytes)),
                   ("grpc.max_send_message_length", int(max_message_bytes))]
        self._grpc = grpc
        self.channel = grpc.insecure_channel(target, options=options)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout = timeout

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise ServingRequestError(e.code().name, e.details()) from None

    @staticmethod
    def _spec(spec, model, version, signature=None):
        spec.name = model
        if version is not None:
            spec.version.value = int(version)
        if signature:
            spec.signature_name = signature

    def predict(self, model, version, signature, inputs, output_filter):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model, version, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter or [])
        response = self._call(self.prediction.Predict, request)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def status(self, model, version):
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version)
        response = self._call(self.models.GetModelStatus, request)
        return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)["model_version_status"]

    def metadata(self, model, version):
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, model, version)
        request.metadata_field.append("signature_def")
        response = self._call(self.prediction.GetModelMetadata, request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        return {k: json_format.MessageToDict(v, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
                for k, v in sig_map.signature_def.items()}

    def close(self):
        self.channel.close()
