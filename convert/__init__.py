"""kseg's conversion package: every format to every format it can reach, each path verified.

    from convert import convert, verify_files, inspect
    convert("model.h5", "model_saved_model", to="saved_model")   # verified before it returns

One module per format (keras_format, saved_model, frozen_graph, checkpoint, onnx_format,
tflite_format); formats.py detects formats and holds the load/save dispatch table;
verify.py compares two runners (convert.verify.verify; the package attribute stays the module); metadata.py keeps kseg's metadata in every format.
"""

from convert.api import VerificationError, convert, inspect, load_keras, load_runner, verify_files
from convert.verify import TOLERANCES, Report, Runner

__all__ = ["TOLERANCES", "Report", "Runner", "VerificationError", "convert", "inspect", "load_keras",
           "load_runner", "verify_files"]
