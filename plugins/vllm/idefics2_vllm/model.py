"""Idefics2ForConditionalGeneration on vLLM's layers.

The vision tower is vLLM's `Idefics2VisionTransformer`, given our NaViT position ids (vLLM's own
rule picks other buckets for some side lengths); the connector (SwiGLU modality projection and
perceiver resampler) is written here on vLLM's linear and norm layers, replicated on every
tensor-parallel rank (it is small); the decoder is vLLM's `LlamaModel` (Mistral) with paged
attention. Parameter names are the Hub checkpoint's, so its safetensors load unchanged.
Shape letters: R crops, P patches, L latents, D text width, H/H_kv heads, hd head dim.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.idefics2.configuration_idefics2 import Idefics2Config, Idefics2PerceiverConfig
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.idefics2_vision_model import Idefics2VisionTransformer
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from idefics2.model.vision import bucket_position_ids, patch_mask_from_pixels
from idefics2.processing.processor import IMAGE_TOKEN
from idefics2_vllm.processing import (
    Idefics2DummyInputsBuilder,
    Idefics2MultiModalProcessor,
    Idefics2ProcessingInfo,
)


class GatedMLP(nn.Module):
    """SwiGLU down(act(gate(x)) * up(x)), the checkpoint's three separate bias-free projections."""

    def __init__(self, in_size: int, hidden: int, out_size: int, act: str, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.gate_proj = ReplicatedLinear(in_size, hidden, bias=False, quant_config=quant_config,
                                          prefix=f"{prefix}.gate_proj")
        self.up_proj = ReplicatedLinear(in_size, hidden, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.up_proj")
        self.down_proj = ReplicatedLinear(hidden, out_size, bias=False, quant_config=quant_config,
                                          prefix=f"{prefix}.down_proj")
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, _ = self.gate_proj(x)
        up, _ = self.up_proj(x)
        out, _ = self.down_proj(self.act(gate) * up)
        return out


class PerceiverAttention(nn.Module):
    """Latents attend over [context; latents], with grouped key/value heads."""

    def __init__(self, config: Idefics2PerceiverConfig, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.resampler_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.resampler_n_heads, config.num_key_value_heads, hd
        self.q_proj = ReplicatedLinear(d, self.num_heads * hd, bias=False, quant_config=quant_config,
                                       prefix=f"{prefix}.q_proj")
        self.k_proj = ReplicatedLinear(d, self.num_kv_heads * hd, bias=False, quant_config=quant_config,
                                       prefix=f"{prefix}.k_proj")
        self.v_proj = ReplicatedLinear(d, self.num_kv_heads * hd, bias=False, quant_config=quant_config,
                                       prefix=f"{prefix}.v_proj")
        self.o_proj = ReplicatedLinear(self.num_heads * hd, d, bias=False, quant_config=quant_config,
                                       prefix=f"{prefix}.o_proj")

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        R, L, _ = latents.shape
        kv_in = torch.cat([context, latents], dim=1)  # (R, P+L, D)
        q, _ = self.q_proj(latents)
        k, _ = self.k_proj(kv_in)
        v, _ = self.v_proj(kv_in)
        q = q.view(R, L, self.num_heads, self.head_dim).transpose(1, 2)  # (R, H, L, hd)
        k = k.view(R, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (R, H_kv, P+L, hd)
        v = v.view(R, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5,
                                             enable_gqa=self.num_heads != self.num_kv_heads)  # (R, H, L, hd)
        out, _ = self.o_proj(out.transpose(1, 2).reshape(R, L, -1))
        return out


class PerceiverLayer(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(d, eps=eps)
        self.input_context_norm = RMSNorm(d, eps=eps)
        self.self_attn = PerceiverAttention(config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(d, eps=eps)
        # The 4x width is fixed by the architecture, not read from the config.
        self.mlp = GatedMLP(d, 4 * d, d, config.hidden_act, quant_config, f"{prefix}.mlp")

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context))
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(config.resampler_n_latents, config.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(config, quant_config, f"{prefix}.layers.{i}")
                                    for i in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context (R, P, D), every patch real -> (R, L, D)."""
        latents = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)  # (R, L, D)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.norm(latents)


class Connector(nn.Module):
    def __init__(self, config: Idefics2Config, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        text = config.text_config
        # Intermediate width and activation are the text config's, as the architecture defines them.
        self.modality_projection = GatedMLP(config.vision_config.hidden_size, text.intermediate_size,
                                            text.hidden_size, text.hidden_act, quant_config,
                                            f"{prefix}.modality_projection")
        self.perceiver_resampler = PerceiverResampler(config.perceiver_config, quant_config,
                                                      f"{prefix}.perceiver_resampler")

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(patch_features))


class Idefics2Model(nn.Module):
    """The checkpoint's `model.` part: vision tower, connector, decoder."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.vision_model = Idefics2VisionTransformer(config.vision_config, quant_config=quant_config,
                                                      prefix=maybe_prefix(prefix, "vision_model"))
        self.connector = Connector(config, quant_config, maybe_prefix(prefix, "connector"))
        self.text_model = LlamaModel(vllm_config=vllm_config.with_hf_config(config.text_config),
                                     prefix=maybe_prefix(prefix, "text_model"))

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """One image's crops (C, 3, h, w) and pixel masks (C, h, w) -> features (C*L, D).

        Each crop is cut to its valid patches (a top-left rectangle, as the processor pads), so
        no padding enters the tower or the resampler; crops of one shape run together.
        """
        vision = self.config.vision_config
        p, N = vision.patch_size, vision.image_size // vision.patch_size
        weight = self.vision_model.embeddings.patch_embedding.weight
        patch_mask = patch_mask_from_pixels(pixel_mask.to(weight.device), p)  # (C, h//p, w//p)
        rows = patch_mask[:, :, 0].sum(dim=1).tolist()
        cols = patch_mask[:, 0, :].sum(dim=1).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for c, (nh, nw) in enumerate(zip(rows, cols, strict=True)):
            if nh == 0 or nw == 0 or int(patch_mask[c].sum()) != nh * nw:
                raise ValueError(f"crop {c} of an image has a patch mask that is not a non-empty top-left rectangle "
                                 f"({nh} rows, {nw} columns); the Idefics2 processor always gives one")
            groups.setdefault((nh, nw), []).append(c)
        features: list[torch.Tensor | None] = [None] * len(rows)
        for (nh, nw), members in groups.items():
            crops = pixel_values[members, :, :nh * p, :nw * p].to(weight.device, weight.dtype)  # (n, 3, nh*p, nw*p)
            full = torch.ones(len(members), nh, nw, dtype=torch.bool, device=weight.device)
            position_ids = bucket_position_ids(full, N)  # (n, nh*nw)
            patch_features = self.vision_model(crops, position_ids=position_ids)  # (n, P, D_v)
            for c, f in zip(members, self.connector(patch_features), strict=True):
                features[c] = f
        return torch.cat(features)  # type: ignore[arg-type]


@MULTIMODAL_REGISTRY.register_processor(Idefics2MultiModalProcessor, info=Idefics2ProcessingInfo,
                                        dummy_inputs=Idefics2DummyInputsBuilder)
class Idefics2ForConditionalGeneration(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError("Idefics2 takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_composite_model(vllm_config, language_targets=LlamaModel,
                                        tower_targets={"image": (Idefics2VisionTransformer, Connector)}):
            self.model = Idefics2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        text = config.text_config
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.text_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)

    @property
    def tied(self) -> bool:
        """Hub configs say it at the top level, transformers' sub-config in text_config."""
        return bool(self.config.tie_word_embeddings or self.config.text_config.tie_word_embeddings)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Features of each image of the batch, (C*L, D) each, in the order vLLM gives them."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        masks = kwargs["pixel_attention_mask"]
        return [self.model.image_features(crops, mask) for crops, mask in zip(pixel_values, masks, strict=True)]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        return self.model.text_model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."] if self.tied else None)
        return loader.load_weights(weights)
