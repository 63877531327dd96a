"""Linear layers with a faster CPU path for the one-row and few-row products of decode steps.

`Linear` is `nn.Linear` (same parameters and state-dict names) whose forward is `linear`: the
same product as `F.linear`, in a form MKL runs faster on the CPU for float32 inference, and
`F.linear` everywhere else (GPUs, other dtypes, gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
