import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kseg  # noqa: E402, F401  (pins the TensorFlow backend before keras is imported)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The legacy .h5 writer shares Keras' layer-config serialization with .keras, so for the models
# over 50M parameters (0.2-0.5 GB files each) test_models.py's .h5 round trip is in the slow set;
# the .keras one runs for every model.
BIG_MODEL_PARAMS = 50_000_000


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.originalname == "test_save_and_reload" and callspec and callspec.params.get("suffix") == ".h5":
            if kseg.get_spec(callspec.params["built"]).params > BIG_MODEL_PARAMS:
                item.add_marker(pytest.mark.slow)
