"""kseg: classic segmentation and classification CNNs for Keras 3 / TensorFlow."""

from kseg._backend import ensure_tensorflow_backend

ensure_tensorflow_backend()

# Registers kseg's serializable layers, so any process that imported kseg reloads .keras/.h5
# files using them without custom_objects.
from kseg import layers  # noqa: E402, F401
from kseg.api import build_model  # noqa: E402
from kseg.flops import flops  # noqa: E402  (the function shadows the submodule: kseg.flops(model))
from kseg.registry import Preprocessing, get_spec, list_models, register_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Preprocessing", "__version__", "build_model", "get_spec", "list_models", "register_model"]
