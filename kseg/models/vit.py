"""Vision Transformers: ViT-B/16 (Dosovitskiy et al. 2021, torchvision.models.vit_b_16) and DeiT-Ti / S / B
with and without the distillation token (Touvron et al. 2021, timm's deit_*_patch16_224 and
deit_*_distilled_patch16_224).

One architecture: the image cut into 16x16 patches by a strided conv (`patch_embed`), a learned class token
(`class_token`; DeiT's distilled models also a distillation token, `dist_token`, after it) prepended, a learned
position embedding added (`pos_embed`), then pre-norm encoder blocks `block_{i}_`: LayerNorm (eps 1e-6)
`norm1`, multi-head self-attention (`attn_qkv`: the fused query / key / value projection, one Dense of 3 x width
units; `attn`: the attention itself; `attn_proj`: the output projection), residual `add1`; LayerNorm `norm2`,
MLP `mlp_fc1`, exact GELU `mlp_gelu`, `mlp_fc2`, residual `add2`. A final LayerNorm `norm`, and the head on the class
token (`predictions`). The distilled models have a second head on the distillation token (`head_dist`, the
class token's is `head`); their output is the average of the two heads' logits, as timm's evaluation mode
returns (`distilled_training=True`: both logits, `predictions` and `predictions_dist`, for training against a
teacher as the paper's hard distillation does).

Weights: vit_b_16 maps torchvision's state_dict keys, the DeiT models timm's (the published DeiT files, with
their `model` wrapper). The class / distillation tokens and the position embedding are each a layer with a
single weight of the torch parameter's shape (1, 1, width) / (1, tokens, width).

Other input sizes: the position embedding is stored for the patch grid of `pos_embed_size` (224 by default,
the published weights' 14x14) and, built for another size, resampled in the graph to the input's grid, the
class / distillation tokens' positions kept -- so a 224 file loads into a model at any size (multiples of 16;
built with input_shape=(None, None, 3), any size at run time). The resampling is bicubic, as each reference
resamples its checkpoints: vit_b_16 as torchvision's `interpolate_embeddings` (align_corners=True, the Keys
kernel with a = -0.75), the DeiT models as timm's `resample_abs_pos_embed` (half-pixel centres, antialiased:
the kernel with a = -0.5, widened by the size ratio when shrinking, weights normalised); `pos_embed_resample`
picks either for any model.

Options (training only, identity at inference): `dropout` (after the position embedding, the attention
projection and both MLP layers, as torchvision's `dropout` and timm's `drop_rate`), `attention_dropout` (on
the attention probabilities) and `drop_path` (stochastic depth, Huang et al. 2016: whole residual branches
dropped per sample, the rate rising linearly from 0 in the first block to `drop_path` in the last, as timm's
`drop_path_rate`; DeiT's recipe uses 0.1).

include_top=False: the final LayerNorm's patch tokens as an (N, H/16, W/16, width) map (pooling=None), the
class token (pooling="token"; distilled: the mean of the class and distillation tokens, timm's pre-logits), or
the map's global average / max ("avg" / "max").

Fed torchvision's / timm's ImageNet mean/std normalisation ("torch").
"""

from __future__ import annotations

import functools
import math

import keras
from keras import layers, ops

from kseg.models._common import classifier_head, global_pooling, model_input
from kseg.registry import TorchMapping, register_model

VIT_PAPER = ("Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, "
             "ICLR 2021")
DEIT_PAPER = ("Touvron et al., Training data-efficient image transformers & distillation through attention, "
              "ICML 2021")

# name -> (patch size, width, depth, heads, MLP width, distilled): Dosovitskiy et al., Table 1 (ViT-Base);
# Touvron et al., Table 1 (DeiT-Ti / S / B, MLP ratio 4).
ARCHS = {
    "vit_b_16": (16, 768, 12, 12, 3072, False),
    "deit_tiny": (16, 192, 12, 3, 768, False),
    "deit_small": (16, 384, 12, 6, 1536, False),
    "deit_base": (16, 768, 12, 12, 3072, False),
    "deit_tiny_distilled": (16, 192, 12, 3, 768, True),
    "deit_small_distilled": (16, 384, 12, 6, 1536, True),
    "deit_base_distilled": (16, 768, 12, 12, 3072, True),
}
RESAMPLERS = ("torchvision", "timm")
POOLINGS = (None, "token", "avg", "max")
LAYER_NORM_EPSILON = 1e-6
# timm's initialisation (DeiT's): truncated normal, std 0.02, for the dense layers, tokens and embedding.
_INIT = dict(mean=0.0, stddev=0.02)


