"""RepVGG-A0 / A1 / A2 / B0 / B1 (Ding, Zhang, Ma, Han, Ding, Sun 2021), in timm's weight layout.

A RepVGG trains as a multi-branch net and deploys as a plain VGG-style stack of 3x3 convs and ReLUs.
Each train-time block sums three branches, then applies a ReLU:
- a 3x3 conv (no bias) + BatchNormalization,
- a 1x1 conv (no bias) + BatchNormalization, at the block's stride,
- the input through a BatchNormalization alone ("identity"), where the block keeps its width and stride.
In inference each branch is an affine function of the input, so `reparameterize(model)` folds them into one
3x3 conv with a bias per block (the paper's structural re-parameterization): the 1x1 kernel padded to 3x3,
the identity a 3x3 kernel with a 1 at the centre of channel i -> i, each scaled by its BatchNorm. The
result computes the same function as a plain conv-ReLU stack. `build_model(name, deploy=True)` builds that
deploy form directly (weights: a Keras file of a deploy model, or timm's state_dict after its blocks'
reparameterize()).

Architecture (the paper's Table 2; timm's `repvgg_*` configs in timm/models/byobnet.py): five stages of
1, 2|4, 4|6, 14|16, 1 blocks (A|B), the first block of each at stride 2; widths min(64, 64a), 64a, 128a,
256a, 512b; global average pooling and a dense classifier. A0: a=0.75, b=2.5; A1: a=1, b=2.5; A2: a=1.5,
b=2.75; B0: a=1, b=2.5; B1: a=2, b=4.

Layer names follow the paper's stages: block `stage{s}_block{b}` (stage 1 is timm's `stem`, stages 2-5 are
timm's `stages.0` - `stages.3`) holds `_3x3_pad` (strided blocks: timm pads 1 on every side, Keras' "same"
would pad only bottom / right), `_3x3_conv`, `_3x3_bn`, `_1x1_conv`, `_1x1_bn`, `_identity_bn`, `_add` and
`_relu`; in the deploy form `_pad`, `_conv` and `_relu`. The head is `avg_pool` and `predictions`.
BatchNorm is PyTorch's (epsilon 1e-5, momentum 0.1). Preprocessing: torch (ImageNet mean / std).
"""

from __future__ import annotations

import functools
import re

import keras
import numpy as np
from keras import layers

from kseg.models._common import classifier_top, model_input
from kseg.registry import TorchMapping, register_model

PAPER = "Ding, Zhang, Ma, Han, Ding, Sun, RepVGG: Making VGG-style ConvNets Great Again, CVPR 2021"

# Blocks per stage 2-5 (stage 1 is one block) and the width multipliers (a, b) of the paper's Table 2.
ARCHS = {
    "repvgg_a0": ((2, 4, 14, 1), (0.75, 2.5)),
    "repvgg_a1": ((2, 4, 14, 1), (1.0, 2.5)),
    "repvgg_a2": ((2, 4, 14, 1), (1.5, 2.75)),
    "repvgg_b0": ((4, 6, 16, 1), (1.0, 2.5)),
    "repvgg_b1": ((4, 6, 16, 1), (2.0, 4.0)),
}
BASE_WIDTHS = (64, 128, 256, 512)
# PyTorch's nn.BatchNorm2d defaults (Keras counts momentum the other way).
BATCHNORM = dict(epsilon=1e-5, momentum=0.9)

_TRAIN_BLOCK = re.compile(r"^(stage\d+_block\d+)_3x3_conv$")


def block_config(arch: str) -> list[tuple[str, int, int]]:
    """(block name, filters, stride) of every block of `arch`, in order."""
    depths, (a, b) = ARCHS[arch]
    widths = [int(64 * a), int(128 * a), int(256 * a), int(512 * b)]
    blocks = [("stage1_block1", min(64, int(64 * a)), 2)]
    for stage, (n, filters) in enumerate(zip(depths, widths), start=2):
        blocks += [(f"stage{stage}_block{i}", filters, 2 if i == 1 else 1) for i in range(1, n + 1)]
    return blocks


