"""The transformers documentation's usage example runs with only its import line changed.

The checkpoint is a tiny random Idefics2 laid out like the Hub (config.json, safetensors, the
Hub-like tokenizer and processor files), and the two COCO photos are replaced by local images:
the Hub and the web are unreachable here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HUB_LIKE_TOKENIZER, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration


@pytest.fixture(scope="module")
def hub_like_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("idefics2-tiny")
    config = tiny_config_dict(vocab=32003, image_token_id=32001, latents=64, patch=14, image_size=980)
    torch.manual_seed(0)
    Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).save_pretrained(folder)
    for file in HUB_LIKE_TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def test_documentation_example_runs_with_only_the_import_changed(hub_like_checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    image_1 = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    image_2 = Image.fromarray(rng.integers(0, 256, (427, 400, 3), dtype=np.uint8))

    # ---- the documentation's code from here on (import line changed, local folder) ----
    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor

    images = [image_1, image_2]

    messages = [{
        "role": "user",
        "content": [
            {"type": "text", "text": "What’s the difference between these two images?"},
            {"type": "image"},
            {"type": "image"},
        ],
    }]

    processor = Idefics2Processor.from_pretrained(hub_like_checkpoint)
    model = Idefics2ForConditionalGeneration.from_pretrained(hub_like_checkpoint)

    text = processor.apply_chat_template(messages)
    assert text == "User: What’s the difference between these two images?<image><image><end_of_utterance>\n"

    inputs = processor(images=images, text=text)

    generated_text = model.generate(**inputs)
    # ---- end of the documentation's code ----

    prompt = inputs["input_ids"]
    assert (prompt == processor.image_token_id).sum() == 2 * 64
    assert inputs["pixel_values"].shape == (1, 2, 3, 480, 640)
    assert generated_text.shape[0] == 1 and generated_text.shape[1] > prompt.shape[1]
    assert torch.equal(generated_text[:, : prompt.shape[1]], prompt)
    assert isinstance(processor.batch_decode(generated_text, skip_special_tokens=True)[0], str)
