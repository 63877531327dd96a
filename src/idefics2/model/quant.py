"""Weight-only quantized linear layers (int8 per output channel, int4 per group) on torch's own kernels.

The decoder's and the connector's projections hold ~95% of idefics2-8b's weights; storing them in
int8 or int4 halves or quarters the bytes each decode step reads. The matrix products run in torch's
packed-weight kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm`
on CUDA), which compute in the activation dtype: exact against the dequantized weight in float32,
and fastest with bfloat16 activations.

Layouts (y = x W^T, W (N, K)):
- int8: q (N, K) int8 and scales (N,), W = q * scale; symmetric, per output channel.
- int4: per group of `group_size` inputs, asymmetric: q in 0..15, W = (q - 8) * scale + zero, the
  zero point in the float domain as torch's kernels take it; scales and zeros (K / group, N, 2).

The kernels have no backward; `FrozenWeightMatmul` gives the layers one that passes the gradient to
their input through the weight dequantized on the fly and gives the frozen weight none, so LoRA
adapters train on a quantized base (QLoRA), as do the layers before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
TRANSPOSE_BLOCK = 1024  # inputs the int4 backward reads back from the kernel at a time


class FrozenWeightMatmul(torch.autograd.Function):
    """flat (M, K) -> flat W^T (M, N) through a quantized layer's kernel; the backward gives the
    input grad W (M, K) from the layer's own `matmul_transposed` and the weight nothing."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        return layer.matmul(flat)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.layer.matmul_transposed(grad), None


class QuantizedLinear(nn.Module):
    """y = x W^T + b through a quantized kernel (`matmul`), differentiable in x (`FrozenWeightMatmul`)."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def matmul(self, flat: Tensor) -> Tensor:
        raise NotImplementedError

    def matmul_transposed(self, grad: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)  # (M, K)
        y = (FrozenWeightMatmul.apply(flat, self) if torch.is_grad_enabled() and flat.requires_grad
             else self.matmul(flat))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) float32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        w = weight.detach().float()  # (N, K)
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return cls(q, scales, bias)

    def dequantize(self) -> Tensor:
        """W (N, K) in float32."""
        return self.qweight.float() * self.scales[:, None]

    def matmul(self, flat: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales.to(flat.dtype))

    def matmul_transposed(self, grad: Tensor) -> Tensor:
        """grad (M, N) @ W: the kernel's (x q^T) * scale, transposed."""
        return (grad * self.scales.to(grad.dtype)) @ self.qweight.to(grad.dtype)


class Int4Linear(QuantizedLinear):
    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, bias: Tensor | None, in_features: int,
                 out_features: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)  # the kernel's own layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K / group, N, 2) float32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, group_size: int = 128) -> Int4Linear:
        w = weight.detach().float()
        N, K = w.shape
        groups = w.view(N, K // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K / group)
        scales = ((high - low) / 15).clamp(min=1e-12)
        zero_int = torch.round(-low / scales)
        q = (torch.round(groups / scales[..., None]) + zero_int[..., None]).clamp(0, 15)
        return cls.from_int4(q.to(torch.int32).view(N, K), scales, (8 - zero_int) * scales, bias, group_size)

    @classmethod
    def from_int4(cls, q: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None, group_size: int) -> Int4Linear:
        """q (N, K) int32 in 0..15; scales and float-domain zeros (N, K / group): W = (q - 8) * s + z."""
        N, K = q.shape
        packed = _pack_int4(q)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().float()
        return cls(packed, scales_and_zeros, bias, K, N, group_size)

    def dequantize(self) -> Tensor:
        """W (N, K) in float32, from the kernel applied to the identity."""
        return self._weight_rows(0, self.in_features, torch.float32).t().contiguous()

    def _weight_rows(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """W^T[start:stop] (stop - start, N): the kernel applied to those rows of the identity, in `dtype`
        (the layout is the kernel's own, so this is the one way to read the weights back). CUDA's kernel
        takes bfloat16 inputs only, and computes in it whatever the caller's dtype."""
        kernel_dtype = torch.bfloat16 if self.packed.is_cuda else dtype
        rows = torch.zeros(stop - start, self.in_features, dtype=kernel_dtype, device=self.packed.device)
        index = torch.arange(stop - start, device=rows.device)
        rows[index, start + index] = 1
        return self.matmul(rows).to(dtype)

    def matmul(self, flat: Tensor) -> Tensor:
        sz = self.scales_and_zeros.to(flat.dtype)
        if flat.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, sz)

    def matmul_transposed(self, grad: Tensor) -> Tensor:
        """grad (M, N) @ W (N, K), W read back a block of inputs at a time (memory: a block, not all of W)."""
        out = torch.empty(grad.shape[0], self.in_features, dtype=grad.dtype, device=grad.device)  # (M, K)
        for start in range(0, self.in_features, TRANSPOSE_BLOCK):
            stop = min(start + TRANSPOSE_BLOCK, self.in_features)
            out[:, start:stop] = grad @ self._weight_rows(start, stop, grad.dtype).t()
        return out


def _pack_int4(q: Tensor) -> Tensor:
    if q.is_cuda:
        packed_pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(packed_pairs, 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)


def quantize_weight(weight: Tensor, method: str, group_size: int,
                    bias: Tensor | None = None) -> Int8Linear | Int4Linear:
    """A linear layer's weight (N, K) (and bias) as its quantized layer."""
    bias = None if bias is None else bias.detach().clone()
    return Int8Linear.from_weight(weight, bias) if method == "int8" else Int4Linear.from_weight(weight, bias,
                                                                                               group_size)


def check_quantization(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {list(METHODS)}, got {method!r}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(GROUP_SIZES)} for int4, got {group_size!r}")


def quantizable(shape: tuple[int, ...], method: str, group_size: int) -> bool:
    """Whether torch's kernel takes a weight of `shape` (N, K): int4 needs K a multiple of the group
    and N of 16."""
    N, K = shape
    return method == "int8" or (K % group_size == 0 and N % 16 == 0)


def quantize_linears(root: nn.Module, method: str, group_size: int = 128,
                     skip: Iterable[str] = ()) -> list[str]:
    """Replace every nn.Linear under `root` (but the names in `skip`) by its quantized form, in place;
    returns the names of those left in floating point because the kernel does not take their shape."""
    check_quantization(method, group_size)
    skipped = set(skip)
    left = []
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full in skipped:
                continue
            if not quantizable(tuple(child.weight.shape), method, group_size):
                left.append(full)
                continue
            setattr(module, child_name, quantize_weight(child.weight, method, group_size, child.bias))
    return left


def quantization_targets(model: nn.Module, quantization: tuple[str, int] | None) -> set[str]:
    """The linear layers `quantization` applies to: the decoder's and the connector's (not the vision
    tower, not the LM head), those whose shape the kernel takes."""
    if quantization is None:
        return set()
    method, group_size = quantization
    check_quantization(method, group_size)
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and quantizable(tuple(module.weight.shape), method, group_size)
            and any(part in name.split(".") for part in ("text_model", "connector"))}


