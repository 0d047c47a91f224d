"""Serving: a TF-Serving-compatible server (`kseg serve`), its client, and the TF Serving export
(convert.tf_serving's, through kseg.serving.exports: an any-size detector at its test scale).

    >>> from kseg.serving import Client, export                      # doctest: +SKIP
    >>> export(model, "models/deeplab")                              # models/deeplab/1
    >>> Client("http://127.0.0.1:8501", "deeplab").predict_images(["cat.jpg"])

The server and client import TensorFlow only when used.
"""

from kseg import _lazy

# Loaded on first use: `import kseg.serving` starts neither TensorFlow nor the HTTP/gRPC machinery.
_EXPORTS = {
    "Client": "kseg.serving.client",
    "ModelServer": "kseg.serving.server",
    "export": "kseg.serving.exports",
    "resolve_model": "convert.tf_serving",
    "serve": "kseg.serving.server",
}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
