"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998) with the paper's layer names C1..F6."""

from __future__ import annotations

import keras
from keras import layers

from kseg.layers import ConnectionTableConv2D, RBFOutput
from kseg.models._common import model_input
from kseg.registry import register_model

PAPER = "LeCun, Bottou, Bengio, Haffner, Gradient-Based Learning Applied to Document Recognition, Proc. IEEE 1998"

# Table I of the paper: which S2 maps (rows 0..5) feed each C3 map (0..15). The partial
# table broke symmetry between maps and cut C3 from 2,416 to 1,516 parameters.
C3_TABLE = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


@register_model(
    "lenet5",
    task="classification",
    paper=PAPER,
    input_shape=(32, 32, 1),
    num_classes=10,
    preprocessing="unit",
    params=61_706,
)
def lenet5(*, num_classes=10, input_shape=None, c3_table=False, rbf_output=False):
    """LeNet-5: C1-S2-C3-S4-C5-F6-output, tanh; options for the paper's C3 table and RBF output."""
    inputs = model_input(input_shape, (32, 32, 1))
    x = layers.Conv2D(6, 5, activation="tanh", name="C1")(inputs)
    x = layers.AveragePooling2D(2, name="S2")(x)
    if c3_table:
        x = ConnectionTableConv2D(5, C3_TABLE, activation="tanh", name="C3")(x)
    else:
        x = layers.Conv2D(16, 5, activation="tanh", name="C3")(x)
    x = layers.AveragePooling2D(2, name="S4")(x)
    x = layers.Conv2D(120, 5, activation="tanh", name="C5")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(84, activation="tanh", name="F6")(x)
    if rbf_output:
        x = RBFOutput(num_classes, name="output")(x)
    else:
        x = layers.Dense(num_classes, name="output")(x)
    return keras.Model(inputs, x, name="lenet5")
