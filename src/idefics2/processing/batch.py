"""`BatchFeature`: the dict that processors hand to the model.

Every processor (image, text, combined) returns one, and generation reads from it. It is a plain
`dict` with attribute access and a `.to()` that moves tensors, like transformers' `BatchFeature`,
so code written against the reference (`inputs.pixel_values`, `inputs.to("cuda")`) runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


class BatchFeature(dict[str, Any]):
    """A `dict` of model inputs whose keys can also be read as attributes (`inputs.pixel_values`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no key {name!r}; keys: {sorted(self)}") from None

    def to(
        self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> BatchFeature:
        """Move every tensor (also inside lists) to `device`; cast floating tensors to `dtype`.

        Integer tensors (ids, masks) keep their dtype, so `inputs.to("cuda", torch.bfloat16)` is
        safe. As in transformers, `inputs.to(torch.float16)` (a dtype alone) is accepted too.
        Works in place and returns `self`.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for key, value in self.items():
            self[key] = _move(value, device, dtype)
        return self


def _move(value: Any, device: str | torch.device | None, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.to(device=device, dtype=cast)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(item, device, dtype) for item in value)
    return value
