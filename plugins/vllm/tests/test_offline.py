"""vLLM's offline engine (`LLM.generate`) against our model on random small Idefics2 models.

Two configs, one engine each (start-up is most of the time): decoder head dims 32 and 80; images
whose sides are not multiples of the patch; two images side by side in one prompt (they share a
fake token); splitting off by default on one, on by default on the other (where a sliding window
shorter than the prompt and tied embeddings are tried too), and switched per request. The second
config's 70 x 70 position grid with images of 25, 49, 50 and 55 patches a side is where vLLM's own
position-id rule picks other buckets than ours.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import config_dict, new_llm, ours, write_checkpoint
from idefics2.model.vision import bucket_position_ids

TOLERANCE = 1e-4
PROMPT = "User:{images}What is in the picture?<end_of_utterance>\nAssistant:"


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    do_image_splitting: bool
    longest_edge: int
    shortest_edge: int
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) of the images drawn for it


CASES = [
    Case("hd32-nosplit", config_dict(text_hidden=128, text_heads=4, kv_heads=2, vision_hidden=48, vision_heads=3,
                                     patch=4, image_size=64, latents=8, sliding_window=None, tie=False),
         False, 60, 30, ((37, 53), (61, 29), (45, 45))),
    Case("hd80-split-window-tied", config_dict(text_hidden=160, text_heads=2, kv_heads=1, vision_hidden=40,
                                               vision_heads=2, patch=4, image_size=280, latents=6,
                                               sliding_window=64, tie=True),
         True, 220, 100, ((100, 196), (200, 220), (197, 101))),
]


def image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def engine(request: pytest.FixtureRequest, checkpoints: Path) -> Iterator[tuple[Case, Any, Any, Any]]:
    """(case, vLLM engine, our model, our processor) on the same checkpoint folder."""
    case: Case = request.param
    folder = write_checkpoint(checkpoints / case.name, case.config, seed=len(case.name),
                              do_image_splitting=case.do_image_splitting, longest_edge=case.longest_edge,
                              shortest_edge=case.shortest_edge)
    llm = new_llm(folder, logprobs_mode="raw_logits", max_logprobs=-1)
    model, processor = ours(folder)
    yield case, llm, model, processor
    del llm
    gc.collect()


def vllm_request(prompt: str, images: list[Image.Image], split: bool | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": prompt}
    if images:
        request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    if split is not None:
        request["mm_processor_kwargs"] = {"do_image_splitting": split}
    return request


def our_inputs(processor: Any, prompt: str, images: list[Image.Image], split: bool | None) -> dict[str, Any]:
    options = {} if split is None else {"do_image_splitting": split}
    return dict(processor(images=images or None, text=prompt, **options))


def greedy(max_tokens: int, logprobs: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True)


def compare_greedy(ours_logits: list[torch.Tensor], ours_tokens: list[int], theirs_tokens: list[int]) -> str | None:
    """Tokens equal up to the first step whose top-2 logits (ours) are within TOLERANCE; returns
    a note for such a near-tie (where either token is a right answer), None when all steps match."""
    for step, (logits, mine, theirs) in enumerate(zip(ours_logits, ours_tokens, theirs_tokens, strict=True)):
        top2 = logits.topk(2).values
        if float(top2[0] - top2[1]) < TOLERANCE:
            return f"near-tie at step {step}: top-2 logits {top2.tolist()}; compared steps 0..{step - 1}"
        assert theirs == mine, f"step {step}: vLLM chose {theirs}, ours {mine} (top-2 {top2.tolist()})"
    return None


@pytest.mark.parametrize("split", [None, True, False], ids=["folder-default", "split", "no-split"])
def test_prompt_logits_and_greedy_tokens_match_ours(engine: tuple[Case, Any, Any, Any], split: bool | None) -> None:
    """Two images side by side: the prompt ids are our processor's, the first step's logits are
    within 1e-4 of our model's, and greedy decoding follows our `generate` token for token."""
    case, llm, model, processor = engine
    images = [image(case.image_sizes[0], 1), image(case.image_sizes[1], 2)]
    prompt = PROMPT.format(images="<image><image>")
    out = llm.generate(vllm_request(prompt, images, split), greedy(12, -1), use_tqdm=False)[0]
    inputs = our_inputs(processor, prompt, images, split)
    assert list(out.prompt_token_ids) == inputs["input_ids"][0].tolist()
    blocks = 5 if (case.do_image_splitting if split is None else split) else 1
    assert inputs["input_ids"][0].tolist().count(processor.fake_image_token_id) == 2 * blocks + 1  # one shared

    with torch.no_grad():
        first = model(**inputs).logits[0, -1]  # (V,)
    raw = out.outputs[0].logprobs[0]  # token id -> Logprob holding the raw logit
    theirs = torch.tensor([raw[i].logprob for i in range(first.shape[0])])
    assert (theirs - first).abs().max().item() <= TOLERANCE

    mine = model.generate(**inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)
    tokens = mine.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    note = compare_greedy([step[0] for step in mine.logits], tokens, list(out.outputs[0].token_ids))
    if note:
        print(f"{case.name} split={split}: {note}")


