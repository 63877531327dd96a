"""idefics2: an exact, fast PyTorch runtime for the Idefics2 vision-language model.

The public names are imported lazily so that `import idefics2` (and the CLI's start-up) does not
pay for torch model code or the tokenizer until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Idefics2Config": "idefics2.config",
    "VisionConfig": "idefics2.config",
    "PerceiverConfig": "idefics2.config",
    "TextConfig": "idefics2.config",
    "Idefics2Model": "idefics2.modeling",
    "Idefics2ForConditionalGeneration": "idefics2.modeling",
    "Idefics2ImageProcessor": "idefics2.processing.image_processor",
    "Idefics2Processor": "idefics2.processing.processor",
    "BatchFeature": "idefics2.processing.batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'idefics2' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
