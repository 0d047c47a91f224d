import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kseg  # noqa: E402, F401  (pins the TensorFlow backend before keras is imported)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