# --- layers ---------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="kseg")
class ViTToken(keras.layers.Layer):
    """A learned token (1, 1, width), prepended to every sequence: ViT's class token, DeiT's distillation
    token. Its single weight has the torch parameter's shape (torch map kind "vector")."""

    def __init__(self, initializer_stddev=0.02, **kwargs):
        super().__init__(**kwargs)
        self.initializer_stddev = initializer_stddev

    def build(self, input_shape):
        self.token = self.add_weight(name="token", shape=(1, 1, input_shape[-1]),
                                     initializer=keras.initializers.TruncatedNormal(stddev=self.initializer_stddev))

    def call(self, x):
        token = ops.broadcast_to(ops.cast(self.token, x.dtype), (ops.shape(x)[0], 1, x.shape[-1]))
        return ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "initializer_stddev": self.initializer_stddev}


@keras.saving.register_keras_serializable(package="kseg")
def gelu_erf(x):
    """The exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))), as torch computes it (nn.GELU()). Keras'
    "gelu" is the same function through erfc, which neither ONNX (tf2onnx) nor TFLite's builtins have."""
    return 0.5 * x * (1.0 + ops.erf(x * math.sqrt(0.5)))


def _cubic(x, a):
    """The cubic convolution kernel (Keys 1981) with parameter a: zero beyond |x| = 2."""
    x = ops.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return ops.where(x <= 1.0, near, ops.where(x < 2.0, far, ops.zeros_like(x)))


def resample_matrix(size, grid, mode):
    """The (size, grid) matrix that resamples `grid` positions to `size` along one axis (size may be a
    traced scalar): "torchvision", bicubic with align_corners=True and a = -0.75, indices clamped at the
    borders (torch's interpolate(mode="bicubic", align_corners=True)); "timm", bicubic on half-pixel centres
    with antialiasing (torch's interpolate(mode="bicubic", antialias=True)): the a = -0.5 kernel, widened by
    grid / size when shrinking, each row's weights normalised to sum to 1."""
    out = ops.cast(ops.arange(size), "float32")
    src = ops.cast(ops.arange(grid), "float32")
    size_f = ops.cast(size, "float32")
    if mode == "torchvision":
        scale = ops.where(size_f > 1.0, (grid - 1.0) / ops.maximum(size_f - 1.0, 1.0), 0.0)
        position = out * scale
        base = ops.floor(position)
        fraction = position - base
        matrix = 0.0
        for k in (-1, 0, 1, 2):
            index = ops.clip(base + k, 0.0, grid - 1.0)
            hit = ops.cast(ops.equal(index[:, None], src[None, :]), "float32")
            matrix = matrix + _cubic(fraction - k, -0.75)[:, None] * hit
        return matrix
    scale = grid / size_f
    stretch = ops.maximum(scale, 1.0)
    centre = scale * (out + 0.5)
    weights = _cubic((src[None, :] + 0.5 - centre[:, None]) / stretch, -0.5)
    return weights / ops.sum(weights, axis=1, keepdims=True)


