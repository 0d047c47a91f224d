"""kseg: classic classification, segmentation, edge and detection CNNs for Keras 3 / TensorFlow."""

import importlib
import importlib.abc
import importlib.util
import sys

from kseg._backend import ensure_tensorflow_backend

ensure_tensorflow_backend()

from kseg.flops import flops  # noqa: E402, F401  (after the backend is pinned; the function shadows the submodule: kseg.flops(model); no Keras)

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so `import kseg` (and the `kseg` command's parsers) start
# without importing TensorFlow or Keras.
_LAZY = {
    "build_model": "kseg.api",
    "inference_model": "kseg.api",
    "Preprocessing": "kseg.registry",
    "get_spec": "kseg.registry",
    "list_models": "kseg.registry",
    "register_model": "kseg.registry",
    "list_weights": "kseg.pretrained",
    "register_weights": "kseg.pretrained",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kseg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# kseg's layers must be registered (keras.saving.register_keras_serializable) in any process
# that imported kseg, so .keras/.h5 files using them load without custom_objects. Importing
# kseg.layers imports Keras and TensorFlow, so it waits for Keras: at once if Keras is already
# imported, else right after the first `import keras` finishes (a one-shot import hook).


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: runs `callback` right after the first import of `fullname` has run
    its code, then leaves sys.meta_path."""

    def __init__(self, fullname, callback):
        self.fullname, self.callback = fullname, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)  # the rest of the import goes on without this finder
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_call(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_call  # this spec's own loader instance
        return spec


def _register_layers():
    # kseg.layers, and the detection layers models hold: decoders (detectors saved with theirs),
    # Faster R-CNN's proposal layer and RoI pooling, Fast R-CNN's proposals input, R-CNN's warp, the trainers.
    for module in ("kseg.layers", "kseg.detection.postprocess", "kseg.detection.proposals", "kseg.detection.roi",
                   "kseg.detection.precomputed", "kseg.detection.rcnn_trainer", "kseg.detection.crops",
                   "kseg.detection.rcnn_stages"):
        importlib.import_module(module)


if "keras" in sys.modules:
    _register_layers()
else:
    sys.meta_path.insert(0, _AfterImport("keras", _register_layers))

__all__ = ["Preprocessing", "__version__", "build_model", "get_spec", "inference_model", "list_models",
           "list_weights", "register_model", "register_weights"]
