"""The two top-level models: `Idefics2Model` (no head) and `Idefics2ForConditionalGeneration`.

Data flow: pixels -> vision tower -> connector -> image features (R, L, D), scattered in order into
the `<image>` token positions of the embeddings -> Mistral decoder -> (LM head -> logits, loss).
Must match transformers' classes of the same names (docs/numerics.md §4); `from_pretrained`, `save_pretrained`
and `generate` forward to `idefics2.checkpoint` and `idefics2.generation`, which own file I/O and
decoding. Shape letters: B batch, M images per sample, R real images, L latents, T tokens, D width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idefics2.config import Idefics2Config
from idefics2.model.connector import Connector
from idefics2.model.kv_cache import KVCache
from idefics2.model.text import MistralDecoder
from idefics2.model.vision import VisionTransformer, check_pixel_inputs, patch_mask_from_pixels

if TYPE_CHECKING:
    from idefics2.generation import GenerationConfig, Generator


@dataclass
class Idefics2Output:
    """What `forward` returns. `last_hidden_state` is set by `Idefics2Model`, `logits`/`loss` by the LM."""

    last_hidden_state: Tensor | None = None
    logits: Tensor | None = None
    loss: Tensor | None = None
    past_key_values: KVCache | None = None
    image_hidden_states: Tensor | None = None  # (R, L, D) features of the real images, when computed


class _PretrainedMixin:
    """`from_pretrained` / `save_pretrained`, delegated to `idefics2.checkpoint`."""

    @classmethod
    def from_pretrained(cls, folder_or_repo_id: str | os.PathLike[str], *, dtype: Any = None,
                        device: Any = None, torch_dtype: Any = None, **kwargs: Any) -> Any:
        from idefics2.checkpoint import load_pretrained

        return load_pretrained(cls, folder_or_repo_id, dtype=dtype if dtype is not None else torch_dtype,
                               device=device, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> None:
        from idefics2.checkpoint import save_pretrained

        save_pretrained(self, folder, max_shard_size=max_shard_size)  # type: ignore[arg-type]


class Idefics2Model(_PretrainedMixin, nn.Module):
    # In a checkpoint of the whole Idefics2ForConditionalGeneration these weights sit under "model."
    checkpoint_prefix = "model."

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision_config)
        self.connector = Connector(config.vision_config, config.perceiver_config, config.text_config)
        self.text_model = MistralDecoder(config.text_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embed_tokens.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    def real_images(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """pixel_values (B, M, 3, H, W), mask (B, M, H, W) 1 = real pixel -> the real images
        (R, 3, H, W) in the model dtype and their patch masks (R, H//p, W//p).

        Padding images (every value exactly 0 after the dtype cast) are dropped; the rest keep
        their (sample, image) row-major order (docs/numerics.md §4.3 steps 1-3).
        """
        check_pixel_inputs(pixel_values, pixel_attention_mask)
        B, M, C, H, W = pixel_values.shape
        pixel_values = pixel_values.to(self.dtype).reshape(B * M, C, H, W)
        is_real = (pixel_values != 0).flatten(1).any(dim=1)  # (B*M,)
        pixel_values = pixel_values[is_real]  # (R, 3, H, W)
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], H, W, dtype=torch.bool, device=pixel_values.device)
        else:
            pixel_mask = pixel_attention_mask.reshape(B * M, H, W)[is_real].to(pixel_values.device)
        return pixel_values, patch_mask_from_pixels(pixel_mask, self.config.vision_config.patch_size)

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """pixel_values (B, M, 3, H, W), mask (B, M, H, W) 1 = real pixel -> features (R, L, D)
        of the real images (see `real_images`)."""
        pixels, patch_mask = self.real_images(pixel_values, pixel_attention_mask)
        patch_features = self.vision_model(pixels, patch_mask)  # (R, P, D_v)
        return self.connector(patch_features, patch_mask.flatten(1))  # (R, L, D)

    def merge_image_features(self, inputs_embeds: Tensor, image_features: Tensor,
                             input_ids: Tensor | None) -> Tensor:
        """Write feature rows, in order, into the `<image>` positions of inputs_embeds (B, T, D)."""
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id  # (B, T)
        else:
            image_row = self.get_input_embeddings().weight[self.config.image_token_id].to(inputs_embeds)
            is_image = (inputs_embeds == image_row).all(dim=-1)
        features = image_features.reshape(-1, image_features.shape[-1])  # (R*L, D)
        num_tokens, num_features = int(is_image.sum()), features.shape[0]
        if num_tokens != num_features:
            L = self.config.perceiver_config.resampler_n_latents
            raise ValueError(
                f"Image features and image tokens do not match: the text has {num_tokens} <image> tokens but "
                f"the images give {num_features} feature rows ({num_features // max(L, 1)} images x {L} "
                "latents). Usual causes: the processor's do_image_splitting differs from how the pixels were "
                "made (each image then needs 5x the tokens), truncation cut image tokens, or image_seq_len "
                "differs from the model's resampler_n_latents.")
        out = inputs_embeds.clone()
        out[is_image] = features.to(out.dtype)  # row-major: the k-th <image> token gets feature row k
        return out

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                pixel_attention_mask: Tensor | None = None, image_hidden_states: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool | None = None) -> Idefics2Output:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds "
                             f"(got {'both' if input_ids is not None else 'neither'})")
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("pass either pixel_values or precomputed image_hidden_states, not both")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        assert inputs_embeds is not None
        B, T, _ = inputs_embeds.shape
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values, pixel_attention_mask)
        if image_hidden_states is not None:
            inputs_embeds = self.merge_image_features(inputs_embeds, image_hidden_states, input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.text_config.num_hidden_layers, T)
        cache = past_key_values if use_cache else None
        if position_ids is None:
            # Not mask-aware, like the reference's forward; generate() passes mask-aware ones (docs/numerics.md §4.8).
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        hidden = self.text_model(inputs_embeds, position_ids, attention_mask, cache)
        return Idefics2Output(last_hidden_state=hidden, past_key_values=cache,
                              image_hidden_states=image_hidden_states)


class Idefics2ForConditionalGeneration(_PretrainedMixin, nn.Module):
    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Decoding defaults from the checkpoint's generation_config.json (set by the loader); None:
        # `generate` derives them from the config (EOS, pad) and its built-in defaults.
        self.generation_config: GenerationConfig | None = None
        self.generator: Generator | None = None  # built by the first `generate` call
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        return self.model.get_image_features(pixel_values, pixel_attention_mask)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                pixel_attention_mask: Tensor | None = None, image_hidden_states: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None,
                logits_to_keep: int | Tensor = 0) -> Idefics2Output:
        """Logits (B, T', V) in the model dtype; T' = T, or the last `logits_to_keep` positions
        (or the indices it holds when a tensor). With `labels` (B, T), the mean shifted
        cross-entropy over targets != -100 (docs/numerics.md §4.7): mask padding and prompt tokens yourself."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                         image_hidden_states=image_hidden_states, inputs_embeds=inputs_embeds,
                         past_key_values=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state
        assert hidden is not None
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        out.logits = self.lm_head(kept)  # (B, T', V)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels)
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """See `idefics2.generation.Generator.generate`; the first call builds this model's `generator`."""
        from idefics2.generation import Generator

        if self.generator is None:
            self.generator = Generator(self)
        return self.generator.generate(*args, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits[t] against labels[t + 1], ignoring -100, in float32."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])} "
                         "(one label per position whose logits are kept)")
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