# AutoAWQ's GEMM layout: qweight (K, N / 8) int32, qzeros (K / group, N / 8) int32, scales
# (K / group, N) float16; each int32 holds 8 nibbles, nibble i being column 8c + AWQ_ORDER[i];
# W^T[k, n] = (q[k, n] - zero[k // group, n]) * scale[k // group, n].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_unpack(packed: Tensor) -> Tensor:
    """(R, N / 8) int32 -> (R, N) int32 nibbles in AWQ's column order."""
    R, C = packed.shape
    out = torch.empty(R, C, 8, dtype=torch.int32, device=packed.device)
    for i, column in enumerate(AWQ_ORDER):
        out[:, :, column] = (packed >> (4 * i)) & 0xF
    return out.view(R, C * 8)


def awq_pack(values: Tensor) -> Tensor:
    """(R, N) ints in 0..15 -> (R, N / 8) int32, AWQ's packing (the inverse of `awq_unpack`)."""
    R, N = values.shape
    grouped = values.to(torch.int32).view(R, N // 8, 8)
    packed = torch.zeros(R, N // 8, dtype=torch.int32, device=values.device)
    for i, column in enumerate(AWQ_ORDER):
        packed |= grouped[:, :, column] << (4 * i)
    return packed


def int4_from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, bias: Tensor | None) -> Int4Linear:
    """An AWQ GEMM layer as an Int4Linear: same weights, torch's kernel layout."""
    q = awq_unpack(qweight).t().contiguous()  # (N, K)
    zero = awq_unpack(qzeros).t().float()  # (N, K / group)
    s = scales.t().float()  # (N, K / group)
    group_size = q.shape[1] // s.shape[1]
    if group_size not in GROUP_SIZES or q.shape[1] != group_size * s.shape[1]:
        raise ValueError(f"AWQ layer with {q.shape[1]} inputs and {s.shape[1]} groups: group size "
                         f"{q.shape[1] / s.shape[1]:g} is not one of {list(GROUP_SIZES)}")
    return Int4Linear.from_int4(q, s, (8 - zero) * s, bias, group_size)


INT8_METHOD = "idefics2-int8"  # our layout: qweight (N, K) int8, scales (N,) float32 per layer


def check_quantization_config(quantization_config: object, source: str) -> str:
    """The pre-quantized formats we read: AWQ 4-bit GEMM with zero points, or our int8 layout;
    returns "awq" or "int8"."""
    if not isinstance(quantization_config, dict):
        raise ValueError(f"{source}: quantization_config must be an object")
    method = quantization_config.get("quant_method")
    if method == INT8_METHOD:
        return "int8"
    if method != "awq":
        raise ValueError(f"{source}: quantization_config.quant_method {method!r} is not supported (only 'awq' "
                         f"and {INT8_METHOD!r})")
    wanted = {"bits": 4, "version": "gemm", "zero_point": True}
    got = {"bits": quantization_config.get("bits", quantization_config.get("w_bit")),
           "version": str(quantization_config.get("version", "gemm")).lower(),
           "zero_point": quantization_config.get("zero_point", True)}
    wrong = [f"{k}={got[k]!r}" for k in wanted if got[k] != wanted[k]]
    if wrong:
        raise ValueError(f"{source}: AWQ checkpoint with {', '.join(wrong)}; only 4-bit GEMM with zero points "
                         "is supported (GEMV, exllama and other bit widths are not)")
    skip = quantization_config.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise ValueError(f"{source}: quantization_config.modules_to_not_convert must be a list of names")
    return "awq"


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, Tensor], set[str], dict[str, Any] | None]:
    """How a model's quantized layers are saved: (tensors to add, state keys they replace, the
    quantization_config for config.json), or ({}, set(), None) for a float model. Int4 layers are
    written in AWQ's GEMM layout (scales kept in float32), int8 layers in ours; one kind per model."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    if not layers:
        return {}, set(), None
    kinds = {type(m) for m in layers.values()}
    groups = {m.group_size for m in layers.values() if isinstance(m, Int4Linear)}
    if len(kinds) > 1 or len(groups) > 1:
        raise ValueError("the model mixes quantized layer kinds or group sizes, which one checkpoint cannot hold")
    added: dict[str, Tensor] = {}
    replaced: set[str] = set()
    for name, layer in layers.items():
        if isinstance(layer, Int8Linear):
            continue  # its buffers (qweight, scales) are the saved layout
        s, zf = layer.scales_and_zeros[..., 0].t(), layer.scales_and_zeros[..., 1].t()  # (N, K / group)
        zero = torch.round(8 - zf / s)
        w = layer.dequantize().view(layer.out_features, -1, layer.group_size)
        q = torch.round(w / s[..., None] + zero[..., None]).clamp(0, 15).view(layer.out_features, -1)
        added.update({f"{name}.qweight": awq_pack(q.t().contiguous()).cpu(),
                      f"{name}.qzeros": awq_pack(zero.t().contiguous()).cpu(),
                      f"{name}.scales": s.t().contiguous().cpu()})
        replaced |= {f"{name}.packed", f"{name}.scales_and_zeros"}
    if kinds == {Int8Linear}:
        return added, replaced, {"quant_method": INT8_METHOD, "bits": 8}
    return added, replaced, {"quant_method": "awq", "bits": 4, "group_size": groups.pop(), "version": "gemm",
                             "zero_point": True}


class AwqLayers:
    """The tensors of a pre-quantized checkpoint (`quantization_config` in config.json), by layer:
    AWQ GEMM (qweight, qzeros, scales) or our int8 (qweight, scales), turned into Int4Linear /
    Int8Linear layers once all are read."""

    def __init__(self, source: str, kind: str) -> None:
        self.source, self.kind, self.parts = source, kind, {}  # type: ignore[var-annotated]
        self.PARTS = ("qweight", "qzeros", "scales") if kind == "awq" else ("qweight", "scales")

    @classmethod
    def for_config(cls, config: Any, source: str,
                   quantization: tuple[str, int] | None) -> AwqLayers | None:
        quantization_config = getattr(config, "extra", {}).get("quantization_config")
        if quantization_config is None:
            return None
        if quantization is not None:
            raise ValueError(f"{source} is already quantized (quantization_config in config.json): drop quantization=")
        return cls(source, check_quantization_config(quantization_config, source))

    def take(self, key: str, ckpt_key: str, get_tensor: Callable[[str], Tensor],
             expected: dict[str, Any]) -> bool:
        name, _, part = key.rpartition(".")
        if part not in self.PARTS or f"{name}.weight" not in expected:
            return False
        self.parts.setdefault(name, {})[part] = get_tensor(ckpt_key)
        return True

    def layers(self, device: Any) -> dict[str, nn.Module]:
        out = {}
        for name, parts in self.parts.items():
            missing = [p for p in self.PARTS if p not in parts]
            if missing:
                raise ValueError(f"{self.source}: quantized layer {name} lacks {missing}")
            try:
                layer: nn.Module = (int4_from_awq(parts["qweight"], parts["qzeros"], parts["scales"], None)
                                    if self.kind == "awq" else Int8Linear(parts["qweight"], parts["scales"].float(), None))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"{self.source}: quantized layer {name}: {err}") from None
            out[name] = layer.to(device) if device is not None else layer
        return out