def feature_names(arch: str) -> dict[str, str]:
    """Named feature maps for heads: C1 (stride 2) .. C5 (stride 32), each stage's last ReLU (both forms)."""
    depths, _ = ARCHS[arch]
    names = {"C1": "stage1_block1_relu"}
    for stage, n in enumerate(depths, start=2):
        names[f"C{stage}"] = f"stage{stage}_block{n}_relu"
    return names


def torch_map(arch):
    """timm's `repvgg_*` state_dict keys (timm/models/byobnet.py's ByobNet of RepVggBlocks) for `arch`.

    Train form: `stem` / `stages.{i}.{j}` with `.conv_kxk.conv`, `.conv_kxk.bn`, `.conv_1x1.conv`,
    `.conv_1x1.bn` and `.identity` (a BatchNorm) where the block has one; `head.fc`. A model built with
    deploy=True reads the keys of a timm model after its blocks' reparameterize(): `.reparam_conv`.
    Entries of the other form name layers the model lacks, so each form skips the other's.
    """
    out = []
    for index, (name, _, _) in enumerate(block_config(arch)):
        stage, block = (int(s) for s in re.findall(r"\d+", name))
        prefix = "stem" if stage == 1 else f"stages.{stage - 2}.{block - 1}"
        out += [
            TorchMapping(f"{prefix}.conv_kxk.conv", f"{name}_3x3_conv", "conv"),
            TorchMapping(f"{prefix}.conv_kxk.bn", f"{name}_3x3_bn", "bn"),
            TorchMapping(f"{prefix}.conv_1x1.conv", f"{name}_1x1_conv", "conv"),
            TorchMapping(f"{prefix}.conv_1x1.bn", f"{name}_1x1_bn", "bn"),
            TorchMapping(f"{prefix}.reparam_conv", f"{name}_conv", "conv"),
        ]
        if _has_identity(arch, index):
            out.append(TorchMapping(f"{prefix}.identity", f"{name}_identity_bn", "bn"))
    return out + [TorchMapping("head.fc", "predictions", "dense")]


def _block_input(model, name):
    """The tensor a train-time block starts from: its 3x3 branch's input (before the padding at stride 2)."""
    names = {layer.name for layer in model.layers}
    first = f"{name}_3x3_pad" if f"{name}_3x3_pad" in names else f"{name}_3x3_conv"
    return model.get_layer(first).input


def _has_identity(arch, index):
    blocks = block_config(arch)
    _, filters, stride = blocks[index]
    in_filters = 3 if index == 0 else blocks[index - 1][1]
    return stride == 1 and filters == in_filters


def _padded(x, stride, name):
    """(input, padding) of a 3x3 conv padded 1 on every side, as PyTorch's padding=1 at any stride."""
    if stride == 1:
        return x, "same"
    return layers.ZeroPadding2D(1, name=name)(x), "valid"


def train_block(x, filters, stride, name):
    """The train-time block: ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])."""
    branch3, padding = _padded(x, stride, f"{name}_3x3_pad")
    branch3 = layers.Conv2D(filters, 3, strides=stride, padding=padding, use_bias=False,
                            name=f"{name}_3x3_conv")(branch3)
    branch3 = layers.BatchNormalization(name=f"{name}_3x3_bn", **BATCHNORM)(branch3)
    # A 1x1 conv at stride 2 samples the inputs at the centres of the padded 3x3's windows.
    sampled, stride1 = x, stride
    if stride > 1 and x.shape[-1] < 16:
        # On the image (3 channels): the samples taken first (a 1x1 max-pool, exact), then the 1x1 conv at
        # stride 1. TF 2.21's oneDNN filter gradient of a strided 1x1 conv over fewer than 16 channels
        # crashes the process (heap corruption) from 128-pixel inputs on.
        sampled, stride1 = layers.MaxPooling2D(1, strides=stride, name=f"{name}_1x1_sample")(x), 1
    branch1 = layers.Conv2D(filters, 1, strides=stride1, use_bias=False, name=f"{name}_1x1_conv")(sampled)
    branch1 = layers.BatchNormalization(name=f"{name}_1x1_bn", **BATCHNORM)(branch1)
    branches = [branch3, branch1]
    if stride == 1 and x.shape[-1] == filters:
        branches.append(layers.BatchNormalization(name=f"{name}_identity_bn", **BATCHNORM)(x))
    x = layers.Add(name=f"{name}_add")(branches)
    return layers.ReLU(name=f"{name}_relu")(x)