@keras.saving.register_keras_serializable(package="kseg")
class ViTPositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to the token sequence. Inputs: [tokens (N, prefix + h * w, width),
    the patch map (N, h, w, width) they were flattened from (for h and w)].

    The single weight (1, prefix + grid_h * grid_w, width) (torch map kind "vector") covers the `grid` it was
    trained on; at another h x w its patch part is resampled by `resample` ("torchvision" or "timm", see
    resample_matrix), separably, rows then columns; the `prefix` class / distillation tokens' rows are kept.
    """

    def __init__(self, grid, prefix_tokens=1, resample="timm", **kwargs):
        super().__init__(**kwargs)
        if resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {RESAMPLERS}, got {resample!r}")
        self.grid = tuple(int(g) for g in grid)
        self.prefix_tokens = int(prefix_tokens)
        self.resample = resample

    def build(self, input_shape):
        width = input_shape[0][-1]
        length = self.prefix_tokens + self.grid[0] * self.grid[1]
        self.embedding = self.add_weight(name="embedding", shape=(1, length, width),
                                         initializer=keras.initializers.TruncatedNormal(**_INIT))

    def resampled(self, height, width):
        """The embedding for an h x w patch grid (ints or traced scalars), (1, prefix + h * w, channels)."""
        embedding = ops.cast(self.embedding, "float32")
        if all(isinstance(s, int) for s in (height, width)) and (height, width) == self.grid:
            return embedding
        gh, gw = self.grid
        channels = embedding.shape[-1]
        prefix, grid = embedding[0, :self.prefix_tokens], embedding[0, self.prefix_tokens:]
        rows = ops.matmul(resample_matrix(height, gh, self.resample), ops.reshape(grid, (gh, gw * channels)))
        columns = ops.reshape(ops.transpose(ops.reshape(rows, (-1, gw, channels)), (1, 0, 2)), (gw, -1))
        columns = ops.matmul(resample_matrix(width, gw, self.resample), columns)  # (w, h * channels)
        patches = ops.reshape(ops.transpose(ops.reshape(columns, (-1, height, channels)), (1, 0, 2)),
                              (-1, channels))
        return ops.concatenate([prefix, patches], axis=0)[None]

    def call(self, inputs):
        tokens, patches = inputs
        shape = ops.shape(patches)
        return tokens + ops.cast(self.resampled(shape[1], shape[2]), tokens.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "grid": list(self.grid), "prefix_tokens": self.prefix_tokens,
                "resample": self.resample}


@keras.saving.register_keras_serializable(package="kseg")
class ViTAttention(keras.layers.Layer):
    """Scaled dot-product self-attention over `num_heads` heads, from the fused query / key / value
    projection (N, L, 3 x width) -- a Dense before it, ordered q, k, v and head-major within each, as
    torch.nn.MultiheadAttention's in_proj and timm's qkv -- to the heads' concatenated outputs (N, L, width),
    before the output projection (a Dense after it). `dropout` on the attention probabilities (training)."""

    def __init__(self, num_heads, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.attention_dropout = layers.Dropout(self.dropout) if self.dropout else None

    def call(self, qkv, training=None):
        width = qkv.shape[-1] // 3
        head = width // self.num_heads
        length = ops.shape(qkv)[1]
        q, k, v = ops.unstack(ops.transpose(ops.reshape(qkv, (-1, length, 3, self.num_heads, head)),
                                            (2, 0, 3, 1, 4)), num=3, axis=0)  # each (N, heads, L, head)
        scores = ops.matmul(q * ops.cast(head ** -0.5, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
        probabilities = ops.softmax(scores, axis=-1)
        if self.attention_dropout is not None:
            probabilities = self.attention_dropout(probabilities, training=training)
        out = ops.transpose(ops.matmul(probabilities, v), (0, 2, 1, 3))
        return ops.reshape(out, (-1, length, width))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 3)

    def count_macs(self, input_shape):
        """kseg.flops: the multiply-adds per image of the two products, q k^T and the probabilities times v,
        2 x L^2 x width (input_shape: (L, 3 x width), no batch axis); the projections are Dense layers."""
        length, fused = input_shape
        return 2 * length * length * (fused // 3)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="kseg")
class ViTTakeToken(keras.layers.Layer):
    """The token at `index` of a sequence (N, L, width) -> (N, width): the class token's features."""

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        return x[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="kseg")
class ViTTokensToMap(keras.layers.Layer):
    """Inputs [tokens (N, prefix + h * w, width), the patch map (N, h, w, width)]: the patch tokens (the
    `prefix` class / distillation tokens dropped) back as an (N, h, w, width) map."""

    def __init__(self, prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        self.prefix_tokens = int(prefix_tokens)

    def call(self, inputs):
        tokens, patches = inputs
        shape = ops.shape(patches)
        return ops.reshape(tokens[:, self.prefix_tokens:], (-1, shape[1], shape[2], tokens.shape[-1]))

    def compute_output_shape(self, input_shape):
        tokens, patches = input_shape
        return (tokens[0], patches[1], patches[2], tokens[2])

    def get_config(self):
        return {**super().get_config(), "prefix_tokens": self.prefix_tokens}


# --- the network ---------------------------------------------------------------------------------------


def _check(name, *, dropout, attention_dropout, drop_path, pos_embed_size, pos_embed_resample, patch):
    for option, rate in (("dropout", dropout), ("attention_dropout", attention_dropout), ("drop_path", drop_path)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{name}: {option} must be a rate in [0, 1), got {rate!r}")
    if pos_embed_resample not in RESAMPLERS:
        raise ValueError(f"{name}: pos_embed_resample must be one of {RESAMPLERS}, got {pos_embed_resample!r}")
    size = (pos_embed_size, pos_embed_size) if isinstance(pos_embed_size, int) else pos_embed_size
    if (isinstance(pos_embed_size, bool) or not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and s >= patch and s % patch == 0 for s in size)):
        raise ValueError(f"{name}: pos_embed_size must be an image size (an int or (height, width)) that is a "
                         f"multiple of the patch size {patch}, got {pos_embed_size!r}")
    return size[0] // patch, size[1] // patch


def _encoder_block(x, i, *, width, heads, mlp_width, dropout, attention_dropout, drop_path):
    """A pre-norm encoder block: x + attention(norm1(x)), then x + MLP(norm2(x)); `drop_path` drops each
    residual branch for whole samples (training)."""
    prefix = f"block_{i}_"

    def branch_end(y, part):
        if drop_path:
            y = layers.Dropout(drop_path, noise_shape=(None, 1, 1), name=f"{prefix}drop_path{part}")(y)
        return y

    y = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"{prefix}norm1")(x)
    y = layers.Dense(3 * width, kernel_initializer=keras.initializers.TruncatedNormal(**_INIT),
                     name=f"{prefix}attn_qkv")(y)
    y = ViTAttention(heads, attention_dropout, name=f"{prefix}attn")(y)
    y = layers.Dense(width, kernel_initializer=keras.initializers.TruncatedNormal(**_INIT),
                     name=f"{prefix}attn_proj")(y)
    if dropout:
        y = layers.Dropout(dropout, name=f"{prefix}attn_drop")(y)
    x = layers.Add(name=f"{prefix}add1")([x, branch_end(y, 1)])
    y = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"{prefix}norm2")(x)
    y = layers.Dense(mlp_width, kernel_initializer=keras.initializers.TruncatedNormal(**_INIT),
                     name=f"{prefix}mlp_fc1")(y)
    y = layers.Activation(gelu_erf, name=f"{prefix}mlp_gelu")(y)
    if dropout:
        y = layers.Dropout(dropout, name=f"{prefix}mlp_drop1")(y)
    y = layers.Dense(width, kernel_initializer=keras.initializers.TruncatedNormal(**_INIT),
                     name=f"{prefix}mlp_fc2")(y)
    if dropout:
        y = layers.Dropout(dropout, name=f"{prefix}mlp_drop2")(y)
    return layers.Add(name=f"{prefix}add2")([x, branch_end(y, 2)])


