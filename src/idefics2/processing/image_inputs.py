"""Input side of image preprocessing: nesting, per-image validation, RGB conversion.

First stage of `Idefics2ImageProcessor` (docs/numerics.md §5.3 steps 1–3); the text processor also calls
`make_nested_images`. Conversions match transformers 5.24 `Idefics2ImageProcessorPil` bit-for-bit
wherever the reference accepts the input; everything else is a `ValueError` that names the sample
and image index, raised before any pixel work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

ImageInput = Image.Image | np.ndarray | torch.Tensor

_CHANNEL_COUNTS = (1, 3, 4)
_LAYOUTS = ("channels_first", "channels_last")


def _is_image(obj: object) -> bool:
    return isinstance(obj, (Image.Image, np.ndarray, torch.Tensor))


def _describe(obj: object) -> str:
    if isinstance(obj, str):
        return f"a string ({obj[:60]!r}); URLs and paths are not loaded, open the file with PIL.Image.open"
    return type(obj).__name__


def make_nested_images(images: Any) -> list[list[ImageInput]]:
    """Normalise the accepted input structures to one list of images per sample (docs/numerics.md §5.3 step 1).

    Accepted: a single image (one sample, one image); a flat list of images (one sample); a list of
    lists (one list per sample, inner lists may be empty). As in the reference, a 4-D array is a
    stack of images: alone it is one sample, and a flat list of 4-D arrays is one sample per array.
    Images are PIL images, numpy arrays or torch tensors; their contents are checked later.

    Raises:
        ValueError: for an empty outer list, deeper nesting, a mix of lists and images at the top
            level, or any non-image object (strings included), naming its position.
    """
    if _is_image(images):
        return [list(images)] if getattr(images, "ndim", 3) == 4 else [[images]]
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"sample 0, image 0: expected an image or a list of images, got {_describe(images)}")
    if len(images) == 0:
        raise ValueError("got an empty list of images; pass at least one image")
    is_list = [isinstance(item, (list, tuple)) for item in images]
    if not any(is_list):
        for j, item in enumerate(images):
            if not _is_image(item):
                raise ValueError(f"sample 0, image {j}: expected an image, got {_describe(item)}")
        if all(getattr(item, "ndim", 3) == 4 for item in images):
            return [list(stack) for stack in images]
        return [list(images)]
    if not all(is_list):
        raise ValueError(
            f"element {is_list.index(False)} of the image list is not a list while element "
            f"{is_list.index(True)} is; use either a flat list of images or one list per sample"
        )
    for b, sample in enumerate(images):
        for j, item in enumerate(sample):
            if isinstance(item, (list, tuple)):
                raise ValueError(
                    f"sample {b}, image {j}: got a list; images nest at most two levels deep "
                    "(one list per sample, holding images)"
                )
            if not _is_image(item):
                raise ValueError(f"sample {b}, image {j}: expected an image, got {_describe(item)}")
    return [list(sample) for sample in images]


@dataclass(frozen=True)
class CheckedImage:
    """An image that passed validation: PIL (any mode) or an (H, W, C) array, C in {1, 3, 4}.

    Arrays are uint8 (other integer types are converted) or floating point, and finite.
    """

    data: Image.Image | np.ndarray
    height: int
    width: int
    where: str


def check_image(
    image: ImageInput, where: str, *, input_data_format: str | None, max_image_pixels: int | None
) -> CheckedImage:
    """Validate one image and bring arrays to (H, W, C) without copying pixels where possible.

    The channel axis of an array is the first or last axis of size 1, 3 or 4. Where both qualify
    the reference silently assumes channels-first (misreading e.g. a 3-pixel-high RGB strip); we
    raise instead and ask for `input_data_format`. Integer arrays must hold values in [0, 255].
    """
    if isinstance(image, Image.Image):
        width, height = image.size
        data: Image.Image | np.ndarray = image
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        data = _channels_last(_to_numpy(image, where), where, input_data_format)
        height, width = data.shape[:2]
    else:
        raise ValueError(
            f"{where}: expected a PIL image, numpy array or torch tensor, got {_describe(image)}"
        )
    if height == 0 or width == 0:
        raise ValueError(f"{where}: image has zero size (height={height}, width={width})")
    if max_image_pixels is not None and height * width > max_image_pixels:
        raise ValueError(
            f"{where}: {width}x{height} image has {height * width} pixels, more than "
            f"max_image_pixels={max_image_pixels} (decompression-bomb guard); raise it with "
            "Idefics2ImageProcessor(max_image_pixels=...) or per call, or pass None to disable the check"
        )
    if isinstance(data, np.ndarray):
        data = _checked_values(data, where)
    else:
        try:  # decode lazily opened files now: later steps may run in threads and only read
            data.load()
        except (OSError, ValueError) as error:
            raise ValueError(f"{where}: cannot load PIL image: {error}") from error
    return CheckedImage(data, height, width, where)


def _to_numpy(image: np.ndarray | torch.Tensor, where: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    tensor = image.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
        tensor = tensor.float()  # bfloat16 and friends have no numpy dtype; float32 holds them exactly
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: cannot read tensor of dtype {tensor.dtype}: {error}") from error


def _channels_last(array: np.ndarray, where: str, layout: str | None) -> np.ndarray:
    shape = tuple(array.shape)
    if array.ndim == 2:
        raise ValueError(
            f"{where}: 2-D array of shape {shape} has no channel axis; "
            "add one (array[..., None] for grayscale)"
        )
    if array.ndim != 3:
        raise ValueError(f"{where}: expected a 3-D array (H, W, C) or (C, H, W), got shape {shape}")
    if layout is None:
        first, last = shape[0] in _CHANNEL_COUNTS, shape[-1] in _CHANNEL_COUNTS
        if first and last:
            raise ValueError(
                f"{where}: cannot infer the channel axis of shape {shape}: both the first and the last axis "
                "could hold 1, 3 or 4 channels; pass input_data_format='channels_first' or 'channels_last'"
            )
        if not (first or last):
            raise ValueError(f"{where}: shape {shape} has no channel axis of size 1, 3 or 4 (first or last)")
        layout = "channels_first" if first else "channels_last"
    elif layout not in _LAYOUTS:
        raise ValueError(f"input_data_format must be one of {_LAYOUTS} or None, got {layout!r}")
    hwc = np.moveaxis(array, 0, -1) if layout == "channels_first" else array
    if hwc.shape[-1] not in _CHANNEL_COUNTS:
        raise ValueError(f"{where}: {hwc.shape[-1]} channels in shape {shape} ({layout}); expected 1, 3 or 4")
    return hwc


def _checked_values(hwc: np.ndarray, where: str) -> np.ndarray:
    if hwc.dtype.kind in "ui":
        low, high = hwc.min(), hwc.max()
        if low < 0 or high > 255:
            raise ValueError(f"{where}: integer image values must lie in [0, 255], got [{low}, {high}]")
        return hwc if hwc.dtype == np.uint8 else hwc.astype(np.uint8)
    if hwc.dtype.kind == "f":
        if not np.isfinite(hwc).all():
            raise ValueError(f"{where}: image contains NaN or infinite values")
        return hwc
    raise ValueError(
        f"{where}: unsupported dtype {hwc.dtype}; expected uint8 (or integers in [0, 255]) or float"
    )


def to_rgb(image: CheckedImage, *, do_convert_rgb: bool) -> Image.Image | np.ndarray:
    """Return a 3-channel source: a PIL RGB image, or an (H, W, 3) uint8 or float array view.

    With `do_convert_rgb`, PIL images with transparency are composited over opaque white and other
    modes go through `convert("RGB")`, exactly as the reference (docs/numerics.md §5.3 step 2). Arrays follow
    the 5.24 reference: 1 channel is replicated, 4 channels are composited over white in floating
    point (not PIL's integer arithmetic, so a 4-channel array and the same RGBA PIL image can differ
    by one level). Without it, the input must already have 3 channels.
    """
    data, where = image.data, image.where
    if isinstance(data, Image.Image):
        return _pil_to_rgb(data, where, do_convert_rgb)
    channels = data.shape[-1]
    if channels == 3:
        return data
    if not do_convert_rgb:
        raise ValueError(f"{where}: {channels}-channel array needs do_convert_rgb=True (or 3 channels)")
    if channels == 1:
        return np.broadcast_to(data, (*data.shape[:2], 3))
    rgb, alpha = data[..., :3], data[..., 3:]
    if data.dtype == np.uint8:
        opacity = alpha / 255
        return np.round(opacity * rgb + (1 - opacity) * 255).astype(np.uint8)
    low, high = data.min(), data.max()
    if low < 0 or high > 1:
        raise ValueError(f"{where}: float RGBA values must lie in [0, 1] to composite, got [{low}, {high}]")
    return (alpha * rgb + (1 - alpha)).astype(data.dtype)


def _pil_to_rgb(image: Image.Image, where: str, do_convert_rgb: bool) -> Image.Image:
    try:
        if do_convert_rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
            return image if image.mode == "RGB" else image.convert("RGB")
        raw = image if image.mode == "RGB" else np.asarray(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot convert PIL mode {image.mode!r} to RGB: {error}") from error
    if isinstance(raw, Image.Image):
        return raw
    if raw.ndim != 3 or raw.shape[-1] != 3 or raw.dtype != np.uint8:
        raise ValueError(
            f"{where}: PIL mode {image.mode!r} is not 3-channel 8-bit; it needs do_convert_rgb=True"
        )
    # The reference reads the raw bytes of 3-band modes (YCbCr, LAB, HSV) as if they were RGB.
    return Image.fromarray(raw)
