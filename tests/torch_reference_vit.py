"""PyTorch Vision Transformers written to the references' module layouts (neither torchvision nor timm is
installable beside the local CPU torch), so their state_dicts have the published files' keys:

- `TorchvisionViT`: torchvision.models.vit_b_16's layout (torchvision/models/vision_transformer.py):
  `conv_proj`, `class_token`, `encoder.pos_embedding`, `encoder.layers.encoder_layer_{i}` blocks of `ln_1`,
  `self_attention` (a torch.nn.MultiheadAttention: `in_proj_weight` / `in_proj_bias`, `out_proj`), `ln_2`
  and `mlp` (0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout), `encoder.ln`, `heads.head`.
- `TimmViT`: timm's VisionTransformer / VisionTransformerDistilled layout (DeiT, timm/models/deit.py):
  `patch_embed.proj`, `cls_token`, `dist_token`, `pos_embed`, `blocks.{i}` of `norm1`, `attn.qkv`,
  `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, then `norm`, `head`, `head_dist`.

Written from Dosovitskiy et al. 2021 (pre-norm encoder blocks, LayerNorm eps 1e-6, exact GELU) and Touvron
et al. 2021 (the distillation token, its head; at inference the two heads' logits averaged), with the two
libraries' ways of resampling a 224-trained position embedding to another patch grid
(`interpolate_embeddings`, `resample_abs_pos_embed`), to prove kseg's import gives the same outputs."""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

# name -> (patch size, width, depth, heads, MLP width, distilled)
ARCHS = {
    "vit_b_16": (16, 768, 12, 12, 3072, False),
    "deit_tiny": (16, 192, 12, 3, 768, False),
    "deit_small": (16, 384, 12, 6, 1536, False),
    "deit_base": (16, 768, 12, 12, 3072, False),
    "deit_tiny_distilled": (16, 192, 12, 3, 768, True),
    "deit_small_distilled": (16, 384, 12, 6, 1536, True),
    "deit_base_distilled": (16, 768, 12, 12, 3072, True),
}


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


# --- torchvision's layout ------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(self, width, heads, mlp_width):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_width, width), nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens, width, depth, heads, mlp_width):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens, width))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(width, heads, mlp_width)) for i in range(depth)))
        self.ln = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer for `image_size` (square): vit_b_16 has 86,567,656 parameters."""

    def __init__(self, name="vit_b_16", image_size=224, num_classes=1000):
        super().__init__()
        patch, width, depth, heads, mlp_width, _ = ARCHS[name]
        self.patch_size, self.width = patch, width
        self.conv_proj = nn.Conv2d(3, width, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = Encoder((image_size // patch) ** 2 + 1, width, depth, heads, mlp_width)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(width, num_classes)))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, h * w, width), rows first
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def interpolate_embeddings(state, image_size, patch_size=16):
    """torchvision's interpolate_embeddings: `encoder.pos_embedding` resampled to the square grid of
    `image_size` by bicubic interpolation with align_corners=True; the class token's position kept."""
    pos = state["encoder.pos_embedding"]
    old = int(round((pos.shape[1] - 1) ** 0.5))
    new = image_size // patch_size
    grid = pos[:, 1:].permute(0, 2, 1).reshape(1, -1, old, old)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=True)
    out = dict(state)
    out["encoder.pos_embedding"] = torch.cat([pos[:, :1], grid.reshape(1, -1, new * new).permute(0, 2, 1)], dim=1)
    return out


# --- timm's layout (DeiT) ------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, length, width = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q * (width // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(n, length, width))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_width):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm's VisionTransformer (global_pool="token") or, distilled, VisionTransformerDistilled in eval mode,
    for `image_size` (an int or (height, width)): DeiT-Ti 5,717,416 parameters, S 22,050,664, B 86,567,656;
    distilled 5,910,800, 22,436,432, 87,338,192."""

    def __init__(self, name="deit_tiny", image_size=224, num_classes=1000):
        super().__init__()
        patch, width, depth, heads, mlp_width, distilled = ARCHS[name]
        h, w = _pair(image_size)
        self.prefix = 2 if distilled else 1
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, (h // patch) * (w // patch) + self.prefix, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        self.head_dist = nn.Linear(width, num_classes) if distilled else None

    def forward_features(self, x):
        """The final LayerNorm's tokens (N, prefix + h * w, width)."""
        x = self.patch_embed(x)
        tokens = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in tokens] + [x], dim=1)
        return self.norm(self.blocks(x + self.pos_embed))

    def forward_heads(self, x):
        """The class head's logits and, distilled, the distillation head's (timm's distilled training mode)."""
        x = self.forward_features(x)
        return (self.head(x[:, 0]),) + ((self.head_dist(x[:, 1]),) if self.head_dist is not None else ())

    def forward(self, x):
        heads = self.forward_heads(x)
        return heads[0] if len(heads) == 1 else (heads[0] + heads[1]) / 2


def resample_abs_pos_embed(state, new_grid, old_grid=(14, 14), prefix=1):
    """timm's resample_abs_pos_embed (its defaults): `pos_embed`'s patch grid resampled to `new_grid`
    (rows, columns) by bicubic interpolation with antialiasing (half-pixel centres); the `prefix` class /
    distillation tokens' positions kept."""
    pos = state["pos_embed"]
    grid = pos[:, prefix:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    out = dict(state)
    out["pos_embed"] = torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    return out


# --- test weights ------------------------------------------------------------------------------


@torch.no_grad()
def randomize(module, seed=0):
    """Every parameter random (torchvision zeroes the head and the class token at initialisation, which
    would hide a wrong mapping): weights N(0, 1 / fan-in), so the attention is far from uniform and every
    query / key / value row matters; LayerNorm scales U(0.5, 1.5), shifts and biases U(-0.2, 0.2), tokens
    and position embeddings N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(part.startswith(("ln", "norm")) for part in name.split("."))
        if is_norm and leaf == "weight":
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif leaf.endswith("bias"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
        elif leaf.endswith("weight"):  # Linear (out, in), Conv2d (out, in, kh, kw), in_proj_weight (3D, D)
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
        else:  # class / distillation tokens, position embeddings
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()