def vit_trunk(x, arch, *, dropout=0.0, attention_dropout=0.0, drop_path=0.0, pos_embed_size=224,
              pos_embed_resample="timm"):
    """Patch embedding, tokens, position embedding, the encoder blocks and the final LayerNorm.
    Returns (tokens (N, prefix + h * w, width), the patch map (N, h, w, width) they came from)."""
    patch, width, depth, heads, mlp_width, distilled = ARCHS[arch]
    grid = _check(arch, dropout=dropout, attention_dropout=attention_dropout, drop_path=drop_path,
                  pos_embed_size=pos_embed_size, pos_embed_resample=pos_embed_resample, patch=patch)
    for size in x.shape[1:3]:
        if size is not None and (size < patch or size % patch):
            raise ValueError(f"{arch}: the input's height and width must be multiples of the patch size {patch}, "
                             f"got {tuple(x.shape[1:3])}")
    patches = layers.Conv2D(width, patch, strides=patch, name="patch_embed")(x)
    tokens = layers.Reshape((-1, width), name="patch_tokens")(patches)  # rows first, as torch's flatten
    if distilled:
        tokens = ViTToken(name="dist_token")(tokens)
    tokens = ViTToken(initializer_stddev=1e-6, name="class_token")(tokens)  # timm's initialisation
    tokens = ViTPositionEmbedding(grid, 2 if distilled else 1, pos_embed_resample, name="pos_embed")([tokens, patches])
    if dropout:
        tokens = layers.Dropout(dropout, name="pos_drop")(tokens)
    for i in range(depth):
        rate = drop_path * i / (depth - 1) if depth > 1 else drop_path  # timm: linspace(0, drop_path, depth)
        tokens = _encoder_block(tokens, i, width=width, heads=heads, mlp_width=mlp_width, dropout=dropout,
                                attention_dropout=attention_dropout, drop_path=rate)
    return layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm")(tokens), patches