def test_a_batch_of_eight_equals_each_alone(engine: tuple[Case, Any, Any, Any]) -> None:
    """Eight different requests (text only, one image, two images, each size, splitting both
    ways) in one `LLM.generate` give what each gives alone."""
    case, llm, _, _ = engine
    sizes = case.image_sizes
    requests = [
        vllm_request(PROMPT.format(images=""), []),
        vllm_request(PROMPT.format(images="<image>"), [image(sizes[0], 3)]),
        vllm_request(PROMPT.format(images="<image>"), [image(sizes[1], 4)], split=not case.do_image_splitting),
        vllm_request(PROMPT.format(images="<image><image>"), [image(sizes[2], 5), image(sizes[0], 6)]),
        vllm_request("User:Describe<image>and then<image><end_of_utterance>\nAssistant:",
                     [image(sizes[1], 7), image(sizes[2], 8)]),
        vllm_request(PROMPT.format(images="<image>"), [image(sizes[2], 9)], split=True),
        vllm_request("User:Hello there!<end_of_utterance>\nAssistant:", []),
        vllm_request(PROMPT.format(images="<image>"), [image(sizes[0], 10)], split=False),
    ]
    params = greedy(10, 2)
    together = llm.generate(requests, params, use_tqdm=False)
    for index, request in enumerate(requests):
        alone = llm.generate(request, params, use_tqdm=False)[0].outputs[0]
        batched = together[index].outputs[0]
        for step, (a, b) in enumerate(zip(alone.token_ids, batched.token_ids, strict=True)):
            top2 = sorted((lp.logprob for lp in alone.logprobs[step].values()), reverse=True)[:2]
            if top2[0] - top2[1] < TOLERANCE:
                print(f"{case.name} request {index}: near-tie at step {step}, compared steps 0..{step - 1}")
                break
            assert a == b, f"request {index} step {step}: alone {a}, in the batch {b}"


def test_a_processor_option_other_than_splitting_is_refused(engine: tuple[Case, Any, Any, Any]) -> None:
    case, llm, _, _ = engine
    request = vllm_request(PROMPT.format(images="<image>"), [image(case.image_sizes[0], 11)])
    request["mm_processor_kwargs"] = {"size": {"longest_edge": 16, "shortest_edge": 8}}
    with pytest.raises(ValueError, match="do_image_splitting"):
        llm.generate(request, greedy(1, 0), use_tqdm=False)


def test_the_second_config_meets_sides_where_vllms_own_position_ids_differ() -> None:
    """What makes the logits test cover the position-id rule: on a 70 x 70 grid, vLLM's own rule
    gives other ids than ours for the full images of the second config (whose sizes the
    processor keeps)."""
    from transformers import Idefics2VisionConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.idefics2_vision_model import Idefics2VisionEmbeddings

    case = CASES[1]
    vision = case.config["vision_config"]
    with set_current_vllm_config(VllmConfig()):
        embeddings = Idefics2VisionEmbeddings(Idefics2VisionConfig(**vision))
    grid = vision["image_size"] // vision["patch_size"]
    for height, width in case.image_sizes[:2]:
        mask = torch.ones(1, height // vision["patch_size"], width // vision["patch_size"], dtype=torch.bool)
        assert not torch.equal(embeddings.get_position_ids(mask), bucket_position_ids(mask, grid))
