"""How vLLM turns a request's images into model inputs and prompt tokens, with our processor's rules.

vLLM tokenizes the prompt itself (its `<image>` placeholders included) and calls the image
processor on the images alone; it then replaces each `<image>` token with the block our
processor writes for one image: `F I*L F`, five such blocks with splitting (4 crops + the full
image), F = `<fake_token_around_image>`, I = `<image>`, L = `image_seq_len`. Where two images
touch, our processor lets them share the fake token between them; `_apply_prompt_updates` does
the same, so the token ids are the ones `idefics2.Idefics2Processor` gives for the same prompt.
Image splitting comes from `preprocessor_config.json`, then `--mm-processor-kwargs`, then the
request's `mm_processor_kwargs` (`{"do_image_splitting": true}`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.multimodal.processing.processor import MultiModalPromptUpdates, PlaceholderFeaturesInfo

from idefics2 import Idefics2Processor
from idefics2.processing.processor import IMAGE_TOKEN, SPLIT_IMAGES_PER_IMAGE, expand_image_tokens

SPLITTING_OPTION = "do_image_splitting"


class Idefics2ProcessingInfo(BaseProcessingInfo):
    """Our processor for the served folder, and what follows from it per request."""

    @cached_property
    def processor(self) -> Idefics2Processor:
        return Idefics2Processor.from_pretrained(self.ctx.model_config.model)

    def get_hf_processor(self, **kwargs: object) -> Idefics2Processor:
        return self.processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def image_splitting(self, mm_kwargs: Mapping[str, object]) -> bool:
        """The folder's `do_image_splitting`, overridden by the server's then the request's
        `mm_processor_kwargs`; any other processor option is refused rather than ignored."""
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        unknown = sorted(set(merged) - {SPLITTING_OPTION})
        if unknown:
            raise ValueError(f"unsupported mm_processor_kwargs {unknown} for Idefics2; the only option is "
                             f"{SPLITTING_OPTION!r} (true or false)")
        split = merged.get(SPLITTING_OPTION, self.processor.image_processor.do_image_splitting)
        if not isinstance(split, bool):
            raise ValueError(f"{SPLITTING_OPTION} must be true or false, got {split!r}")
        return split

    def image_block(self, split: bool) -> list[int]:
        """The token ids our processor writes for one image standing alone."""
        text = expand_image_tokens(IMAGE_TOKEN, image_seq_len=self.processor.image_seq_len, do_image_splitting=split)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


class Idefics2DummyInputsBuilder(BaseDummyInputsBuilder[Idefics2ProcessingInfo]):
    """Largest images the processor can produce, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions) -> MultiModalDataDict:
        size = self.info.processor.image_processor.size
        side = size.get("longest_edge") or max(size.values())
        return {"image": self._get_dummy_images(width=side, height=side, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class Idefics2MultiModalProcessor(BaseMultiModalProcessor[Idefics2ProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Our image processor on the request's images. Each image keeps its own crops, cut to
        the largest of them, so its tensors do not depend on the other images of the request
        (vLLM caches them per image)."""
        images = list(hf_data["images"])  # type: ignore[call-overload]
        split = self.info.image_splitting(hf_kwargs)
        out = self.info.processor.image_processor([images], do_image_splitting=split)
        crops = SPLIT_IMAGES_PER_IMAGE if split else 1
        pixels, masks = out["pixel_values"][0], out["pixel_attention_mask"][0].bool()  # (M, 3, H, W), (M, H, W)
        pixel_values, pixel_masks = [], []
        for start in range(0, len(images) * crops, crops):
            mask = masks[start:start + crops]  # (crops, H, W)
            height, width = int(mask.any(dim=2).sum(dim=1).max()), int(mask.any(dim=1).sum(dim=1).max())
            pixel_values.append(pixels[start:start + crops, :, :height, :width])
            pixel_masks.append(mask[:, :height, :width])
        return BatchFeature({"pixel_values": pixel_values, "pixel_attention_mask": pixel_masks})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        # One item per image: its crops (crops, 3, h, w) and their pixel masks (crops, h, w).
        return {"pixel_values": MultiModalFieldConfig.batched("image"),
                "pixel_attention_mask": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.processor.image_token_id
        block = self.info.image_block(self.info.image_splitting(hf_processor_mm_kwargs))
        return [PromptReplacement(modality="image", target=[image_token_id],
                                  replacement=PromptUpdateDetails.select_token_id(block, image_token_id))]

    def _apply_prompt_updates(self, token_ids: list[int], mm_prompt_updates: MultiModalPromptUpdates,
                              ) -> tuple[list[int], Mapping[str, list[PlaceholderFeaturesInfo]]]:
        ids, placeholders = super()._apply_prompt_updates(token_ids, mm_prompt_updates)
        return share_fake_tokens(ids, placeholders, self.info.processor.fake_image_token_id)


def share_fake_tokens(ids: list[int], placeholders: Mapping[str, list[PlaceholderFeaturesInfo]], fake_id: int,
                      ) -> tuple[list[int], dict[str, list[PlaceholderFeaturesInfo]]]:
    """Drop the opening fake token of every image block that follows another fake token, as our
    processor's expansion merges two adjacent fakes into one, and move the blocks after it.
    `placeholders["image"]` is in prompt order, as vLLM finds the blocks."""
    out: list[int] = []
    moved: list[PlaceholderFeaturesInfo] = []
    done = 0
    for block in placeholders.get("image", []):
        out.extend(ids[done:block.start_idx])
        tokens, is_embed = block.tokens, block.is_embed
        if out and out[-1] == fake_id and tokens[0] == fake_id:
            tokens = tokens[1:]
            is_embed = is_embed[1:] if is_embed is not None else None
        moved.append(PlaceholderFeaturesInfo(modality=block.modality, item_idx=block.item_idx,
                                             start_idx=len(out), tokens=tokens, is_embed=is_embed))
        out.extend(tokens)
        done = block.start_idx + block.length
    out.extend(ids[done:])
    return out, {**placeholders, "image": moved}
