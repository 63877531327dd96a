"""The public model classes: the networks of `idefics2.model` with loading, saving and `generate`.

`model/` holds the computation only; these subclasses add what a user of transformers' classes
of the same names reaches for: `from_pretrained` / `save_pretrained` (through `checkpoint`, which
owns the files) and, on the LM, `generate` with the checkpoint's generation defaults (through
`generation`). Parameter names, `forward` and the stage methods are the networks' own.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

from idefics2 import checkpoint, lora
from idefics2.config import Idefics2Config
from idefics2.generation import GenerationConfig, Generator, load_generation_config
from idefics2.model import idefics2 as networks
from idefics2.model.quant import Int4Linear, Int8Linear

M = TypeVar("M", bound="PretrainedMixin")


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for a network class."""

    @classmethod
    def from_pretrained(cls: type[M], folder_or_repo_id: str | os.PathLike[str] | None = None, *,
                        config: Idefics2Config | None = None, state_dict: dict[str, Any] | None = None,
                        output_loading_info: bool = False, dtype: Any = None, device: Any = None,
                        torch_dtype: Any = None, quantization: str | None = None, group_size: int = 128,
                        **kwargs: Any) -> M | tuple[M, dict[str, list[str]]]:
        """From a checkpoint folder (its config.json, or `config`), or with `folder_or_repo_id=None`
        from `config` and `state_dict`, as transformers takes them. Weights that do not fit raise a
        ValueError; with `output_loading_info=True` the caller gets transformers' lenient load instead:
        missing weights initialised as in a new model, and they and unexpected keys listed next to the
        model (mis-shaped weights still raise). `quantization` "int8" / "int4" (with `group_size`)
        quantizes the decoder's and the connector's linear layers while loading (`model.quant`)."""
        dtype = dtype if dtype is not None else torch_dtype
        report: dict[str, list[str]] | None = (
            {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
            if output_loading_info else None)
        if folder_or_repo_id is None:
            if config is None or state_dict is None:
                raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=")
            model = checkpoint.load_state_dict(cls, config, state_dict, dtype=dtype, device=device, report=report)
        else:
            if state_dict is not None:
                raise ValueError("pass either a checkpoint folder or state_dict=, not both")
            folder = checkpoint.resolve_folder(folder_or_repo_id)
            model = checkpoint.load_pretrained(cls, folder, dtype=dtype, device=device, config=config,
                                               report=report, quantization=None if quantization is None
                                               else (quantization, group_size), **kwargs)
            keep_vision_float32(model)
            if isinstance(model, Idefics2ForConditionalGeneration):
                model.generation_config = load_generation_config(folder) or model.generation_config
        if report is not None:
            return model, report
        return model

    def save_pretrained(self, folder: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> None:
        checkpoint.save_pretrained(self, folder, max_shard_size=max_shard_size)  # type: ignore[arg-type]


def keep_vision_float32(model: Any) -> None:
    """On a CPU without bfloat16 kernels (oneDNN's need AVX-512), a half-precision vision tower
    beside quantized layers computes in float32 instead: there a bfloat16 matrix product runs 3-15x
    slower than a float32 one (4096 x 4096, 1 to 84 rows, AVX2), while the quantized kernels want
    bfloat16 activations. The tower's features are cast to the model dtype before the connector."""
    tower = getattr(model, "model", model).vision_model
    weight = tower.embeddings.patch_embedding.weight
    if (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        tower.float()


class Idefics2Model(PretrainedMixin, networks.Idefics2Model):
    """The vision tower, connector and decoder, without the LM head."""


class Idefics2ForConditionalGeneration(PretrainedMixin, networks.Idefics2ForConditionalGeneration):
    """Idefics2 with its LM head: `forward` gives logits (and a loss), `generate` gives tokens."""

    base_model_class = Idefics2Model

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__(config)
        # Decoding defaults: the checkpoint's generation_config.json when from_pretrained finds one,
        # else the config's special tokens, as transformers' `GenerationConfig.from_model_config`.
        # `generate` fills what is unset from its built-in defaults; save_pretrained writes it.
        self.generation_config: GenerationConfig | None = generation_config_from_model_config(config)
        self.generator: Generator | None = None  # built by the first `generate` call

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """See `idefics2.generation.Generator.generate`; the first call builds this model's `generator`."""
        if self.generator is None:
            self.generator = Generator(self)
        return self.generator.generate(*args, **kwargs)

    def load_adapter(self, folder: str | os.PathLike[str]) -> lora.LoRAConfig:
        """Attach the LoRA adapter in `folder` (adapter_config.json + adapter_model.safetensors, saved by
        PEFT or by `idefics2 finetune`) unmerged, as transformers' method of the name does: the adapter
        trainable, every other weight frozen, the model's train/eval mode kept. Returns its config."""
        return lora.load_adapter(self, folder)

    def merge_adapter(self) -> None:
        """Fold the attached adapters into the weights (DoRA's magnitudes and lora_bias included) and
        restore plain linear layers, so the model saves, quantizes and generates as an ordinary one."""
        lora.merge_lora(self)


def generation_config_from_model_config(config: Idefics2Config) -> GenerationConfig:
    """The BOS, EOS and pad ids of the config (top-level keys first, then the text config's), marked
    `_from_model_config` in the saved file as transformers 5.24 marks the one it derives this way."""
    ids = {name: getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {name: getattr(config.text_config, name) if value is None else value for name, value in ids.items()}
    return GenerationConfig(**ids, extra={"_from_model_config": True})
