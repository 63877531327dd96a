"""What `Idefics2Processor.apply_chat_template` takes beyond the template: the images inside the
messages and the options of transformers' signature.

An image part of a message may carry its image (`{"type": "image", "image": <PIL image or array>}`)
or a local file (`"path"`), as in transformers' chat format; a part with neither (`{"type":
"image"}`) is a placeholder whose pixels are passed separately. Remote images (`"url"`) are not
fetched: nothing here reaches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from idefics2.processing.chat_template import Message
from idefics2.processing.image_file import read_image

# transformers' apply_chat_template options this processor does not implement, with their off value.
UNSUPPORTED_OPTIONS = {"continue_final_message": False, "tools": None, "documents": None,
                       "return_assistant_tokens_mask": False, "load_audio_from_video": False}
# Keywords that belong to the processor call rather than to the template (transformers moves them too).
PROCESSOR_OPTIONS = ("padding", "truncation", "max_length", "image_seq_len", "do_image_splitting")


def check_options(options: dict[str, Any]) -> None:
    """A ValueError naming each transformers option set that we do not implement."""
    used = sorted(name for name, off in UNSUPPORTED_OPTIONS.items()
                  if options.get(name, off) not in (off, None))
    if used:
        raise ValueError(f"apply_chat_template option(s) {used} are not supported by this processor; "
                         "leave them unset")


def _part_image(part: Message, where: str) -> Any:
    if part.get("image") is not None:
        return part["image"]
    if part.get("path") is not None:
        try:
            return read_image(str(part["path"]))
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{where}: cannot read image {part['path']!r}: {err}") from None
    if part.get("url") is not None:
        raise ValueError(f"{where}: remote images are not fetched; pass the image itself (\"image\": a PIL "
                         "image) or a local file (\"path\")")
    return None


def images_from_messages(conversations: Sequence[Sequence[Message]]) -> list[list[Any]] | None:
    """The images carried by the image parts, per conversation in order; None when no part carries
    one. A conversation mixing carried images and placeholders is refused (its pixels would be
    matched to the wrong `<image>`)."""
    found: list[list[Any]] = []
    placeholders = 0
    for c, conversation in enumerate(conversations):
        images = []
        for m, message in enumerate(conversation):
            content = message.get("content")
            for p, part in enumerate(content if isinstance(content, (list, tuple)) else []):
                if isinstance(part, dict) and part.get("type") == "image":
                    image = _part_image(part, f"conversation {c}, message {m}, part {p}")
                    if image is None:
                        placeholders += 1
                    else:
                        images.append(image)
        found.append(images)
    carried = sum(len(images) for images in found)
    if carried and placeholders:
        raise ValueError(f"{carried} image parts carry an image and {placeholders} do not; give every image "
                         "part its \"image\" or \"path\", or none of them and pass the pixels separately")
    return found if carried else None
