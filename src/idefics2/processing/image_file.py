"""Image files: a path or a binary file object decoded into a PIL image, with errors a caller can name."""

from __future__ import annotations

from typing import IO, Any


def read_image(source: str | IO[bytes]) -> Any:
    """A whole image file (a path or a binary file object) decoded into memory as a PIL image.

    A file PIL cannot decode, a decompression bomb or a read error raises ValueError with PIL's
    reason; a missing path raises FileNotFoundError, so callers can say which it was.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise ValueError(str(err)) from None