def deploy_block(x, filters, stride, name):
    """The inference-time block: ReLU(conv3x3(x) + bias)."""
    x, padding = _padded(x, stride, f"{name}_pad")
    x = layers.Conv2D(filters, 3, strides=stride, padding=padding, name=f"{name}_conv")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def repvgg_trunk(x, arch, *, deploy=False):
    """The five stages of `arch` (stride 32), in the train or the deploy form."""
    block = deploy_block if deploy else train_block
    for name, filters, stride in block_config(arch):
        x = block(x, filters, stride, name)
    return x


def _repvgg(arch, *, num_classes, input_shape, include_top, pooling, classifier_activation, deploy):
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    x = repvgg_trunk(inputs, arch, deploy=deploy)
    x = classifier_top(x, include_top=include_top, pooling=pooling, num_classes=num_classes,
                       classifier_activation=classifier_activation)
    return keras.Model(inputs, x, name=arch)


# --- structural re-parameterization -------------------------------------------------------------


def _fold_bn(kernel, bn):
    """A bias-free conv kernel (HWIO, float64) followed by the inference-mode BatchNormalization `bn`,
    as one kernel and bias."""
    channels = kernel.shape[-1]
    gamma = _array(bn.gamma) if bn.scale else np.ones(channels)
    beta = _array(bn.beta) if bn.center else np.zeros(channels)
    scale = gamma / np.sqrt(_array(bn.moving_variance) + bn.epsilon)
    return kernel * scale, beta - _array(bn.moving_mean) * scale


def _array(variable):
    return keras.ops.convert_to_numpy(variable).astype(np.float64)


def fuse_block(model, name):
    """The deploy form's 3x3 kernel (HWIO) and bias of the train-form block `name` of `model`."""
    kernel, bias = _fold_bn(_array(model.get_layer(f"{name}_3x3_conv").kernel), model.get_layer(f"{name}_3x3_bn"))
    conv1 = np.pad(_array(model.get_layer(f"{name}_1x1_conv").kernel), ((1, 1), (1, 1), (0, 0), (0, 0)))
    k1, b1 = _fold_bn(conv1, model.get_layer(f"{name}_1x1_bn"))
    kernel, bias = kernel + k1, bias + b1
    if any(layer.name == f"{name}_identity_bn" for layer in model.layers):
        channels = kernel.shape[-1]
        eye = np.zeros((3, 3, channels, channels))
        eye[1, 1] = np.eye(channels)
        ki, bi = _fold_bn(eye, model.get_layer(f"{name}_identity_bn"))
        kernel, bias = kernel + ki, bias + bi
    return kernel.astype(np.float32), bias.astype(np.float32)


def reparameterize(model):
    """A new Keras model in the deploy form computing what the train-form RepVGG `model` computes in
    inference (BatchNorm with its moving statistics): one 3x3 conv with a bias and a ReLU per block.

    Works for any model this module built (any num_classes, input size, include_top / pooling): the layers
    after the last block (pooling, classifier) are copied with their weights, and the input, output and
    model names are kept. A model made by kseg.build_model keeps its identity, with deploy=True.
    """
    blocks = [m.group(1) for m in (_TRAIN_BLOCK.match(layer.name) for layer in model.layers) if m]
    if not blocks:
        raise ValueError(f"{model.name}: no train-form RepVGG blocks (`stage*_block*_3x3_conv` layers) to "
                         "reparameterize; is it already in the deploy form?")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{model.name}: expected a RepVGG with one input and one output")
    source_input = model.inputs[0]
    inputs = keras.Input(shape=tuple(source_input.shape[1:]), name=source_input.name, dtype=source_input.dtype)
    x, fused, expected = inputs, {}, source_input
    for name in blocks:
        # The blocks must form the chain the builder makes, from the input on: nothing before or between them.
        if _block_input(model, name) is not expected:
            raise ValueError(f"{model.name}: block {name} does not follow {expected.name!r}; "
                             "reparameterize takes the RepVGG models kseg builds")
        expected = model.get_layer(f"{name}_relu").output
        conv = model.get_layer(f"{name}_3x3_conv")
        x = deploy_block(x, conv.filters, conv.strides[0], name)
        fused[f"{name}_conv"] = fuse_block(model, name)
    # The head: the chain of layers after the last block's ReLU, each re-created from its config.
    previous = model.get_layer(f"{blocks[-1]}_relu")
    order = [layer.name for layer in model.layers]
    copied = {}
    for layer in model.layers[order.index(previous.name) + 1:]:
        if layer.input is not previous.output:
            raise ValueError(f"{model.name}: layer {layer.name!r} does not follow {previous.name!r}; "
                             "reparameterize takes the RepVGG models kseg builds")
        clone = type(layer).from_config(layer.get_config())
        x = clone(x)
        copied[clone] = layer.get_weights()
        previous = layer
    if model.outputs[0] is not previous.output:
        raise ValueError(f"{model.name}: its output is not the last layer's; "
                         "reparameterize takes the RepVGG models kseg builds")
    deployed = keras.Model(inputs, x, name=model.name)
    for name, arrays in fused.items():
        deployed.get_layer(name).set_weights(list(arrays))
    for clone, arrays in copied.items():
        clone.set_weights(arrays)
    _keep_identity(model, deployed)
    return deployed


