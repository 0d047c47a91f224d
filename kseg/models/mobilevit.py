"""MobileViT-XXS / -XS / -S (Mehta & Rastegari, ICLR 2022), in timm's weight layout (timm's `mobilevit_xxs`,
`mobilevit_xs`, `mobilevit_s`, ported from Apple's ml-cvnets).

A MobileNetV2-style convnet whose last three stages each end in a MobileViT block, which models global context
with a transformer over 2x2 patches (the paper's Table 4 and Figure 1b):
- stem: 3x3 conv, stride 2, 16 channels;
- stage 1: one inverted residual; stage 2: three (the first at stride 2); stages 3-5: an inverted residual at
  stride 2, then a MobileViT block. Inverted residual (MobileNetV2, Sandler et al. 2018): 1x1 expansion (x2 in
  XXS, x4 in XS and S), 3x3 depthwise, linear 1x1 projection, the identity added where width and size are kept;
- MobileViT block on a (H, W, C) map: a local 3x3 conv (C -> C) and a 1x1 projection to the transformer width
  d (no bias, no norm); unfold into 2x2 patches, giving for each of the P = 4 pixel positions of a patch a
  sequence of the N = HW / 4 patches; L pre-norm transformer layers on each sequence (LayerNorm, multi-head
  self-attention with a fused q/k/v projection and 4 heads, the queries scaled by 1 / sqrt(d / 4); LayerNorm,
  MLP d -> 2d -> d with SiLU; each added to its input), a last LayerNorm; fold back to (H, W, d); 1x1 conv
  d -> C; concatenated with the block's input (input first), a 3x3 fusion conv 2C -> C;
- a 1x1 conv (320 / 384 / 640 channels), global average pooling, a dense classifier.
Each conv but the blocks' 1x1 projection to d is followed by BatchNormalization and SiLU (the inverted
residuals' linear projections by BatchNormalization only).

Widths (stages 1-5; transformer widths d of stages 3-5, with L = 2, 4, 3 layers): XXS 16, 24, 48, 64, 80; d 64,
80, 96. XS 32, 48, 64, 80, 96; d 96, 120, 144. S 32, 64, 96, 128, 160; d 144, 192, 240.

As in timm: BatchNorm epsilon 1e-5 (PyTorch's momentum), LayerNorm epsilon 1e-5, strided convs padded by one
pixel on every side. A feature map of odd height or width is resized bilinearly (half-pixel centres) up to the
next even size before the unfold and back after the fold, as timm and ml-cvnets do, so any input size runs
(the published models were trained at 256x256, where every map is even). Input: RGB in [0, 1] (timm's mean 0,
std 1), kseg's "unit" preprocessing.

Layer names: `stem_{pad,conv,bn,act}`; inverted residuals `stage{s}_block{b}_{expand,depthwise,project}_{conv,bn,
act}` (`_depthwise_pad` before a strided one, `_add` for the residual); MobileViT blocks `stage{s}_mobilevit_`
+ `local_{conv,bn,act}`, `local_proj`, `unfold`, per transformer layer `layer{k}_` + `norm1`, `qkv`,
`attention`, `proj`, `add1`, `norm2`, `fc1`, `mlp_act`, `fc2`, `add2`; `norm`, `fold`, `proj_{conv,bn,act}`,
`concat`, `fusion_{conv,bn,act}`; then `final_{conv,bn,act}`, `avg_pool`, `predictions`.
"""

from __future__ import annotations

import functools
import math

import keras
import tensorflow as tf
from keras import layers

from kseg.models._common import classifier_top, model_input
from kseg.registry import TorchMapping, register_model

PAPER = ("Mehta, Rastegari, MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer, "
         "ICLR 2022")

# name: stage widths (stages 1-5), inverted-residual expansion, transformer widths d (stages 3-5), final conv.
ARCHS = {
    "mobilevit_xxs": ((16, 24, 48, 64, 80), 2, (64, 80, 96), 320),
    "mobilevit_xs": ((32, 48, 64, 80, 96), 4, (96, 120, 144), 384),
    "mobilevit_s": ((32, 64, 96, 128, 160), 4, (144, 192, 240), 640),
}
STEM_WIDTH = 16
IR_REPEATS = (1, 3, 1, 1, 1)  # inverted residuals per stage (the first of stages 2-5 at stride 2)
TRANSFORMER_DEPTHS = (2, 4, 3)  # L of the MobileViT blocks of stages 3-5
PATCH_SIZE = 2
NUM_HEADS = 4
MLP_RATIO = 2
BATCHNORM = dict(epsilon=1e-5, momentum=0.9)  # PyTorch's defaults (Keras counts momentum the other way)
LAYERNORM_EPSILON = 1e-5


