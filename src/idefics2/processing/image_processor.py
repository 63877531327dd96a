"""`Idefics2ImageProcessor`: images → padded `pixel_values` and `pixel_attention_mask` (docs/numerics.md §5).

Sits between user images (or `Idefics2Processor`) and the vision tower. Bit-exact with
transformers 5.24 `Idefics2ImageProcessorPil` (= the 4.x default slow processor) on every input the
reference accepts. Shapes: B samples, M images per sample (×5 with splitting), H/W the canvas.
Input checks live in `image_inputs.py`, pixel arithmetic in `image_ops.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from idefics2.processing.batch import BatchFeature
from idefics2.processing.config_files import read_json_object, write_text_file
from idefics2.processing.image_inputs import CheckedImage, check_image, make_nested_images, to_rgb
from idefics2.processing.image_ops import Box, resize_output_size, split_boxes, write_image
from idefics2.processing.image_settings import SETTING_NAMES, Settings, checked_settings

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "Idefics2ImageProcessor", "make_nested_images"]

logger = logging.getLogger(__name__)

# Pillow's own decompression-bomb warning threshold (PIL.Image.MAX_IMAGE_PIXELS), about 89.5 Mpx.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Keys that Hub and transformers configs carry for their own loaders, not processor settings.
_BOOKKEEPING_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "_processor_class"}
_PARALLEL_RESIZE_PIXELS = 1_500_000  # see _worker_count


@dataclass(frozen=True)
class _Job:
    """One input image and where its (sub-)images go: slots `slot`, `slot + 1`, ... of `sample`."""

    sample: int
    slot: int
    image: CheckedImage
    regions: list[tuple[Box, tuple[int, int]]]  # crop box and output (h, w) of each sub-image


def _plan(images: Any, settings: Settings, input_data_format: str | None) -> tuple[list[_Job], list[int]]:
    """Validate every image and lay out the output before any pixel work, so bad input fails fast.

    Returns the jobs and the number of (sub-)images of each sample.
    """
    jobs, counts = [], []
    for b, sample in enumerate(make_nested_images(images)):
        slot = 0
        for j, image in enumerate(sample):
            checked = check_image(
                image, f"sample {b}, image {j}",
                input_data_format=input_data_format, max_image_pixels=settings.max_image_pixels,
            )  # fmt: skip
            regions = _regions(checked, settings)
            jobs.append(_Job(b, slot, checked, regions))
            slot += len(regions)
        counts.append(slot)
    return jobs, counts


def _regions(image: CheckedImage, settings: Settings) -> list[tuple[Box, tuple[int, int]]]:
    """Crop boxes of one image (one, or five with splitting) and the output (h, w) of each."""
    if not settings.do_image_splitting:
        boxes = [(0, 0, image.height, image.width)]
    elif min(image.height, image.width) < 2:
        raise ValueError(
            f"{image.where}: a {image.width}x{image.height} image cannot be split into 4 crops; "
            "do_image_splitting needs at least 2x2 pixels"
        )
    else:
        boxes = split_boxes(image.height, image.width)
    regions = []
    for top, left, bottom, right in boxes:
        height, width = bottom - top, right - left
        if settings.do_resize:
            height, width = resize_output_size(height, width, settings.size)
        limit = settings.max_image_pixels
        if limit is not None and height * width > limit:  # e.g. a huge fixed `size`
            raise ValueError(
                f"{image.where}: resizing to {width}x{height} exceeds max_image_pixels={limit}; "
                "use a smaller size or raise max_image_pixels"
            )
        regions.append(((top, left, bottom, right), (height, width)))
    return regions


def _worker_count(jobs: list[_Job]) -> int:
    """Threads for `_run`: up to `torch.get_num_threads()`, but only for enough PIL resizing.

    Pillow's resize releases the GIL, so images resize in parallel; lookups and copies are
    memory-bound and gain nothing. Measured on 2 cores: below ~1.5 Mpx of resize traffic (input
    plus output pixels) the pool costs more than it saves.
    """
    traffic = 0
    for job in jobs:
        for (top, left, bottom, right), (h, w) in job.regions:
            if (h, w) != (bottom - top, right - left):
                traffic += (bottom - top) * (right - left) + h * w
    return min(torch.get_num_threads(), len(jobs)) if traffic >= _PARALLEL_RESIZE_PIXELS else 1


def _run(jobs: list[_Job], settings: Settings, slot: Callable[[int, int, int, int], np.ndarray]) -> None:
    """Convert each image once, then write each of its sub-images into `slot(b, k, h, w)`.

    Jobs write disjoint parts of the output and only read their inputs (PIL images were loaded by
    `check_image`), so they may run in threads; the first error in job order is raised.
    """
    steps = settings.steps

    def run(job: _Job) -> None:
        source = to_rgb(job.image, do_convert_rgb=settings.do_convert_rgb)
        for i, (box, (h, w)) in enumerate(job.regions):
            write_image(source, box, slot(job.sample, job.slot + i, h, w), steps, job.image.where)

    workers = _worker_count(jobs)
    if workers <= 1:
        for job in jobs:
            run(job)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, jobs))


class Idefics2ImageProcessor:
    """Idefics2 image preprocessing, bit-exact with transformers' PIL path (docs/numerics.md §5).

    The settings of docs/numerics.md §5.2 are plain attributes and can be overridden per call.
    `max_image_pixels` (default: Pillow's threshold, ~89.5 Mpx; None disables) rejects larger
    inputs and resize targets before any pixel work. Batches with enough resizing resize their
    images in up to `torch.get_num_threads()` threads (Pillow releases the GIL); the result does
    not depend on it, and `torch.set_num_threads(1)` keeps everything on the calling thread.

    Deviations, only where the reference fails or misbehaves: arrays whose channel axis is
    ambiguous (first and last axis both of size 1/3/4) raise unless `input_data_format` is given;
    images with a side of 1 pixel raise with splitting instead of producing empty crops; integer
    arrays must hold values in [0, 255]; bfloat16 tensors are read as float32; a batch without any
    image raises. `pixel_values` are always float32 (the reference keeps float64/float16 inputs'
    dtype) and `pixel_attention_mask` always int64, padding images included.
    """

    def __init__(
        self,
        *,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | list[float] = (0.5, 0.5, 0.5),
        image_std: float | list[float] = (0.5, 0.5, 0.5),
        do_pad: bool = True,
        do_image_splitting: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        settings = checked_settings(
            {
                "do_convert_rgb": do_convert_rgb,
                "do_resize": do_resize,
                "size": {"shortest_edge": 378, "longest_edge": 980} if size is None else size,
                "resample": resample,
                "do_rescale": do_rescale,
                "rescale_factor": rescale_factor,
                "do_normalize": do_normalize,
                "image_mean": image_mean,
                "image_std": image_std,
                "do_pad": do_pad,
                "do_image_splitting": do_image_splitting,
                "max_image_pixels": max_image_pixels,
            }
        )
        self.do_convert_rgb = settings.do_convert_rgb
        self.do_resize = settings.do_resize
        self.size = settings.size
        self.resample = settings.resample
        self.do_rescale = settings.do_rescale
        self.rescale_factor = settings.rescale_factor
        self.do_normalize = settings.do_normalize
        self.image_mean = list(settings.image_mean)
        self.image_std = list(settings.image_std)
        self.do_pad = settings.do_pad
        self.do_image_splitting = settings.do_image_splitting
        self.max_image_pixels = settings.max_image_pixels

    def __call__(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        input_data_format: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """Preprocess a batch of images.

        Args:
            images: a single image, a flat list (one sample) or a list of lists (one per sample, may
                be empty); PIL images of any mode, numpy arrays or torch tensors (HWC or CHW, uint8
                or float, 1/3/4 channels). See `make_nested_images` and `image_inputs.to_rgb`.
            return_tensors: "pt" (torch) or "np"/None (numpy).
            input_data_format: "channels_first"/"channels_last" for arrays; None infers it.
            **overrides: any setting (`do_image_splitting=True`, ...) for this call only.

        Returns:
            `BatchFeature` with `pixel_values` (B, M, 3, H, W) float32 and `pixel_attention_mask`
            (B, M, H, W) int64: 1 on each image's top-left h×w, 0 elsewhere and for padding images.
            With `do_pad=False`, as the reference: `pixel_values` only, a list per sample of
            (3, h, w) tensors or arrays.

        Raises:
            ValueError: bad structure, image or setting; image errors name the sample and image.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        unknown = set(overrides) - set(SETTING_NAMES)
        if unknown:
            raise ValueError(
                f"unknown image processor option(s) {sorted(unknown)}; valid: {list(SETTING_NAMES)}"
            )
        settings = checked_settings({**{name: getattr(self, name) for name in SETTING_NAMES}, **overrides})
        jobs, counts = _plan(images, settings, input_data_format)
        if not jobs:
            raise ValueError("no images in the batch (every sample is empty); there is nothing to preprocess")
        to_output = torch.from_numpy if return_tensors == "pt" else np.asarray

        if not settings.do_pad:
            unpadded = [[np.empty(0, np.float32)] * count for count in counts]

            def new_image(b: int, k: int, h: int, w: int) -> np.ndarray:
                unpadded[b][k] = np.empty((3, h, w), np.float32)
                return unpadded[b][k]

            _run(jobs, settings, new_image)
            return BatchFeature(pixel_values=[[to_output(x) for x in sample] for sample in unpadded])

        height = max(h for job in jobs for _, (h, _) in job.regions)
        width = max(w for job in jobs for _, (_, w) in job.regions)
        # np.empty plus explicit zeros writes each byte once. np.zeros would make the kernel zero
        # every page on first touch, with small-page faults; numpy asks for huge pages for empty.
        pixel_values = np.empty((len(counts), max(counts), 3, height, width), np.float32)
        mask = np.empty((len(counts), max(counts), height, width), np.int64)
        for b, count in enumerate(counts):
            pixel_values[b, count:] = 0
            mask[b, count:] = 0

        def canvas(b: int, k: int, h: int, w: int) -> np.ndarray:
            pixel_values[b, k, :, h:] = 0
            pixel_values[b, k, :, :h, w:] = 0
            mask[b, k, h:] = 0
            mask[b, k, :h, w:] = 0
            mask[b, k, :h, :w] = 1
            return pixel_values[b, k, :, :h, :w]

        _run(jobs, settings, canvas)
        return BatchFeature(pixel_values=to_output(pixel_values), pixel_attention_mask=to_output(mask))

    preprocess = __call__

    def to_dict(self) -> dict[str, Any]:
        """All settings as JSON-ready values (copies), under the transformers key names, plus the
        `image_processor_type` that transformers' `to_dict` carries (`from_dict` drops it again)."""
        settings = copy.deepcopy({name: getattr(self, name) for name in SETTING_NAMES})
        return {**settings, "image_processor_type": type(self).__name__}

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> Idefics2ImageProcessor:
        """Build from a config dict, then `overrides` (settings, e.g. `do_image_splitting=False`; any
        other name is refused). Bookkeeping keys (`image_processor_type`, `processor_class`) are
        dropped; other unknown keys of the dict are logged and ignored; missing keys take the defaults."""
        bad = sorted(set(overrides) - set(SETTING_NAMES))
        if bad:
            raise ValueError(f"unknown image processor option(s) {bad}; valid: {sorted(SETTING_NAMES)}")
        unknown = set(config) - set(SETTING_NAMES) - _BOOKKEEPING_KEYS
        if unknown:
            logger.warning("ignoring unknown image processor keys: %s", sorted(unknown))
        return cls(**{**{key: value for key, value in config.items() if key in SETTING_NAMES}, **overrides})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **overrides: Any) -> Idefics2ImageProcessor:
        """Load from a local folder: `preprocessor_config.json` (4.x Hub layout) if present, else the
        `"image_processor"` entry of `processor_config.json` (what transformers 5.x writes);
        `overrides` as `from_dict` takes them. A bad file is a ValueError naming it and the field;
        `max_image_pixels: null` in a file is refused (`from_file_config`)."""
        folder = Path(folder)
        legacy, combined = folder / "preprocessor_config.json", folder / "processor_config.json"
        if legacy.is_file():
            return cls.from_file_config(read_json_object(legacy, "an image processor config"), legacy, **overrides)
        if combined.is_file():
            config = read_json_object(combined)
            if not isinstance(config.get("image_processor"), dict):
                raise ValueError(f"{combined} has no 'image_processor' entry and {legacy.name} is missing")
            return cls.from_file_config(config["image_processor"], combined, **overrides)
        raise FileNotFoundError(f"neither {legacy.name} nor {combined.name} in {folder}")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> Idefics2ImageProcessor:
        """Build from one JSON config file (what `to_json_file` writes), read as `from_pretrained` reads it."""
        return cls.from_file_config(read_json_object(Path(path), "an image processor config"), Path(path))

    @classmethod
    def from_file_config(cls, config: dict[str, Any], path: Path, **overrides: Any) -> Idefics2ImageProcessor:
        """`from_dict` on a dict read from `path`, its errors naming the file. `max_image_pixels: null`
        is refused: a folder must not turn the decompression-bomb guard off (leave the key out for the
        default, or pass `max_image_pixels=None` to `from_pretrained` to disable it in this process);
        `to_json_string` leaves it out when it is None, so saved folders always load."""
        if config.get("max_image_pixels", 0) is None and "max_image_pixels" not in overrides:
            raise ValueError(f"{path}: max_image_pixels is null, which would turn off the decompression-bomb "
                             "guard; a file may not do that: remove the key (default: "
                             f"{DEFAULT_MAX_IMAGE_PIXELS}) or pass max_image_pixels=None when loading")
        try:
            return cls.from_dict(config, **overrides)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def to_json_string(self) -> str:
        """preprocessor_config.json's text."""
        config = {**self.to_file_dict(), "processor_class": "Idefics2Processor"}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_file_dict(self) -> dict[str, Any]:
        """`to_dict` as files hold it: without `max_image_pixels` when the guard is off (None), since a
        file may not turn it off (`from_file_config`); loading the file turns it back on."""
        config = self.to_dict()
        if config["max_image_pixels"] is None:
            del config["max_image_pixels"]
        return config

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        write_text_file(Path(path), self.to_json_string())

    def save_pretrained(self, folder: str | os.PathLike[str]) -> list[str]:
        """Write `preprocessor_config.json` in the 4.x Hub layout, which transformers loads too.

        `max_image_pixels` is saved alongside; transformers keeps it as an unused attribute.
        Returns the list of files written, as transformers does.
        """
        path = Path(folder) / "preprocessor_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_json_file(path)
        return [str(path)]

    def __repr__(self) -> str:
        return f"Idefics2ImageProcessor({self.to_dict()})"