def _keep_identity(model, deployed):
    from kseg.api import model_info, remember_identity

    info = model_info(model)
    if info is not None:
        info["kwargs"] = {**info.get("kwargs", {}), "deploy": True}
        remember_identity(deployed, info)


# --- registry ------------------------------------------------------------------------------------


_COMMON = dict(task="classification", paper=PAPER, input_shape=(224, 224, 3), num_classes=1000,
               preprocessing="torch")


def _spec(arch, params):
    return dict(params=params, torch_map=functools.partial(torch_map, arch), **_COMMON)


# params: Keras' count_params() of the train form with defaults, BatchNorm moving statistics included (timm's
# counts leave them out: A0 9,108,968, A1 14,092,264, A2 28,210,600, B0 15,817,960, B1 57,415,016). The
# deploy form (deploy=True or reparameterize): 8,309,384, 12,789,864, 25,499,944, 14,339,048, 51,829,480.
@register_model("repvgg_a0", **_spec("repvgg_a0", 9_132_616))
def repvgg_a0(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              deploy=False):
    """RepVGG-A0 (1-2-4-14-1 blocks, a=0.75, b=2.5), timm's layout; deploy=True builds the re-parameterized form."""
    return _repvgg("repvgg_a0", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, classifier_activation=classifier_activation, deploy=deploy)


@register_model("repvgg_a1", **_spec("repvgg_a1", 14_122_088))
def repvgg_a1(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              deploy=False):
    """RepVGG-A1 (1-2-4-14-1 blocks, a=1, b=2.5), timm's layout; deploy=True builds the re-parameterized form."""
    return _repvgg("repvgg_a1", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, classifier_activation=classifier_activation, deploy=deploy)


@register_model("repvgg_a2", **_spec("repvgg_a2", 28_253_160))
def repvgg_a2(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              deploy=False):
    """RepVGG-A2 (1-2-4-14-1 blocks, a=1.5, b=2.75), timm's layout; deploy=True builds the re-parameterized form."""
    return _repvgg("repvgg_a2", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, classifier_activation=classifier_activation, deploy=deploy)


@register_model("repvgg_b0", **_spec("repvgg_b0", 15_853_160))
def repvgg_b0(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              deploy=False):
    """RepVGG-B0 (1-4-6-16-1 blocks, a=1, b=2.5), timm's layout; deploy=True builds the re-parameterized form."""
    return _repvgg("repvgg_b0", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, classifier_activation=classifier_activation, deploy=deploy)


@register_model("repvgg_b1", **_spec("repvgg_b1", 57_483_112))
def repvgg_b1(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              deploy=False):
    """RepVGG-B1 (1-4-6-16-1 blocks, a=2, b=4), timm's layout; deploy=True builds the re-parameterized form."""
    return _repvgg("repvgg_b1", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                   pooling=pooling, classifier_activation=classifier_activation, deploy=deploy)
