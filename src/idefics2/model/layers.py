"""Leaves shared by the parts of the model: RMSNorm, the SwiGLU MLP, rotary helpers, attention.

Nothing here knows about Idefics2; the vision tower, the perceiver and the Mistral decoder build
on these. Shape letters: B batch, T query length, S key length, H heads, H_kv key/value heads,
hd head dim. Masks are bool with True = may attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# Row counts for which `linear` streams the weight as W @ x.T (decode steps of a small batch).
FEW_ROWS = (2, 32)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, with faster forms of the decode-step products for float32 on the CPU.

    For 2-32 rows MKL runs x @ W.T on a small-matrix path that reads the weight at only 2-5 GB/s
    (reference-performance.md); the same product as W @ x.T streams it several times faster.
    For one row, with several threads allowed, the weight is split into one row block per thread
    (`_split_matvec`). Inference only (grad mode keeps F.linear). Results can differ from
    F.linear in the last bits (another summation order), never more. Called ~85 times per decode
    step, so it is kept to a few cheap checks. Under `torch.compile` the same branches are traced;
    the split uses the thread count at compile time (`_threads`, see `prepare_for_compile`), and
    batch size 1 is its own graph anyway (torch specialises sizes 0 and 1).
    """
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or torch.is_grad_enabled() or x.stride(-1) != 1):
        return F.linear(x, weight, bias)
    in_features = x.shape[-1]
    rows = x.numel() // in_features
    if rows == 1:
        threads = _threads()
        if threads == 1 or bias is not None or not weight.is_contiguous():
            return F.linear(x, weight, bias)
        return _split_matvec(x, weight, threads)
    if not FEW_ROWS[0] <= rows <= FEW_ROWS[1]:
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(rows, in_features).t()).t()  # (rows, out), a transposed view
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _threads() -> int:
    """torch's intra-op thread count. Eager: read at each call. Compiled (after
    `prepare_for_compile`): read once, while tracing, and kept in the graph (reading it inside a
    graph is a graph break); a different count later still gives right results, split into the old
    number of blocks."""
    return torch.get_num_threads()


def prepare_for_compile() -> None:
    """Mark `_threads` as a constant for `torch.compile`; call before compiling code that runs `linear`.

    Not done at import: marking imports `torch._dynamo` (about a second), which a run that never
    compiles should not pay for. Marking is idempotent.
    """
    torch.compiler.assume_constant_result(_threads)


def _split_matvec(x: Tensor, weight: Tensor, parts: int) -> Tensor:
    """One row x (..., in) @ weight.T as `parts` row blocks of a batched product, one per thread.

    MKL runs a lone matrix-vector product on one thread. x goes in as a transposed (in, 1)
    column (strides (1, in)): that pattern takes MKL's fast batched path, while a contiguous
    column runs at half the speed (measured). Rows left over by the split are done separately.
    Returns (..., out).
    """
    out_features, in_features = weight.shape
    column = x.as_strided((parts, in_features, 1), (0, 1, in_features))  # (parts, in, 1), no copy
    rows = out_features - out_features % parts
    if rows == out_features:
        return torch.bmm(weight.view(parts, rows // parts, in_features), column).view(*x.shape[:-1], rows)
    blocks = weight[:rows].view(parts, rows // parts, in_features)
    rest = F.linear(x.reshape(1, in_features), weight[rows:])  # (1, out - rows)
    return torch.cat([torch.bmm(blocks, column).view(1, rows), rest], dim=1).view(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict names) whose forward is `linear` above."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


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
