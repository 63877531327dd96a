"""Image files: a path or a binary file object decoded into a PIL image, with errors a caller can name."""

from __future__ import annotations

import os
import stat
import warnings
from typing import IO, Any

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (~9459 x 9459)


def read_image(source: str | IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """A whole image file (a path or a binary file object) decoded into memory as a PIL image, turned
    upright by its EXIF orientation as transformers' `load_image` does.

    A path must be a regular file (a FIFO or a device would block or never end). A file PIL cannot
    decode, an image of more than `max_pixels` pixels (read from the header, before anything is
    decoded) or a read error raises ValueError with the reason; a missing path raises
    FileNotFoundError, so callers can say which it was.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        mode = os.stat(source).st_mode  # FileNotFoundError for a missing path
        if not stat.S_ISREG(mode):
            raise ValueError(f"{os.fspath(source)} is not a regular file")
    try:
        with warnings.catch_warnings():  # the size is checked here, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ValueError(f"the image is {width}x{height} = {width * height} pixels, more than the "
                                     f"{max_pixels} allowed")
                image.load()
                return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise ValueError(str(err) or type(err).__name__) from None
