"""Pin Keras to the TensorFlow backend before anything imports Keras.

kseg's layers, data pipelines and exporters call TensorFlow ops directly, so
another backend would fail deep inside a model build. We fail at import instead.
"""

import os

_REQUIRED = "tensorflow"


def ensure_tensorflow_backend():
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        os.environ["KERAS_BACKEND"] = _REQUIRED
        backend = _REQUIRED
    if backend != _REQUIRED:
        raise ImportError(
            f"kseg needs Keras' TensorFlow backend, but KERAS_BACKEND={backend!r}. "
            f"Unset KERAS_BACKEND or set KERAS_BACKEND={_REQUIRED} before importing kseg."
        )
    # Keras picks its backend once, at its first import; if something imported it
    # earlier with another backend, the environment variable no longer decides.
    import sys

    keras_backend = sys.modules.get("keras.src.backend")
    if keras_backend is not None:
        active = keras_backend.backend()
        if active != _REQUIRED:
            raise ImportError(
                f"Keras was imported with the {active!r} backend before kseg. "
                f"Set KERAS_BACKEND={_REQUIRED} before the first `import keras`."
            )
