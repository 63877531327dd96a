"""The settings of `Idefics2ImageProcessor`, checked: from its constructor, a call's overrides or a
preprocessor_config.json, each value validated and brought to one type before any image is touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from idefics2.processing.config_files import is_finite_number, is_int
from idefics2.processing.image_ops import PixelSteps

_SIZE_KEY_SETS = ({"shortest_edge", "longest_edge"}, {"height", "width"})
_FLAGS = ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad", "do_image_splitting")


@dataclass(frozen=True)
class Settings:
    """The validated settings of one call: the processor's attributes plus that call's overrides."""

    do_convert_rgb: bool
    do_resize: bool
    size: dict[str, int]
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_pad: bool
    do_image_splitting: bool
    max_image_pixels: int | None

    @property
    def steps(self) -> PixelSteps:
        return PixelSteps(
            self.do_resize, self.resample, self.do_rescale, self.rescale_factor,
            self.do_normalize, self.image_mean, self.image_std,
        )  # fmt: skip


SETTING_NAMES = tuple(Settings.__dataclass_fields__)


def checked_settings(values: dict[str, Any]) -> Settings:
    """Validate raw settings (constructor, overrides or JSON) and bring them to canonical types."""
    for name in _FLAGS:
        if not isinstance(values[name], bool):
            raise ValueError(f"{name} must be a bool, got {values[name]!r}")
    size = values["size"]
    if not isinstance(size, dict) or set(size) not in _SIZE_KEY_SETS:
        raise ValueError(
            "size must be {'shortest_edge': int, 'longest_edge': int} or {'height': int, 'width': int}, "
            f"got {size!r}"
        )
    if not all(is_int(v) and v > 0 for v in size.values()):
        raise ValueError(f"size values must be positive integers, got {size!r}")
    if "shortest_edge" in size and size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"size['shortest_edge'] must not exceed size['longest_edge'], got {size!r}")
    resample = values["resample"]
    if not is_int(resample) or resample not in range(6):
        raise ValueError(f"resample must be a PIL resampling filter (0..5, 2 = bilinear), got {resample!r}")
    factor = values["rescale_factor"]
    if not is_finite_number(factor):  # any sign, as transformers: its tests pass -1 to mark a changed default
        raise ValueError(f"rescale_factor must be a finite number, got {factor!r}")
    limit = values["max_image_pixels"]
    if limit is not None and not (is_int(limit) and limit > 0):
        raise ValueError(f"max_image_pixels must be a positive integer or None, got {limit!r}")
    return Settings(
        **{name: values[name] for name in _FLAGS},
        size={key: int(v) for key, v in size.items()},
        resample=int(resample),
        rescale_factor=float(factor),
        image_mean=_per_channel("image_mean", values["image_mean"]),
        image_std=_per_channel("image_std", values["image_std"], nonzero=True),
        max_image_pixels=None if limit is None else int(limit),
    )


def _per_channel(name: str, value: Any, nonzero: bool = False) -> tuple[float, float, float]:
    """One number (used for all channels, as the reference allows) or three finite numbers."""
    items = [value] * 3 if is_finite_number(value) else value
    if (
        not (isinstance(items, (list, tuple)) or (isinstance(items, np.ndarray) and items.ndim == 1))
        or len(items) != 3
        or not all(is_finite_number(v) and not (nonzero and v == 0) for v in items)
    ):
        rule = "non-zero finite" if nonzero else "finite"
        raise ValueError(f"{name} must be a {rule} number or 3 {rule} numbers, got {value!r}")
    return (float(items[0]), float(items[1]), float(items[2]))
