"""The two networks: `Idefics2Model` (no head) and `Idefics2ForConditionalGeneration` (with the LM head).

Data flow, one public method per stage (what generation and training call):
  `get_image_features`: pixels (B, M, 3, H, W) -> vision tower -> connector -> features (R, L, D);
  `embed_inputs`: token ids (B, T) -> embeddings, the features written into the `<image>` positions;
  `run_decoder`: embeddings (B, T, D) + positions (+ a `KVCache`) -> Mistral decoder -> hidden states;
  `compute_logits`: hidden states -> LM head -> logits (B, T, V).
`forward` chains them and must match transformers' classes of the same names (docs/numerics.md §4).
The rest of transformers' `PreTrainedModel` surface (embeddings, activation checkpointing, weight
initialisation) comes from `model.base`.
Loading, saving and `generate` are added above this layer (`idefics2.modeling`): nothing here
reads files. Shape letters: B batch, M images per sample, R real images, L latents, T tokens,
D width, V vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idefics2.config import Idefics2Config
from idefics2.model.base import Idefics2PreTrainedModel
from idefics2.model.connector import Connector
from idefics2.model.fast_linear import Linear
from idefics2.model.kv_cache import KVCache
from idefics2.model.outputs import Idefics2CausalLMOutput, Idefics2ModelOutput
from idefics2.model.text import MistralDecoder
from idefics2.model.vision import VisionTransformer, check_pixel_inputs, patch_mask_from_pixels


class ImageFeatureCache(Protocol):
    """What `get_image_features` can reuse features from (generation's `VisionFeatureCache`).

    `keys` gives one key per image from the exact tensors the tower would see and the modules
    that compute the features, so a key changes with the pixels, the crop and the weights.
    """

    def keys(self, modules: Sequence[nn.Module], images: Sequence[tuple[Tensor, Tensor]]) -> list[bytes]: ...
    def get(self, key: bytes) -> Tensor | None: ...
    def put(self, key: bytes, features: Tensor) -> None: ...


class Idefics2Model(Idefics2PreTrainedModel):
    # In a checkpoint of the whole Idefics2ForConditionalGeneration these weights sit under "model."
    checkpoint_prefix = "model."

    def __init__(self, config: Idefics2Config) -> None:
        config.validate()  # before any weight is allocated; also checks values assigned since construction
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision_config)
        self.connector = Connector(config.vision_config, config.perceiver_config, config.text_config)
        self.text_model = MistralDecoder(config.text_config)
        self.post_init()

    def initial_weights(self) -> list[tuple[nn.Module, float]]:
        """Each part at its own config's initializer_range, the projection into the text width at
        the text one (what transformers 5.24 draws: its Idefics2Config has no range of its own)."""
        return [(self.vision_model, self.config.vision_config.initializer_range),
                (self.connector.modality_projection, head_init_range(self.config)),
                (self.connector.perceiver_resampler, self.config.perceiver_config.initializer_range),
                (self.text_model, self.config.text_config.initializer_range)]

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embed_tokens.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.text_model.embed_tokens = embeddings

    def real_images(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """pixel_values (B, M, 3, H, W), mask (B, M, H, W) 1 = real pixel -> the real images
        (R, 3, H, W) in the vision tower's dtype and their patch masks (R, H//p, W//p).

        Padding images (every value exactly 0 after the dtype cast) are dropped; the rest keep
        their (sample, image) row-major order (docs/numerics.md §4.3 steps 1-3).
        """
        check_pixel_inputs(pixel_values, pixel_attention_mask)
        B, M, C, H, W = pixel_values.shape
        vision_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        pixel_values = pixel_values.to(self.device, vision_dtype).reshape(B * M, C, H, W)
        is_real = (pixel_values != 0).flatten(1).any(dim=1)  # (B*M,)
        pixel_values = pixel_values[is_real]  # (R, 3, H, W)
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], H, W, dtype=torch.bool, device=pixel_values.device)
        else:
            pixel_mask = pixel_attention_mask.reshape(B * M, H, W)[is_real].to(pixel_values.device)
        return pixel_values, patch_mask_from_pixels(pixel_mask, self.config.vision_config.patch_size)

    def own_grids(self, pixels: Tensor, patch_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each real image (3, H, W) with its patch mask (H//p, W//p), cropped to its valid patches
        when they form a top-left rectangle (what the processor produces), so no canvas padding is
        computed and an image gives the same tensors in any batch. Others keep the full canvas and
        their mask. Equal to the padded computation (padded patches are never attended to), up to
        float summation order."""
        p = self.config.vision_config.patch_size
        rows = patch_mask[:, :, 0].sum(dim=1).tolist()
        cols = patch_mask[:, 0, :].sum(dim=1).tolist()
        grids = []
        for r, (nh, nw) in enumerate(zip(rows, cols, strict=True)):
            rect = torch.zeros_like(patch_mask[r])
            rect[:nh, :nw] = True
            if nh > 0 and nw > 0 and torch.equal(rect, patch_mask[r]):
                grids.append((pixels[r, :, : nh * p, : nw * p], rect[:nh, :nw]))
            else:
                grids.append((pixels[r], patch_mask[r]))
        return grids

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None,
                           cache: ImageFeatureCache | None = None) -> Tensor:
        """pixel_values (B, M, 3, H, W), mask (B, M, H, W) 1 = real pixel -> features (R, L, D)
        of the real images (see `real_images`), in (sample, image) order.

        Each image runs on its own grid (`own_grids`); images of the same shape go through the
        tower together; with a `cache`, images seen before are not recomputed. Images smaller than
        one patch are a ValueError: the tower has nothing to look at.
        """
        patch = self.config.vision_config.patch_size
        if pixel_values.dim() == 5 and min(pixel_values.shape[-2:]) < patch:  # the rank: `real_images`
            raise ValueError(f"pixel_values must have a height and width of at least the patch size {patch}, "
                             f"got {tuple(pixel_values.shape)}")
        pixels, patch_mask = self.real_images(pixel_values, pixel_attention_mask)  # (R, 3, H, W), (R, Gh, Gw)
        grids = self.own_grids(pixels, patch_mask)
        if not grids:
            L, D = self.config.perceiver_config.resampler_n_latents, self.config.text_config.hidden_size
            return pixels.new_zeros(0, L, D)
        keys = cache.keys([self.vision_model, self.connector], grids) if cache is not None else []
        features: list[Tensor | None] = [cache.get(k) for k in keys] if cache is not None else [None] * len(grids)
        groups: dict[tuple[int, ...], list[int]] = {}
        for r, (image, mask) in enumerate(grids):
            if features[r] is None:
                groups.setdefault((*image.shape, *mask.shape), []).append(r)
        for members in groups.values():
            images = torch.stack([grids[r][0] for r in members])  # (n, 3, h, w)
            masks = torch.stack([grids[r][1] for r in members])  # (n, gh, gw)
            patch_features = self.vision_model(images, masks)  # (n, P, D_v)
            # The tower may keep float32 beside a bfloat16 rest (`modeling.keep_vision_float32`).
            out = self.connector(patch_features.to(self.dtype), masks.flatten(1))  # (n, L, D)
            for r, f in zip(members, out, strict=True):
                features[r] = f
                if cache is not None:
                    cache.put(keys[r], f.detach().clone())  # own storage, so eviction frees it
        return torch.stack(features)  # type: ignore[arg-type]  # (R, L, D)

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

    def embed_inputs(self, input_ids: Tensor, image_features: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> embeddings (B, T, D), with `image_features` (R, L, D) in the
        `<image>` positions when given."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_features is None:
            return inputs_embeds
        return self.merge_image_features(inputs_embeds, image_features, input_ids)

    def run_decoder(self, inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                    cache: KVCache | None = None, hidden_states: list[Tensor] | None = None) -> Tensor:
        """inputs_embeds (B, T, D) at RoPE `position_ids` (B, T) -> hidden states (B, T, D).
        attention_mask (B, S) covers the cached tokens and the new ones (None: all real); the new
        keys and values are appended to `cache`; `hidden_states`, a list, receives every layer's."""
        return self.text_model(inputs_embeds, position_ids, attention_mask, cache, hidden_states)

    def new_kv_cache(self, max_length: int) -> KVCache:
        """An empty cache for sequences of up to `max_length` tokens, with the RoPE table made
        ready for them (a compiled decode step cannot grow it)."""
        self.text_model.reserve_rotary(max_length, self.device)
        return KVCache(self.config.text_config.num_hidden_layers, max_length)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                pixel_attention_mask: Tensor | None = None, image_hidden_states: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None,
                return_dict: bool | None = None) -> Idefics2ModelOutput | tuple[Tensor | KVCache, ...]:
        """The stages chained, with transformers' options: `output_hidden_states` (default: the
        config's), `return_dict=False` for the tuple form. `output_attentions=True` gives no attention
        probabilities (`attentions` stays None, with a warning), as transformers does with its default
        SDPA attention: the fused kernels never form them."""
        if output_attentions:
            warnings.warn("output_attentions=True: attention runs in fused SDPA kernels that never form the "
                          "attention probabilities, so `attentions` is None (as in transformers with SDPA)",
                          stacklevel=2)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds "
                             f"(got {'both' if input_ids is not None else 'neither'})")
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("pass either pixel_values or precomputed image_hidden_states, not both")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values, pixel_attention_mask)
        if input_ids is not None:
            inputs_embeds = self.embed_inputs(input_ids, image_hidden_states)
        elif image_hidden_states is not None:
            inputs_embeds = self.merge_image_features(inputs_embeds, image_hidden_states, None)
        assert inputs_embeds is not None
        B, T, _ = inputs_embeds.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and self.training and self.is_gradient_checkpointing:
            warnings.warn("use_cache=True is incompatible with gradient checkpointing: using use_cache=False",
                          stacklevel=2)
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.text_config.num_hidden_layers, T)
        cache = past_key_values if use_cache else None
        if position_ids is None:
            # Not mask-aware, like the reference's forward; generate() passes mask-aware ones
            # (docs/numerics.md §4.8).
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        layers = [] if _option(self.config, "output_hidden_states", output_hidden_states) else None
        hidden = self.run_decoder(inputs_embeds, position_ids, attention_mask, cache, layers)
        out = Idefics2ModelOutput(last_hidden_state=hidden, past_key_values=cache,
                                  hidden_states=tuple(layers) if layers is not None else None,
                                  image_hidden_states=image_hidden_states)
        return out if _option(self.config, "return_dict", return_dict, default=True) else out.to_tuple()


