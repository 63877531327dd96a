"""Pixel work of `Idefics2ImageProcessor`: resize rule, splitting, rescale and normalise (docs/numerics.md §5.3–5.5).

Takes the RGB sources made by `image_inputs.py` and writes float32 (3, h, w) pixels straight into
the caller's output canvas. Every step reproduces the arithmetic of transformers 5.24
`Idefics2ImageProcessorPil` (PIL resize, float64 rescale, float32 normalise) bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (top, left, bottom, right) of a crop


def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Target (height, width) of one (sub-)image, docs/numerics.md §5.4.

    Only shrinking keeps the aspect ratio (Python-float ratio, truncated with `int`); the minimum
    is then clamped per side, so small images are stretched. `{"height", "width"}` is a fixed size.
    """
    if "height" in size:
        return size["height"], size["width"]
    min_len, max_len = size["shortest_edge"], size["longest_edge"]
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width, height = max_len, int(max_len / aspect_ratio)
    elif height > width and height > max_len:
        height, width = max_len, int(max_len * aspect_ratio)
    return max(height, min_len), max(width, min_len)


def split_boxes(height: int, width: int) -> list[Box]:
    """The 4 crops, then the whole image (docs/numerics.md §5.5); odd sizes give the extra row/column to the
    bottom/right crops."""
    mid_h, mid_w = height // 2, width // 2
    return [
        (0, 0, mid_h, mid_w),
        (0, mid_w, mid_h, width),
        (mid_h, 0, height, mid_w),
        (mid_h, mid_w, height, width),
        (0, 0, height, width),
    ]


@dataclass(frozen=True)
class PixelSteps:
    """What happens to the pixels of one (sub-)image; hashable, as it keys the lookup-table cache."""

    do_resize: bool
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def _reference_arithmetic(x: np.ndarray, pil_rescaled: bool, steps: PixelSteps) -> np.ndarray:
    """The reference's rescale and normalise, operation for operation, on a channels-first array.

    `pil_rescaled` replays the division by 255 that the reference applies after resizing a float
    image it had to scale to bytes for PIL. Every cast matches, so the result is bit-exact; the
    dtype follows the reference too (float16/float64 inputs normalise in their own precision).
    """
    if pil_rescaled:
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    if steps.do_rescale:
        x = (x.astype(np.float64) * steps.rescale_factor).astype(np.float32)
    if steps.do_normalize:
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        shape = (3,) + (1,) * (x.ndim - 1)
        mean = np.asarray(steps.image_mean, dtype=x.dtype).reshape(shape)
        std = np.asarray(steps.image_std, dtype=x.dtype).reshape(shape)
        x = (x - mean) / std
    return x


@lru_cache(maxsize=32)
def _byte_table(pil_rescaled: bool, steps: PixelSteps) -> np.ndarray:
    """(3, 256) float32: the output value of every byte value, per channel.

    Rescale and normalise act element-wise, so for byte pixels the output is a pure function of the
    byte: looking it up equals running the reference arithmetic on the whole image, bit for bit,
    without its float64 temporaries.
    """
    byte_values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    return np.ascontiguousarray(_reference_arithmetic(byte_values, pil_rescaled, steps), dtype=np.float32)


def _bytes_for_pil(x: np.ndarray, where: str) -> tuple[np.ndarray, bool]:
    """Quantise a float (sub-)image to bytes as the reference does before a PIL resize.

    Whole numbers in [0, 255] are cast; otherwise values must lie in [0, 1] and are scaled by 255
    (float64, then float32) and truncated. The flag says whether that scaling happened.
    """
    low, high = x.min(), x.max()
    if low >= 0 and high <= 255 and np.allclose(x, x.astype(np.int64)):
        return x.astype(np.uint8), False
    if low >= 0 and high <= 1:
        return (x.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    raise ValueError(
        f"{where}: float pixels must lie in [0, 1] (or be whole numbers in [0, 255]) to be resized, "
        f"got [{low}, {high}]; pass do_resize=False to keep other ranges"
    )


def _resized_bytes(
    source: Image.Image | np.ndarray, out_size: tuple[int, int], steps: PixelSteps
) -> np.ndarray:
    """(h, w, 3) uint8 pixels of `source` after the PIL resize.

    Resizing a PIL image directly equals the reference's round trip through arrays, and Pillow
    returns an identical copy when the size is unchanged, so that call is skipped.
    """
    height, width = out_size
    if isinstance(source, np.ndarray):
        if not steps.do_resize or source.shape[:2] == out_size:
            return source
        source = Image.fromarray(np.ascontiguousarray(source))
    if steps.do_resize and source.size != (width, height):
        source = source.resize((width, height), Image.Resampling(steps.resample))
    return np.asarray(source)


def write_image(
    source: Image.Image | np.ndarray, box: Box, out: np.ndarray, steps: PixelSteps, where: str
) -> None:
    """Crop `box` from `source`, resize it to `out`'s size, rescale and normalise it into `out`.

    Args:
        source: a PIL RGB image, or an (H, W, 3) uint8 or float array (from `image_inputs.to_rgb`).
        out: (3, h, w) float32 view of the output canvas; h, w are the resize target.
        where: "sample b, image j", for error messages.
    """
    top, left, bottom, right = box
    if isinstance(source, Image.Image):
        whole = (bottom - top, right - left) == (source.height, source.width)
        crop: Image.Image | np.ndarray = source if whole else source.crop((left, top, right, bottom))
    else:
        crop = source[top:bottom, left:right]
    pil_rescaled = False
    if isinstance(crop, np.ndarray) and crop.dtype != np.uint8:
        if not steps.do_resize:
            out[...] = _reference_arithmetic(crop.transpose(2, 0, 1), False, steps)
            return
        crop, pil_rescaled = _bytes_for_pil(crop, where)
    pixels = _resized_bytes(crop, out.shape[1:], steps)
    table = _byte_table(pil_rescaled, steps)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[c], mode="clip")  # "clip": no buffered copy of out
