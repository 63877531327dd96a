"""Connector: modality projection (SwiGLU into the text width) + perceiver resampler.

Second stage of the image path: patch features (R, P, D_v) -> L latents per image (R, L, D),
which later replace the L `<image>` token embeddings. Must match transformers'
`Idefics2Connector` (docs/numerics.md §4.3.5-4.3.6); names equal `model.connector.*`.
Shape letters: R images, P patches, L latents, D text width, H/H_kv heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idefics2.config import PerceiverConfig, TextConfig, VisionConfig
from idefics2.model.layers import GatedMLP, RMSNorm, attention


class PerceiverAttention(nn.Module):
    """Latents attend over [context; latents] (context first, as the reference concatenates)."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.resampler_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.resampler_n_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, latents: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        R, L, _ = latents.shape
        kv_in = torch.cat([context, latents], dim=1)  # (R, P+L, D)
        q = self.q_proj(latents).view(R, L, self.num_heads, self.head_dim).transpose(1, 2)  # (R, H, L, hd)
        k = self.k_proj(kv_in).view(R, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (R, H_kv, P+L, hd)
        v = self.v_proj(kv_in).view(R, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = attention(q, k, v, mask, self.head_dim**-0.5)  # (R, H, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(R, L, -1))


class PerceiverLayer(nn.Module):
    """Pre-norm block: cross-attention then SwiGLU MLP, each with a residual."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_latents_norm = RMSNorm(d, eps)
        self.input_context_norm = RMSNorm(d, eps)
        self.self_attn = PerceiverAttention(cfg)  # the reference's name, though it is cross-attention
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = GatedMLP(d, 4 * d, d, cfg.hidden_act)  # the 4x width is hard-coded upstream

    def forward(self, latents: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        # Ones, as the reference initialises them; the shapes recipe's `init_weights` draws them
        # randomly for training from scratch, since identical latents are a symmetry gradient
        # descent cannot break.
        self.latents = nn.Parameter(torch.ones(cfg.resampler_n_latents, cfg.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg.resampler_depth))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, context: Tensor, context_mask: Tensor) -> Tensor:
        """context (R, P, D); context_mask (R, P) bool, True = real patch. Returns (R, L, D)."""
        R = context.shape[0]
        L = self.latents.shape[0]
        latents = self.latents.unsqueeze(0).expand(R, -1, -1)  # (R, L, D)
        if bool(context_mask.all()):
            mask = None
        else:
            mask = F.pad(context_mask, (0, L), value=True)[:, None, None, :]  # (R, 1, 1, P+L); latents always visible
        for layer in self.layers:
            latents = layer(latents, context, mask)  # the same projected context feeds every layer
        return self.norm(latents)


class Connector(nn.Module):
    def __init__(self, vision: VisionConfig, perceiver: PerceiverConfig, text: TextConfig) -> None:
        super().__init__()
        # Intermediate width and activation come from the text config, as in the reference.
        self.modality_projection = GatedMLP(vision.hidden_size, text.intermediate_size, text.hidden_size,
                                            text.hidden_act)
        self.perceiver_resampler = PerceiverResampler(perceiver)

    def forward(self, patch_features: Tensor, patch_mask: Tensor) -> Tensor:
        """patch_features (R, P, D_v), patch_mask (R, P) bool -> (R, L, D)."""
        return self.perceiver_resampler(self.modality_projection(patch_features), patch_mask)
