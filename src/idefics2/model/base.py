"""What transformers' `PreTrainedModel` gives both Idefics2 networks besides the computation.

Code written against transformers reaches for these on either class: `base_model_prefix` /
`base_model`, `main_input_name`, `can_generate`, `num_parameters`, the input/output embeddings
and `resize_token_embeddings`, `tie_weights`, activation checkpointing, and the weight
initialisation of a model built from a config (`post_init`). Values follow transformers 5.24's
Idefics2 classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from idefics2.config import Idefics2Config
from idefics2.model.connector import PerceiverResampler
from idefics2.model.fast_linear import Linear
from idefics2.model.layers import CheckpointedLayer, RMSNorm


class Idefics2PreTrainedModel(nn.Module):
    """The shared surface; a subclass builds its modules, then calls `post_init`."""

    config: Idefics2Config
    # In transformers, the attribute holding the headless model (absent on the headless model itself).
    base_model_prefix = "model"
    _keys_to_ignore_on_load_missing: list[str] | None = None  # transformers' loading hints: none here
    _keys_to_ignore_on_load_unexpected: list[str] | None = None
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Parameter -> the parameter it is tied to when config.tie_word_embeddings is set.
    _tied_weights_keys: ClassVar[dict[str, str] | None] = None

    @classmethod
    def can_generate(cls) -> bool:
        return False

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        raise NotImplementedError

    def get_output_embeddings(self) -> nn.Linear | None:
        """The LM head; None for a network without one, as in transformers."""
        return None

    def set_output_embeddings(self, head: nn.Linear) -> None:
        raise AttributeError(f"{type(self).__name__} has no LM head")

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        """Share the LM head's weight with the input embeddings when the config asks for it. The
        arguments are transformers' and change nothing here: there is one tie, always recomputed."""
        head = self.get_output_embeddings()
        if head is not None and self.config.tie_word_embeddings:
            head.weight = self.get_input_embeddings().weight

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied head is not counted again); `exclude_embeddings`
        leaves out every nn.Embedding's weight (tokens and vision positions), as transformers does."""
        embeddings = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for name, p in self.named_parameters()
                   if not (exclude_embeddings and name in embeddings) and (p.requires_grad or not only_trainable))

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Give the embeddings and the LM head, when there is one, `new_num_tokens` rows (rounded
        up to a multiple of `pad_to_multiple_of`), as transformers does: kept rows unchanged, new
        rows the mean of the old ones (`mean_resizing`, transformers' default, which samples around
        that mean with a covariance scaled by 1e-9) or N(0, initializer_range) otherwise; the
        config's vocab_size follows, and a tied head stays tied. Returns the input embeddings."""
        old = self.get_input_embeddings()
        rows = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(rows, int) or rows <= 0:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        std = self.config.text_config.initializer_range
        embeddings = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx,
                                  device=old.weight.device, dtype=old.weight.dtype)
        embeddings.weight.data = _resized_rows(old.weight.data, rows, mean_resizing, std)
        self.set_input_embeddings(embeddings)
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = Linear(head.in_features, rows, bias=False, device=head.weight.device, dtype=head.weight.dtype)
            new_head.weight.data = _resized_rows(head.weight.data, rows, mean_resizing, std)
            self.set_output_embeddings(new_head)
        self.config.text_config.vocab_size = rows
        self.tie_weights()
        return embeddings

    def post_init(self) -> None:
        """Initialise the modules this class built (`initial_weights`), tie the head, and switch
        activation checkpointing on when the config carries transformers' legacy
        `gradient_checkpointing: true` (consumed, so it is not saved again, as transformers does).
        On the meta device (`from_pretrained`, which assigns the checkpoint's tensors) nothing is drawn."""
        if not next(self.parameters()).is_meta:
            with torch.no_grad():
                for module, std in self.initial_weights():
                    init_weights(module, std)
        self.tie_weights()
        if self.config.extra.get("gradient_checkpointing"):
            del self.config.extra["gradient_checkpointing"]
            self.gradient_checkpointing_enable()

    def initial_weights(self) -> list[tuple[nn.Module, float]]:
        """The modules `post_init` initialises, each with its standard deviation."""
        raise NotImplementedError

    def checkpointed_layers(self) -> Iterator[CheckpointedLayer]:
        return (m for m in self.modules() if isinstance(m, CheckpointedLayer))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder and vision encoder layer in the backward pass instead of keeping
        its activations: less memory for one more forward pass per layer, identical gradients.

        `gradient_checkpointing_kwargs` go to `torch.utils.checkpoint.checkpoint`; default
        `{"use_reentrant": False}`, as in transformers. The reentrant form gives parameters inside
        a layer a gradient only when the layer's input requires one, so it also hooks the
        embeddings (`enable_input_require_grads`): frozen embeddings under LoRA would otherwise
        starve the adapters. Active only in training mode with gradients enabled.
        """
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        for layer in self.checkpointed_layers():
            layer.gradient_checkpointing, layer.checkpoint_kwargs = True, kwargs
        if kwargs.get("use_reentrant", True):
            self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        for layer in self.checkpointed_layers():
            layer.gradient_checkpointing, layer.checkpoint_kwargs = False, {}
        self.disable_input_require_grads()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self.checkpointed_layers())

    def enable_input_require_grads(self) -> None:
        """Make the token embeddings' and the vision embeddings' outputs require grad (the modules
        transformers hooks), so that gradients reach layers behind frozen embeddings."""
        self.disable_input_require_grads()

        def require_grad(module: nn.Module, inputs: Any, output: Tensor) -> None:
            output.requires_grad_(True)

        vision_embeddings = self.base_model.vision_model.embeddings  # type: ignore[union-attr]
        self._require_grads_hooks: list[RemovableHandle] = [
            m.register_forward_hook(require_grad) for m in (self.get_input_embeddings(), vision_embeddings)]

    def disable_input_require_grads(self) -> None:
        for hook in getattr(self, "_require_grads_hooks", []):
            hook.remove()
        self._require_grads_hooks = []


def init_weights(root: nn.Module, std: float) -> None:
    """transformers' `_init_weights` for the modules under `root`: Linear and Conv2d weights and
    embeddings N(0, std) (std 0 means 0.02, as there), the padding row of an embedding zero,
    biases zero, norm weights and the perceiver latents one."""
    std = std or 0.02
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.normal_(0.0, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, PerceiverResampler):
            module.latents.fill_(1.0)


def _resized_rows(weight: Tensor, rows: int, mean_resizing: bool, std: float) -> Tensor:
    """weight (V, D) -> (rows, D): the first min(V, rows) rows kept, new rows the mean of the old
    ones or drawn from N(0, std)."""
    kept = weight[:rows]
    extra = rows - kept.shape[0]
    if extra <= 0:
        return kept.clone()
    if mean_resizing:
        new = weight.float().mean(dim=0, keepdim=True).expand(extra, -1).to(weight.dtype)
    else:
        new = torch.randn(extra, weight.shape[1], device=weight.device, dtype=weight.dtype) * std
    return torch.cat([kept, new])
