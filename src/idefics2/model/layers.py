"""Leaves shared by the parts of the model: RMSNorm, the SwiGLU MLP, rotary helpers, attention,
and `CheckpointedLayer`, the base of the repeated blocks that activation checkpointing recomputes.

Nothing here knows about Idefics2; the vision tower, the perceiver and the Mistral decoder build
on these. Shape letters: B batch, T query length, S key length, H heads, H_kv key/value heads,
hd head dim. Masks are bool with True = may attend.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from idefics2.model.fast_linear import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):  # noqa: ANN201 - a plain callable Tensor -> Tensor
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class CheckpointedLayer(nn.Module):
    """A repeated block (decoder layer, vision encoder layer) that can drop its activations in the
    forward pass and recompute them in the backward pass, as transformers' `GradientCheckpointingLayer`.

    Subclasses put their computation in `block`. `gradient_checkpointing` and `checkpoint_kwargs`
    (for `torch.utils.checkpoint.checkpoint`) are set by the model's `gradient_checkpointing_enable`;
    checkpointing runs only while training with gradients on, so evaluation and generation pay
    nothing. The recompute runs `block`, not `__call__`, so hooks on the layer run once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {}

    def forward(self, *args: Any) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *args, **self.checkpoint_kwargs)
        return self.block(*args)

    def block(self, *args: Any) -> Tensor:
        raise NotImplementedError


class RMSNorm(nn.Module):
    """Root-mean-square norm with the reference's cast rule (docs/numerics.md §4.3.6).

    Statistics in float32, the normalised value cast back to the input dtype *before* the weight
    multiply: in bf16/fp16 this ordering changes the last bits, so it is kept exactly.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # fused op, bit-identical to the lines below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); bias-free, as in Mistral, the connector and the perceiver."""

    def __init__(self, hidden_size: int, intermediate_size: int, output_size: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, output_size, bias=False)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for RoPE at integer `positions` (B, T) -> each (B, 1, T, hd).

    Computed in float32 as the reference does (docs/numerics.md §4.5), then cast to the activation dtype.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def signed_sin(sin: Tensor) -> Tensor:
    """sin with its first half negated, the form `apply_rotary` takes."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate-half RoPE on x (B, H, T, hd): x*cos + [-x2, x1]*sin, written x*cos + [x2, x1]*[-s1, s2].

    (-x2)*s1 and x2*(-s1) are the same float, so this is bit-identical to the reference's form,
    in 4 ops instead of 7 (it runs twice per layer per decode step).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads.

    q (B, H, T, hd); k, v (B, H_kv, S, hd); mask broadcastable to (B, 1, T, S), True = visible.
    Grouped heads are served without copying the keys: the queries of the H/H_kv heads that share
    a key/value head are stacked along the query axis, so one SDPA call covers them. Returns
    (B, H, T, hd).
    """
    B, H, T, hd = q.shape
    H_kv = k.shape[1]
    groups = H // H_kv
    if groups > 1:
        q = q.reshape(B, H_kv, groups * T, hd)  # heads h = g_kv*groups + j share kv head g_kv
        if mask is not None:
            mask = mask.expand(B, 1, T, k.shape[2]).repeat(1, 1, groups, 1)  # (B, 1, groups*T, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, T, hd)