def _vit(arch, *, num_classes, input_shape, include_top, pooling, classifier_activation, dropout,
         attention_dropout, drop_path, pos_embed_size, pos_embed_resample, distilled_training=False):
    distilled = ARCHS[arch][5]
    if pooling not in POOLINGS:
        raise ValueError(f"{arch}: pooling must be one of {POOLINGS}, got {pooling!r}")
    inputs = model_input(input_shape, (224, 224, 3) if include_top else (None, None, 3))
    tokens, patches = vit_trunk(inputs, arch, dropout=dropout, attention_dropout=attention_dropout,
                                drop_path=drop_path, pos_embed_size=pos_embed_size,
                                pos_embed_resample=pos_embed_resample)
    if not include_top:
        if pooling == "token":
            x = ViTTakeToken(0, name="class_token_features")(tokens)
            if distilled:  # timm's pre-logits: the mean of the two tokens
                x = layers.Average(name="token_features")([x, ViTTakeToken(1, name="dist_token_features")(tokens)])
        else:
            x = global_pooling(ViTTokensToMap(2 if distilled else 1, name="patch_map")([tokens, patches]), pooling)
        return keras.Model(inputs, x, name=arch)
    cls = ViTTakeToken(0, name="class_token_features")(tokens)
    if not distilled:
        return keras.Model(inputs, classifier_head(cls, num_classes, classifier_activation), name=arch)
    init = keras.initializers.TruncatedNormal(**_INIT)
    logits = layers.Dense(num_classes, kernel_initializer=init, name="head")(cls)
    logits_dist = layers.Dense(num_classes, kernel_initializer=init, name="head_dist")(
        ViTTakeToken(1, name="dist_token_features")(tokens))
    if distilled_training:
        outputs = [layers.Activation(classifier_activation, name="predictions")(logits),
                   layers.Activation(classifier_activation, name="predictions_dist")(logits_dist)]
    else:
        average = layers.Average(name="head_average")([logits, logits_dist])
        outputs = layers.Activation(classifier_activation, name="predictions")(average)
    return keras.Model(inputs, outputs, name=arch)


# --- torch maps -----------------------------------------------------------------------------------------


def torchvision_map(arch="vit_b_16"):
    """torchvision.models.vit_b_16's state_dict keys: `conv_proj`, `class_token`, `encoder.pos_embedding`,
    `encoder.layers.encoder_layer_{i}` (`ln_1`; `self_attention`, an nn.MultiheadAttention: its fused
    `in_proj_weight` / `in_proj_bias` and `out_proj`; `ln_2`; `mlp.0` and `mlp.3`, the MLP's Linear layers
    around GELU and dropout), `encoder.ln`, `heads.head`."""
    depth = ARCHS[arch][2]
    out = [TorchMapping("conv_proj", "patch_embed", "conv"), TorchMapping("class_token", "class_token", "vector"),
           TorchMapping("encoder.pos_embedding", "pos_embed", "vector")]
    for i in range(depth):
        block, prefix = f"encoder.layers.encoder_layer_{i}", f"block_{i}_"
        out += [TorchMapping(f"{block}.ln_1", f"{prefix}norm1", "layernorm"),
                TorchMapping(f"{block}.self_attention", f"{prefix}attn_qkv", "in_proj"),
                TorchMapping(f"{block}.self_attention.out_proj", f"{prefix}attn_proj", "dense"),
                TorchMapping(f"{block}.ln_2", f"{prefix}norm2", "layernorm"),
                TorchMapping(f"{block}.mlp.0", f"{prefix}mlp_fc1", "dense"),
                TorchMapping(f"{block}.mlp.3", f"{prefix}mlp_fc2", "dense")]
    return out + [TorchMapping("encoder.ln", "norm", "layernorm"), TorchMapping("heads.head", "predictions", "dense")]


def timm_map(arch):
    """timm's state_dict keys for the DeiT models (timm/models/vision_transformer.py, deit.py):
    `patch_embed.proj`, `cls_token`, `dist_token` (distilled), `pos_embed`, `blocks.{i}` (`norm1`, `attn.qkv`,
    `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`), `norm`, `head` and `head_dist` (distilled)."""
    _, _, depth, _, _, distilled = ARCHS[arch]
    out = [TorchMapping("patch_embed.proj", "patch_embed", "conv"), TorchMapping("cls_token", "class_token", "vector")]
    if distilled:
        out.append(TorchMapping("dist_token", "dist_token", "vector"))
    out.append(TorchMapping("pos_embed", "pos_embed", "vector"))
    for i in range(depth):
        block, prefix = f"blocks.{i}", f"block_{i}_"
        out += [TorchMapping(f"{block}.norm1", f"{prefix}norm1", "layernorm"),
                TorchMapping(f"{block}.attn.qkv", f"{prefix}attn_qkv", "dense"),
                TorchMapping(f"{block}.attn.proj", f"{prefix}attn_proj", "dense"),
                TorchMapping(f"{block}.norm2", f"{prefix}norm2", "layernorm"),
                TorchMapping(f"{block}.mlp.fc1", f"{prefix}mlp_fc1", "dense"),
                TorchMapping(f"{block}.mlp.fc2", f"{prefix}mlp_fc2", "dense")]
    out.append(TorchMapping("norm", "norm", "layernorm"))
    if distilled:
        return out + [TorchMapping("head", "head", "dense"), TorchMapping("head_dist", "head_dist", "dense")]
    return out + [TorchMapping("head", "predictions", "dense")]