# --- weightless layers of the MobileViT block --------------------------------------------------


def _size(x, axis):
    """A static dimension as an int, a dynamic one as a scalar tensor."""
    static = x.shape[axis]
    return static if static is not None else tf.shape(x)[axis]


def _patch_grid(h, w, p):
    """Patches per column and row, and whether the map must be resized to a multiple of the patch size first
    (always where a size is unknown: resizing to the same size is the identity)."""
    static = isinstance(h, int) and isinstance(w, int)
    return (h + p - 1) // p, (w + p - 1) // p, not static or bool(h % p or w % p)


def _resize(x, h, w):
    return tf.cast(tf.image.resize(x, tf.stack([h, w]), method="bilinear"), x.dtype)


@keras.saving.register_keras_serializable(package="kseg")
class MobileViTUnfold(keras.layers.Layer):
    """(B, H, W, C) -> (B, p*p, N, C): the map cut into non-overlapping p x p patches, N = (H/p)(W/p) of them in
    row-major order; sequence i holds pixel i (row-major within the patch) of every patch. A size that is not a
    multiple of p is first resized bilinearly (half-pixel centres) up to the next multiple (timm, ml-cvnets)."""

    def __init__(self, patch_size=PATCH_SIZE, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def call(self, x):
        p, c = self.patch_size, x.shape[-1]
        h, w = _size(x, 1), _size(x, 2)
        nh, nw, resize = _patch_grid(h, w, p)
        if resize:
            x = _resize(x, nh * p, nw * p)
        x = tf.reshape(x, [tf.shape(x)[0], nh, p, nw, p, c])
        x = tf.transpose(x, [0, 2, 4, 1, 3, 5])
        return tf.reshape(x, [tf.shape(x)[0], p * p, nh * nw, c])

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.patch_size
        n = None if h is None or w is None else -(-h // p) * -(-w // p)
        return (b, p * p, n, c)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="kseg")
class MobileViTFold(keras.layers.Layer):
    """The inverse of MobileViTUnfold, called on [tokens (B, p*p, N, C), reference (B, H, W, any)]: the tokens
    back on the (H, W) grid of the reference (the map that was unfolded), resized back where it was resized."""

    def __init__(self, patch_size=PATCH_SIZE, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def call(self, inputs):
        tokens, reference = inputs
        p, c = self.patch_size, tokens.shape[-1]
        h, w = _size(reference, 1), _size(reference, 2)
        nh, nw, resize = _patch_grid(h, w, p)
        x = tf.reshape(tokens, [tf.shape(tokens)[0], p, p, nh, nw, c])
        x = tf.transpose(x, [0, 3, 1, 4, 2, 5])
        x = tf.reshape(x, [tf.shape(x)[0], nh * p, nw * p, c])
        if resize:
            x = _resize(x, h, w)
        x.set_shape((tokens.shape[0], reference.shape[1], reference.shape[2], c))
        return x

    def compute_output_shape(self, input_shape):
        tokens, reference = input_shape
        return (tokens[0], reference[1], reference[2], tokens[-1])

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="kseg")
class MobileViTAttention(keras.layers.Layer):
    """Multi-head scaled dot-product self-attention over the second-to-last axis, from a fused projection:
    (..., N, 3d) -> (..., N, d). The last axis holds q, k, v, each as `num_heads` heads of d / num_heads
    channels (timm's `attn.qkv` layout); softmax(q k^T / sqrt(d / num_heads)) v per head, the scale applied to
    the queries (timm's Attention), the heads concatenated. Weightless: the projections are Dense layers."""

    def __init__(self, num_heads=NUM_HEADS, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def build(self, input_shape):
        fused = input_shape[-1]
        if fused is None or fused % (3 * self.num_heads):
            raise ValueError(f"{self.name}: the fused q/k/v width must be a multiple of 3 x {self.num_heads} heads, "
                             f"got {fused}")

    def call(self, qkv):
        dim = qkv.shape[-1] // 3
        head_dim = dim // self.num_heads
        shape = tf.shape(qkv)
        n = shape[-2]
        x = tf.reshape(qkv, [-1, n, 3, self.num_heads, head_dim])
        q, k, v = tf.unstack(tf.transpose(x, [2, 0, 3, 1, 4]))  # each (batch, heads, N, head_dim)
        q = q * tf.cast(head_dim ** -0.5, q.dtype)
        weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True), axis=-1)
        out = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])  # (batch, N, heads, head_dim)
        out = tf.reshape(out, tf.concat([shape[:-1], [dim]], axis=0))
        out.set_shape(qkv.shape[:-1] + (dim,))
        return out

    def count_macs(self, input_shape):
        """kseg.flops: q k^T and the weighted sum of v, 2 N^2 d multiply-adds per patch position (per sample)."""
        *lead, n, fused = input_shape
        return 2 * math.prod(lead) * n * n * (fused // 3)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 3)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


# --- architecture ------------------------------------------------------------------------------


def block_config(arch):
    """The blocks of `arch` in order: ("ir", name, timm prefix, output channels, stride, expansion) for the
    inverted residuals, ("mobilevit", name, timm prefix, transformer width, layers) for the MobileViT blocks."""
    widths, expansion, dims, _ = ARCHS[arch]
    out = []
    for stage, (width, repeats) in enumerate(zip(widths, IR_REPEATS)):
        for j in range(repeats):
            stride = 2 if stage and j == 0 else 1
            out.append(("ir", f"stage{stage + 1}_block{j + 1}", f"stages.{stage}.{j}", width, stride, expansion))
        if stage >= 2:
            out.append(("mobilevit", f"stage{stage + 1}_mobilevit", f"stages.{stage}.{repeats}", dims[stage - 2],
                        TRANSFORMER_DEPTHS[stage - 2]))
    return out


def _conv_bn(x, filters, kernel, name, *, stride=1, depthwise=False, activation=True):
    """Conv (no bias; strided ones padded k // 2 on every side, as PyTorch), BatchNorm, SiLU."""
    padding = "same"
    if stride > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn", **BATCHNORM)(x)
    return layers.Activation("silu", name=f"{name}_act")(x) if activation else x


def inverted_residual(x, filters, stride, expansion, name):
    """MobileNetV2's block with SiLU: 1x1 expand, 3x3 depthwise, linear 1x1 projection, identity added where
    the shape is kept."""
    y = _conv_bn(x, x.shape[-1] * expansion, 1, f"{name}_expand")
    y = _conv_bn(y, None, 3, f"{name}_depthwise", stride=stride, depthwise=True)
    y = _conv_bn(y, filters, 1, f"{name}_project", activation=False)
    if stride == 1 and x.shape[-1] == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def transformer_layer(x, dim, name):
    """Pre-norm transformer layer on (B, P, N, d) tokens: x + proj(attention(qkv(norm1(x)))), then
    x + fc2(silu(fc1(norm2(x))))."""
    y = layers.LayerNormalization(epsilon=LAYERNORM_EPSILON, name=f"{name}_norm1")(x)
    y = layers.Dense(3 * dim, name=f"{name}_qkv")(y)
    y = MobileViTAttention(NUM_HEADS, name=f"{name}_attention")(y)
    y = layers.Dense(dim, name=f"{name}_proj")(y)
    x = layers.Add(name=f"{name}_add1")([x, y])
    y = layers.LayerNormalization(epsilon=LAYERNORM_EPSILON, name=f"{name}_norm2")(x)
    y = layers.Dense(MLP_RATIO * dim, name=f"{name}_fc1")(y)
    y = layers.Activation("silu", name=f"{name}_mlp_act")(y)
    y = layers.Dense(dim, name=f"{name}_fc2")(y)
    return layers.Add(name=f"{name}_add2")([x, y])


def mobilevit_block(x, dim, depth, name):
    """Local representation (3x3 conv, 1x1 projection to d), global representation (unfold into 2x2 patches,
    `depth` transformer layers, LayerNorm, fold), 1x1 conv back to the input width, fusion with the input (a
    3x3 conv on their concatenation)."""
    channels = x.shape[-1]
    local = _conv_bn(x, channels, 3, f"{name}_local")
    local = layers.Conv2D(dim, 1, use_bias=False, name=f"{name}_local_proj")(local)
    y = MobileViTUnfold(PATCH_SIZE, name=f"{name}_unfold")(local)
    for k in range(depth):
        y = transformer_layer(y, dim, f"{name}_layer{k + 1}")
    y = layers.LayerNormalization(epsilon=LAYERNORM_EPSILON, name=f"{name}_norm")(y)
    y = MobileViTFold(PATCH_SIZE, name=f"{name}_fold")([y, local])
    y = _conv_bn(y, channels, 1, f"{name}_proj")
    y = layers.Concatenate(name=f"{name}_concat")([x, y])
    return _conv_bn(y, channels, 3, f"{name}_fusion")


def mobilevit_trunk(x, arch):
    """The stem, the five stages and the final 1x1 conv (`final_act`, stride 32)."""
    x = _conv_bn(x, STEM_WIDTH, 3, "stem", stride=2)
    for kind, name, _, *rest in block_config(arch):
        if kind == "ir":
            filters, stride, expansion = rest
            x = inverted_residual(x, filters, stride, expansion, name)
        else:
            dim, depth = rest
            x = mobilevit_block(x, dim, depth, name)
    return _conv_bn(x, ARCHS[arch][3], 1, "final")


def torch_map(arch):
    """timm's `mobilevit_*` state_dict keys (a ByobNet, timm/models/byobnet.py and mobilevit.py): `stem`,
    `stages.{i}.{j}` and `final_conv` are ConvNormActs (`.conv`, `.bn`); an inverted residual (BottleneckBlock)
    has `conv1_1x1`, `conv2_kxk` (depthwise) and `conv3_1x1`; a MobileVitBlock `conv_kxk`, `conv_1x1` (a bare
    conv), `transformer.{k}` (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`), `norm`,
    `conv_proj` and `conv_fusion`; the classifier is `head.fc`."""

    def conv_bn(prefix, name, kind="conv"):
        return [TorchMapping(f"{prefix}.conv", f"{name}_conv", kind), TorchMapping(f"{prefix}.bn", f"{name}_bn", "bn")]

    out = conv_bn("stem", "stem")
    for kind, name, prefix, *rest in block_config(arch):
        if kind == "ir":
            out += conv_bn(f"{prefix}.conv1_1x1", f"{name}_expand")
            out += conv_bn(f"{prefix}.conv2_kxk", f"{name}_depthwise", "depthwise")
            out += conv_bn(f"{prefix}.conv3_1x1", f"{name}_project")
            continue
        out += conv_bn(f"{prefix}.conv_kxk", f"{name}_local")
        out.append(TorchMapping(f"{prefix}.conv_1x1", f"{name}_local_proj", "conv"))
        for k in range(rest[1]):
            torch_layer, keras_layer = f"{prefix}.transformer.{k}", f"{name}_layer{k + 1}"
            out += [TorchMapping(f"{torch_layer}.norm1", f"{keras_layer}_norm1", "layernorm"),
                    TorchMapping(f"{torch_layer}.attn.qkv", f"{keras_layer}_qkv", "dense"),
                    TorchMapping(f"{torch_layer}.attn.proj", f"{keras_layer}_proj", "dense"),
                    TorchMapping(f"{torch_layer}.norm2", f"{keras_layer}_norm2", "layernorm"),
                    TorchMapping(f"{torch_layer}.mlp.fc1", f"{keras_layer}_fc1", "dense"),
                    TorchMapping(f"{torch_layer}.mlp.fc2", f"{keras_layer}_fc2", "dense")]
        out.append(TorchMapping(f"{prefix}.norm", f"{name}_norm", "layernorm"))
        out += conv_bn(f"{prefix}.conv_proj", f"{name}_proj")
        out += conv_bn(f"{prefix}.conv_fusion", f"{name}_fusion")
    return out + conv_bn("final_conv", "final") + [TorchMapping("head.fc", "predictions", "dense")]


# --- builders ------------------------------------------------------------------------------------


def _mobilevit(arch, *, num_classes, input_shape, include_top, pooling, classifier_activation):
    inputs = model_input(input_shape, (256, 256, 3) if include_top else (None, None, 3))
    x = mobilevit_trunk(inputs, arch)
    x = classifier_top(x, include_top=include_top, pooling=pooling, num_classes=num_classes,
                       classifier_activation=classifier_activation)
    return keras.Model(inputs, x, name=arch)


def _spec(arch, params):
    return dict(task="classification", paper=PAPER, input_shape=(256, 256, 3), num_classes=1000,
                preprocessing="unit", params=params, torch_map=functools.partial(torch_map, arch))


# params: Keras' count_params() with defaults, BatchNorm moving statistics included (timm's counts leave them
# out: 1,272,024 / 2,317,848 / 5,578,632).
@register_model("mobilevit_xxs", **_spec("mobilevit_xxs", 1_276_136))
def mobilevit_xxs(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None):
    """MobileViT-XXS: inverted residuals and three MobileViT blocks (d = 64, 80, 96), 1.3M parameters."""
    return _mobilevit("mobilevit_xxs", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                      pooling=pooling, classifier_activation=classifier_activation)


@register_model("mobilevit_xs", **_spec("mobilevit_xs", 2_326_296))
def mobilevit_xs(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None):
    """MobileViT-XS: inverted residuals and three MobileViT blocks (d = 96, 120, 144), 2.3M parameters."""
    return _mobilevit("mobilevit_xs", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                      pooling=pooling, classifier_activation=classifier_activation)


@register_model("mobilevit_s", **_spec("mobilevit_s", 5_590_888))
def mobilevit_s(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None):
    """MobileViT-S: inverted residuals and three MobileViT blocks (d = 144, 192, 240), 5.6M parameters."""
    return _mobilevit("mobilevit_s", num_classes=num_classes, input_shape=input_shape, include_top=include_top,
                      pooling=pooling, classifier_activation=classifier_activation)
