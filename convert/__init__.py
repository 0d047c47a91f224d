"""kseg's conversion package: every format to every format it can reach, each path verified.

    from convert import convert, verify_files, inspect
    convert("model.h5", "model_saved_model", to="saved_model")   # verified before it returns

One module per format (keras_format, saved_model, tf_serving, frozen_graph, checkpoint,
onnx_format, tflite_format); formats.py detects formats and holds the load/save dispatch
table; verify.py compares two runners (convert.verify.verify); kseg.identity keeps kseg's
metadata in every format.
"""

from kseg import _lazy

# Each public name loads its module (and TensorFlow) on first use; `import convert` alone is free.
_EXPORTS = {
    "VerificationError": "convert.api",
    "convert": "convert.api",
    "inspect": "convert.api",
    "load_keras": "convert.api",
    "load_runner": "convert.api",
    "verify_files": "convert.api",
    "TOLERANCES": "convert.verify",
    "Report": "convert.verify",
    "Runner": "convert.verify",
}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
