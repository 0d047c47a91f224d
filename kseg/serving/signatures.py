"""The signatures of a loaded SavedModel: TensorSpec, Signature (checks a request's arrays and runs
the function on them) and read_signature_defs (the SignatureDef map TF Serving reports)."""

from __future__ import annotations

import os

import numpy as np

from kseg.serving.errors import ServingError, _tf_error


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