def head_init_range(config: Idefics2Config) -> float:
    """The standard deviation of the modules outside the three parts (the modality projection,
    the LM head): a top-level initializer_range when the config carries one, else the text's."""
    return getattr(config, "initializer_range", None) or config.text_config.initializer_range


def _option(config: Idefics2Config, name: str, value: bool | None, default: bool = False) -> bool:
    """A forward option: as passed, else the config's key of that name (Hub configs carry
    `return_dict`, `output_hidden_states`), else `default`."""
    return bool(value if value is not None else config.extra.get(name, default))


class Idefics2ForConditionalGeneration(Idefics2PreTrainedModel):
    # The class of `self.model`; the public classes (`idefics2.modeling`) set their own.
    base_model_class: type[Idefics2Model] = Idefics2Model
    _tied_weights_keys: ClassVar[dict[str, str] | None] = {"lm_head.weight": "model.text_model.embed_tokens.weight"}

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.model = self.base_model_class(config)
        self.lm_head = Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def initial_weights(self) -> list[tuple[nn.Module, float]]:
        """The head only: `self.model` initialised itself; a tied head is the embeddings."""
        return [] if self.config.tie_word_embeddings else [(self.lm_head, head_init_range(self.config))]

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.model.set_input_embeddings(embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, head: nn.Linear) -> None:
        self.lm_head = head

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_image_features(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None,
                           cache: ImageFeatureCache | None = None) -> Tensor:
        return self.model.get_image_features(pixel_values, pixel_attention_mask, cache)

    def embed_inputs(self, input_ids: Tensor, image_features: Tensor | None = None) -> Tensor:
        return self.model.embed_inputs(input_ids, image_features)

    def run_decoder(self, inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                    cache: KVCache | None = None, hidden_states: list[Tensor] | None = None) -> Tensor:
        return self.model.run_decoder(inputs_embeds, position_ids, attention_mask, cache, hidden_states)

    def new_kv_cache(self, max_length: int) -> KVCache:
        return self.model.new_kv_cache(max_length)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """Hidden states (..., D) -> logits (..., V) in the model dtype."""
        return self.lm_head(hidden_states)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                pixel_attention_mask: Tensor | None = None, image_hidden_states: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None,
                logits_to_keep: int | Tensor = 0, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None,
                return_dict: bool | None = None) -> Idefics2CausalLMOutput | tuple[Tensor | KVCache, ...]:
        """Logits (B, T', V) in the model dtype; T' = T, or the last `logits_to_keep` positions
        (or the indices it holds when a tensor). With `labels` (B, T), the mean shifted
        cross-entropy over targets != -100 (docs/numerics.md §4.7): mask padding and prompt tokens
        yourself. Other options as `Idefics2Model.forward` takes them."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                         image_hidden_states=image_hidden_states, inputs_embeds=inputs_embeds,
                         past_key_values=past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                         return_dict=True)
        hidden = out.last_hidden_state
        assert hidden is not None
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.compute_logits(kept)  # (B, T', V)
        result = Idefics2CausalLMOutput(
            loss=causal_lm_loss(logits, labels) if labels is not None else None, logits=logits,
            past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            image_hidden_states=out.image_hidden_states)
        return result if _option(self.config, "return_dict", return_dict, default=True) else result.to_tuple()


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits[t] against labels[t + 1], ignoring -100, in float32."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])} "
                         "(one label per position whose logits are kept)")
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
