"""Serving: TF Serving exports, a TF-Serving-compatible server (`kseg serve`) and its client.

    >>> from kseg.serving import Client, export                      # doctest: +SKIP
    >>> export(model, "models/deeplab")                              # models/deeplab/1
    >>> Client("http://127.0.0.1:8501", "deeplab").predict_images(["cat.jpg"])

The server and client import TensorFlow only when used.
"""

from kseg.serving.export import export, resolve_model

__all__ = ["Client", "ModelServer", "export", "resolve_model", "serve"]


def __getattr__(name):
    # Lazy: `import kseg.serving` for export does not start the HTTP/gRPC machinery.
    if name == "Client":
        from kseg.serving.client import Client

        return Client
    if name in ("ModelServer", "serve"):
        from kseg.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'kseg.serving' has no attribute {name!r}")
