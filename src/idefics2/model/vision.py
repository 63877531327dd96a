"""Vision tower: SigLIP-style encoder at native resolution with NaViT position bucketing.

First stage of the image path: pixels (R, 3, H, W) of the real (non-padding) images and their
patch mask -> patch features (R, P, D_v). Must match transformers' `Idefics2VisionTransformer`
(docs/numerics.md §4.3.1-4.3.4); parameter names equal `model.vision_model.*` so Hub shards load as they are.
Shape letters: R images, P = Gh*Gw patches, Gh/Gw patch rows/columns, D_v vision width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from idefics2.config import VisionConfig
from idefics2.model.layers import CheckpointedLayer, activation, attention


def bucket_position_ids(patch_mask: Tensor, num_patches_per_side: int) -> Tensor:
    """Position-table rows for every patch: fractional coordinates bucketed onto an N x N grid.

    patch_mask (R, Gh, Gw) bool, the valid region a top-left rectangle. Returns (R, Gh*Gw) int64;
    invalid patches get row 0. The arithmetic is float32 step by step as in transformers 5.24
    (docs/numerics.md §4.3.2): the exact rational formula differs for n = 25, 49, 50, 55 when N = 70.
    """
    R, Gh, Gw = patch_mask.shape
    N = num_patches_per_side
    device = patch_mask.device
    boundaries = torch.arange(1 / N, 1.0, 1 / N, dtype=torch.float32, device=device)
    # A mask with no valid patch (image smaller than one patch) would divide by zero; its ids are all 0 anyway.
    nh = patch_mask[:, :, 0].sum(dim=1).clamp(min=1)  # (R,) valid rows
    nw = patch_mask[:, 0, :].sum(dim=1).clamp(min=1)  # (R,) valid columns
    step_h = 1.0 / nh.to(torch.float32)
    step_w = 1.0 / nw.to(torch.float32)
    frac_h = (torch.arange(Gh, dtype=torch.float32, device=device)[None] * step_h[:, None]).clamp(max=1 - 1e-6)
    frac_w = (torch.arange(Gw, dtype=torch.float32, device=device)[None] * step_w[:, None]).clamp(max=1 - 1e-6)
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)  # (R, Gh)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)  # (R, Gw)
    ids = bucket_h[:, :, None] * N + bucket_w[:, None, :]  # (R, Gh, Gw)
    return torch.where(patch_mask, ids, 0).flatten(1)


def patch_mask_from_pixels(pixel_mask: Tensor, patch_size: int) -> Tensor:
    """(R, H, W) pixel mask, nonzero = real -> (R, H//p, W//p) bool patch mask.

    A patch is valid only when all p*p of its pixels are real (transformers >= 4.45, docs/numerics.md §4.3
    step 3); trailing rows/columns that do not fill a patch are never seen by the patch conv.
    """
    R, H, W = pixel_mask.shape
    p = patch_size
    Gh, Gw = H // p, W // p
    blocks = pixel_mask[:, : Gh * p, : Gw * p].reshape(R, Gh, p, Gw, p)
    return blocks.sum(dim=(2, 4), dtype=torch.int64) == p * p


def check_pixel_inputs(pixel_values: Tensor, pixel_attention_mask: Tensor | None) -> None:
    """ValueError unless pixel_values is (B, M, 3, H, W) and the mask, when given, (B, M, H, W)."""
    if pixel_values.dim() != 5:
        raise ValueError(f"pixel_values must have 5 dimensions (batch, images, channels, height, width), got "
                         f"shape {tuple(pixel_values.shape)}; the processor returns this layout")
    if pixel_attention_mask is not None:
        B, M, _, H, W = pixel_values.shape
        if tuple(pixel_attention_mask.shape) != (B, M, H, W):
            raise ValueError(f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}, expected "
                             f"{(B, M, H, W)} to match pixel_values {tuple(pixel_values.shape)}")


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_patches_per_side = cfg.num_patches_per_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)

    def forward(self, pixel_values: Tensor, patch_mask: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values)  # (R, D_v, Gh, Gw)
        patches = patches.flatten(2).transpose(1, 2)  # (R, P, D_v)
        return patches + self.position_embedding(bucket_position_ids(patch_mask, self.num_patches_per_side))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        R, P, _ = x.shape
        q, k, v = (proj(x).view(R, P, self.num_heads, self.head_dim).transpose(1, 2)  # (R, H, P, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, mask, self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(R, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(CheckpointedLayer):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def block(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    """Patch embedding + position buckets -> encoder -> post-LayerNorm. No CLS token, no pooling head."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: Tensor, patch_mask: Tensor) -> Tensor:
        """pixel_values (R, 3, H, W); patch_mask (R, H//p, W//p) bool, True = all pixels real.

        Returns (R, P, D_v). Padded patches are computed but never attended to as keys, so the
        valid patches' features do not depend on the canvas an image was padded to.
        """
        x = self.embeddings(pixel_values, patch_mask)  # (R, P, D_v)
        flat = patch_mask.flatten(1)  # (R, P)
        mask = None if bool(flat.all()) else flat[:, None, None, :]  # (R, 1, 1, P) key-padding mask
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)
