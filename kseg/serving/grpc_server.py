"""gRPC PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus) for kseg serve.

The protos come from tensorflow-serving-api. Its wheel declares a dependency on the full
`tensorflow` package, which would replace tensorflow-cpu, so install it without dependencies:

    pip install --no-deps tensorflow-serving-api==2.21.0   # next to tensorflow-cpu 2.21
    pip install grpcio

Requests go through the same model manager and batcher as REST. Segmentation outputs are
large: the server sends messages of any size and receives up to the configured limit;
clients must raise their receive limit (kseg.serving.Client does).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import numpy as np

from kseg.serving.errors import DEFAULT_SIGNATURE, ServingError

log = logging.getLogger("kseg.serving")


def _protos():
    try:
        import grpc
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            get_model_status_pb2,
            model_service_pb2_grpc,
            predict_pb2,
            prediction_service_pb2_grpc,
        )
    except ImportError as e:
        raise ImportError(f"gRPC serving needs grpcio and tensorflow-serving-api ({e}); install them with "
                          "`pip install grpcio` and `pip install --no-deps tensorflow-serving-api`") from None
    return grpc, predict_pb2, get_model_metadata_pb2, get_model_status_pb2, prediction_service_pb2_grpc, \
        model_service_pb2_grpc


def _abort(context, grpc, error: ServingError):
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)


def _version(spec):
    if spec.HasField("version_label"):
        raise ServingError("UNIMPLEMENTED", "version labels are not supported by kseg serve; set model_spec.version")
    return spec.version.value if spec.HasField("version") else None


def start_grpc_server(manager, host, port, max_message_bytes, max_workers=32):
    """Start the gRPC services on host:port; returns (grpc.Server, bound port)."""
    grpc, predict_pb2, metadata_pb2, status_pb2, prediction_grpc, model_grpc = _protos()
    import tensorflow as tf

    class PredictionService(prediction_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            start = time.perf_counter()
            name = request.model_spec.name
            code = "OK"
            try:
                arrays = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                version, signature, outputs = manager.predict(
                    name, _version(request.model_spec), request.model_spec.signature_name or DEFAULT_SIGNATURE,
                    arrays)
                wanted = list(request.output_filter) or sorted(outputs)
                unknown = sorted(set(wanted) - set(outputs))
                if unknown:
                    raise ServingError("INVALID_ARGUMENT", f"output_filter names unknown outputs {unknown}; "
                                                           f"the signature has {sorted(outputs)}")
                response = predict_pb2.PredictResponse()
                response.model_spec.name = name
                response.model_spec.version.value = version
                response.model_spec.signature_name = signature
                for k in wanted:
                    response.outputs[k].CopyFrom(tf.make_tensor_proto(np.ascontiguousarray(outputs[k])))
                return response
            except ServingError as e:
                code = e.code
                _abort(context, grpc, e)
            except (TypeError, ValueError) as e:  # an undecodable TensorProto
                code = "INVALID_ARGUMENT"
                _abort(context, grpc, ServingError("INVALID_ARGUMENT", f"bad input tensor: {e}"))
            finally:
                log.info('%s "gRPC Predict %s" %s %.1fms', context.peer(), name, code,
                         (time.perf_counter() - start) * 1000)

        def GetModelMetadata(self, request, context):
            name = request.model_spec.name
            try:
                fields = list(request.metadata_field)
                if fields != ["signature_def"]:
                    raise ServingError("INVALID_ARGUMENT", f"metadata_field must be ['signature_def'], got {fields}")
                with manager.acquire(name, _version(request.model_spec)) as servable:
                    response = metadata_pb2.GetModelMetadataResponse()
                    response.model_spec.name = name
                    response.model_spec.version.value = servable.version
                    sig_map = metadata_pb2.SignatureDefMap()
                    for k, v in servable.signature_defs.items():
                        sig_map.signature_def[k].CopyFrom(v)
                    response.metadata["signature_def"].Pack(sig_map)
                    return response
            except ServingError as e:
                _abort(context, grpc, e)
            finally:
                log.info('%s "gRPC GetModelMetadata %s"', context.peer(), name)

    class ModelService(model_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            try:
                items = manager.model_status(request.model_spec.name, _version(request.model_spec))
            except ServingError as e:
                _abort(context, grpc, e)
            response = status_pb2.GetModelStatusResponse()
            for item in items:
                s = response.model_version_status.add()
                s.version = int(item["version"])
                s.state = status_pb2.ModelVersionStatus.State.Value(item["state"])
                s.status.error_code = s.status.DESCRIPTOR.fields_by_name["error_code"].enum_type.values_by_name[
                    item["status"]["error_code"]].number
                s.status.error_message = item["status"]["error_message"]
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kseg-grpc"),
                         options=[("grpc.max_receive_message_length", int(max_message_bytes)),
                                  ("grpc.max_send_message_length", -1)])
    prediction_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    model_grpc.add_ModelServiceServicer_to_server(ModelService(), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"gRPC: cannot bind {address}")
    server.start()
    return server, bound