# --- builders -------------------------------------------------------------------------------------------

_COMMON = dict(task="classification", input_shape=(224, 224, 3), num_classes=1000, preprocessing="torch")


# params: Keras' count_params() with defaults; all trainable, equal to torchvision's / timm's counts.
@register_model("vit_b_16", params=86_567_656, paper=VIT_PAPER, torch_map=torchvision_map, **_COMMON)
def vit_b_16(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
             dropout=0.0, attention_dropout=0.0, drop_path=0.0, pos_embed_size=224,
             pos_embed_resample="torchvision"):
    """ViT-B/16: 12 pre-norm encoder blocks of width 768, 12 heads, MLP 3072, on 16x16 patches (torchvision's)."""
    return _vit("vit_b_16", **locals())  # the builder's arguments


_DEIT = dict(paper=DEIT_PAPER, **_COMMON)


@register_model("deit_tiny", params=5_717_416, torch_map=functools.partial(timm_map, "deit_tiny"), **_DEIT)
def deit_tiny(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              dropout=0.0, attention_dropout=0.0, drop_path=0.0, pos_embed_size=224, pos_embed_resample="timm"):
    """DeiT-Ti: 12 pre-norm encoder blocks of width 192, 3 heads, MLP 768, on 16x16 patches (timm's)."""
    return _vit("deit_tiny", **locals())  # the builder's arguments


@register_model("deit_small", params=22_050_664, torch_map=functools.partial(timm_map, "deit_small"), **_DEIT)
def deit_small(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
               dropout=0.0, attention_dropout=0.0, drop_path=0.0, pos_embed_size=224, pos_embed_resample="timm"):
    """DeiT-S: 12 pre-norm encoder blocks of width 384, 6 heads, MLP 1536, on 16x16 patches (timm's)."""
    return _vit("deit_small", **locals())  # the builder's arguments


@register_model("deit_base", params=86_567_656, torch_map=functools.partial(timm_map, "deit_base"), **_DEIT)
def deit_base(*, num_classes=1000, input_shape=None, include_top=True, pooling=None, classifier_activation=None,
              dropout=0.0, attention_dropout=0.0, drop_path=0.0, pos_embed_size=224, pos_embed_resample="timm"):
    """DeiT-B: ViT-B/16's architecture (width 768, 12 heads, MLP 3072), timm's names and resampling."""
    return _vit("deit_base", **locals())  # the builder's arguments


@register_model("deit_tiny_distilled", params=5_910_800,
                torch_map=functools.partial(timm_map, "deit_tiny_distilled"), **_DEIT)
def deit_tiny_distilled(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
                        classifier_activation=None, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                        pos_embed_size=224, pos_embed_resample="timm", distilled_training=False):
    """DeiT-Ti with the distillation token and its head; the two heads' logits averaged (timm's)."""
    return _vit("deit_tiny_distilled", **locals())  # the builder's arguments


@register_model("deit_small_distilled", params=22_436_432,
                torch_map=functools.partial(timm_map, "deit_small_distilled"), **_DEIT)
def deit_small_distilled(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
                         classifier_activation=None, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                         pos_embed_size=224, pos_embed_resample="timm", distilled_training=False):
    """DeiT-S with the distillation token and its head; the two heads' logits averaged (timm's)."""
    return _vit("deit_small_distilled", **locals())  # the builder's arguments


@register_model("deit_base_distilled", params=87_338_192,
                torch_map=functools.partial(timm_map, "deit_base_distilled"), **_DEIT)
def deit_base_distilled(*, num_classes=1000, input_shape=None, include_top=True, pooling=None,
                        classifier_activation=None, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                        pos_embed_size=224, pos_embed_resample="timm", distilled_training=False):
    """DeiT-B with the distillation token and its head; the two heads' logits averaged (timm's)."""
    return _vit("deit_base_distilled", **locals())  # the builder's arguments
