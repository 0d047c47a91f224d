"""kseg.flops against hand counts.

Convention under test: FLOPs = 2 x MACs for conv / transposed conv / dense layers, plus one FLOP
per window element for pooling (7 per output value for bilinear resizing); bias adds,
activations, BatchNorm and element-wise layers are not counted. Counts are per image.
"""

import keras
import pytest

import kseg
from kseg.layers import CropToReference, MaxPoolingWithArgmax2D, MaxUnpooling2D, ResizeToReference


def single(layer, input_shape):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


def test_is_exported_at_package_level():
    assert callable(kseg.flops)
    assert kseg.flops.__module__ == "kseg.flops"


def test_single_conv_hand_count():
    # 8x8x3 -> 8x8x4 with 3x3 kernels: every output value takes 3 * 3 * 3 multiply-adds.
    r = kseg.flops(single(keras.layers.Conv2D(4, 3, padding="same"), (8, 8, 3)))
    assert r.total_macs == 8 * 8 * 4 * (3 * 3 * 3)
    assert r.total_flops == 2 * r.total_macs
    (row,) = [row for row in r.rows if row.macs]
    assert row.output_shape == (8, 8, 4)
    assert row.params == 3 * 3 * 3 * 4 + 4


def test_strided_dilated_and_grouped_convs():
    # Strided valid conv: out 3x3 (= (8 - 3) // 2 + 1).
    r = kseg.flops(single(keras.layers.Conv2D(5, 3, strides=2), (8, 8, 2)))
    assert r.total_macs == 3 * 3 * 5 * (3 * 3 * 2)
    # Dilation spreads the taps over a wider field but adds none: out 4x4 (= 8 - 2 * (3 - 1)).
    r = kseg.flops(single(keras.layers.Conv2D(5, 3, dilation_rate=2), (8, 8, 2)))
    assert r.rows[-1].output_shape == (4, 4, 5)
    assert r.total_macs == 4 * 4 * 5 * (3 * 3 * 2)
    # groups=2: each output channel sees only half the input channels.
    r = kseg.flops(single(keras.layers.Conv2D(6, 1, groups=2), (4, 4, 4)))
    assert r.total_macs == 4 * 4 * 6 * (1 * 1 * 4 // 2)


def test_transposed_conv_scatters_a_kernel_per_input_pixel():
    # 4x4x2 input, 3 filters, kernel 4, stride 2 ("valid": 10x10 output).
    r = kseg.flops(single(keras.layers.Conv2DTranspose(3, 4, strides=2), (4, 4, 2)))
    assert r.rows[-1].output_shape == (10, 10, 3)
    assert r.total_macs == (4 * 4 * 2) * (4 * 4) * 3


def test_dense_counts_once_per_position():
    assert kseg.flops(single(keras.layers.Dense(5), (10,))).total_macs == 10 * 5
    # A Dense on a (2, 3, 4) map runs at each of the 6 positions.
    assert kseg.flops(single(keras.layers.Dense(5), (2, 3, 4))).total_macs == 6 * 4 * 5


def test_pooling_counts_window_elements():
    r = kseg.flops(single(keras.layers.MaxPooling2D(2), (4, 4, 3)))
    assert (r.total_macs, r.total_flops) == (0, 2 * 2 * 3 * 4)
    r = kseg.flops(single(keras.layers.AveragePooling2D(3, strides=1, padding="same"), (5, 5, 2)))
    assert r.total_flops == 5 * 5 * 2 * 9
    assert kseg.flops(single(keras.layers.GlobalAveragePooling2D(), (7, 7, 8))).total_flops == 7 * 7 * 8


def test_kseg_layers():
    inputs = keras.Input((None, None, 4))
    pooled, argmax = MaxPoolingWithArgmax2D(2, name="pool")(inputs)
    up = MaxUnpooling2D(name="unpool")([pooled, argmax, inputs])
    resized = ResizeToReference(name="resize")([pooled, inputs])
    crop = CropToReference(1, name="crop")([keras.layers.ZeroPadding2D(1)(up), inputs])
    model = keras.Model(inputs, [crop, resized])
    r = {row.name: row for row in kseg.flops(model, (6, 6, 4)).rows}
    assert r["pool"].flops == 3 * 3 * 4 * 4
    assert r["unpool"].flops == 0 and r["unpool"].output_shape == (6, 6, 4)
    assert r["resize"].flops == 7 * 6 * 6 * 4  # 4 multiplies + 3 adds per bilinear output value
    assert r["crop"].flops == 0 and r["crop"].output_shape == (6, 6, 4)


def test_lenet5_connection_table_counts_only_connected_kernels():
    full = kseg.flops(kseg.build_model("lenet5"))
    table = kseg.flops(kseg.build_model("lenet5", c3_table=True))
    c3 = {r.name: r for r in table.rows}["C3"]
    # Table I of the paper: 60 connections between S2's 6 and C3's 16 maps, 10x10 outputs, 5x5 kernels.
    assert c3.macs == 10 * 10 * 60 * 25
    assert {r.name: r for r in full.rows}["C3"].macs == 10 * 10 * 16 * 6 * 25
    # C1, C3, C5, F6, output: 117,600 + 240,000 + 48,000 + 10,080 + 840.
    assert full.total_macs == 416_520


def test_vgg16_at_224():
    # Hand count: (spatial size, [(in, out) of each 3x3 conv]) per block, then the three dense layers.
    blocks = [(224, [(3, 64), (64, 64)]), (112, [(64, 128), (128, 128)]),
              (56, [(128, 256), (256, 256), (256, 256)]), (28, [(256, 512), (512, 512), (512, 512)]),
              (14, [(512, 512)] * 3)]
    conv = sum(s * s * 9 * cin * cout for s, convs in blocks for cin, cout in convs)
    dense = 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    r = kseg.flops(kseg.build_model("vgg16"))
    assert r.total_macs == conv + dense == 15_470_264_320
    # The "15.5 GFLOPs" quoted for VGG16 are MACs; in FLOPs (2 x MACs, + pooling) it is 30.9.
    assert round(r.total_flops / 1e9, 1) == 30.9
    assert r.by_kind()["MaxPooling2D"] == sum(s * s * c * 4 for s, c in ((112, 64), (56, 128), (28, 256),
                                                                         (14, 512), (7, 512)))


def test_deeplab_largefov_at_321_is_101_9_gflops():
    r = kseg.flops(kseg.build_model("deeplab_largefov"), (321, 321, 3))
    # Stride-8 geometry: 321 -> 161 -> 81 -> 41 (Caffe's ceil-mode pools), conv5 and fc6 dilated.
    blocks = [(321, [(3, 64), (64, 64)]), (161, [(64, 128), (128, 128)]),
              (81, [(128, 256), (256, 256), (256, 256)]), (41, [(256, 512), (512, 512), (512, 512)]),
              (41, [(512, 512)] * 3)]
    conv = sum(s * s * 9 * cin * cout for s, convs in blocks for cin, cout in convs)
    head = 41 * 41 * (9 * 512 * 1024 + 1024 * 1024 + 1024 * 21)
    assert r.total_macs == conv + head
    # The reference figure: 101.9 GFLOPs = 2 x 50.93 GMACs (pooling and the final interpolation
    # add 0.06 GFLOPs, which does not change the rounded figure).
    assert round(2 * r.total_macs / 1e9, 1) == 101.9
    assert round(r.total_flops / 1e9, 1) == 101.9


def test_nested_model_layers_are_counted_with_a_prefix():
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Model(inner_in, keras.layers.Conv2D(2, 1, name="conv")(inner_in), name="inner")
    outer_in = keras.Input((8, 8, 3))
    outer = keras.Model(outer_in, keras.layers.Dense(4, name="head")(inner(outer_in)))
    r = kseg.flops(outer)
    names = {row.name: row.macs for row in r.rows}
    assert names == {"inner/conv": 8 * 8 * 2 * 3, "head": 8 * 8 * 4 * 2}


def test_sequential_model():
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    assert kseg.flops(model).total_macs == 4 * 4 * 2 * 9 + 32 * 3


def test_registry_name_and_report_table():
    r = kseg.flops("lenet5")
    text = str(r)
    assert text.splitlines()[0].startswith("lenet5 at 32x32x1: 416,520 MACs")
    assert "C3" in text and "total" in text.splitlines()[-1]
    d = r.to_dict()
    assert d["total_flops"] == r.total_flops and len(d["layers"]) == len(r.rows)


def test_errors_name_the_problem():
    model = kseg.build_model("deeplab_largefov", width=0.125)
    with pytest.raises(ValueError, match="accepts any input size .*pass input_shape"):
        kseg.flops(model)
    with pytest.raises(ValueError, match="does not fit the model's fixed input"):
        kseg.flops(kseg.build_model("lenet5"), (28, 28, 1))
    with pytest.raises(ValueError, match="positive ints"):
        kseg.flops(model, (0, 10, 3))
    with pytest.raises(TypeError, match="keras.Model"):
        kseg.flops(object())
