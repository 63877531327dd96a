"""Image files: a path or a binary file object decoded into a PIL image, with errors a caller can name."""

from __future__ import annotations

from typing import IO, Any


def read_image(source: str | IO[bytes], max_pixels: int | None = None) -> Any:
    """A whole image file (a path or a binary file object) decoded into memory as a PIL image.

    A file PIL cannot decode, a decompression bomb, an image of more than `max_pixels` pixels
    (read from the header, before anything is decoded) or a read error raises ValueError with the
    reason; a missing path raises FileNotFoundError, so callers can say which it was.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"the image is {width}x{height} = {width * height} pixels, more than the "
                                 f"{max_pixels} allowed")
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise ValueError(str(err)) from None
