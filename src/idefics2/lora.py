"""LoRA adapters (low-rank updates W + (alpha / r) B A) for fine-tuning, saved in PEFT's file layout.

We do not use the `peft` library: it imports transformers, which this package never does. The
files are PEFT's, though (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), so an adapter trained here loads with
`PeftModel.from_pretrained` on transformers' Idefics2, and one trained there loads here
(tests/finetune/test_finetune.py checks both against PEFT).

While adapters are attached, each targeted `Linear` is wrapped in a `LoRALinear`, which renames
its weight to `<module>.base_layer.weight` as PEFT does. `merge_lora` folds the updates into the
weights and restores the plain modules, so the model saves as an ordinary checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

try:  # the parser of `re`, for `check_regex` (its module names changed in Python 3.11)
    from re import _constants as re_constants
    from re import _parser as re_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as re_constants  # type: ignore[no-redef]
    import sre_parse as re_parser  # type: ignore[no-redef]

from idefics2.files import write_folder_atomically

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The projections of the decoder, the modality projection and the perceiver; the vision tower stays
# frozen and unadapted. This is the target set of the Idefics2 fine-tuning tutorial of the model's authors.
DEFAULT_TARGET_MODULES = (r".*(text_model|modality_projection|perceiver_resampler)"
                          r".*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$")


@dataclass
class LoRAConfig:
    """The subset of PEFT's `LoraConfig` we implement; `to_peft_dict` writes the rest as PEFT's defaults.

    `target_modules` follows PEFT: a string is a regular expression the whole module name must match,
    a list names modules by their last name components ("q_proj" matches every "...q_proj").
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = field(default=DEFAULT_TARGET_MODULES)
    exclude_modules: str | list[str] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if value is None and key == "exclude_modules":
                continue
            if isinstance(value, str):
                check_regex(value, key)
            elif not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{key} must be a regular expression or a list of module names, got {value!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def targets(self, name: str) -> bool:
        return _matches(self.target_modules, name) and not (
            self.exclude_modules is not None and _matches(self.exclude_modules, name))

    def to_peft_dict(self) -> dict[str, object]:
        return {**asdict(self), "peft_type": "LORA", "task_type": None, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}

    @classmethod
    def from_peft_dict(cls, data: dict[str, object]) -> LoRAConfig:
        """Read an adapter_config.json; options that change the update's form are refused, not ignored."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"not a LoRA adapter (peft_type={data.get('peft_type')!r})")
        missing = [key for key in ("r", "lora_alpha", "target_modules") if data.get(key) is None]
        if missing:
            raise ValueError(f"the adapter config lacks {missing}")
        unsupported = {key: data.get(key) for key, off in (("use_dora", False), ("use_rslora", False),
                                                          ("fan_in_fan_out", False), ("bias", "none"))
                       if data.get(key, off) != off}
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
            if data.get(key):
                unsupported[key] = data[key]
        if data.get("layers_to_transform") is not None:
            unsupported["layers_to_transform"] = data["layers_to_transform"]
        if unsupported:
            raise ValueError(f"adapter options not supported here: {unsupported}")
        return cls(r=data["r"], lora_alpha=data["lora_alpha"],  # type: ignore[arg-type]
                   lora_dropout=data.get("lora_dropout") or 0.0,  # type: ignore[arg-type]
                   target_modules=data["target_modules"],  # type: ignore[arg-type]
                   exclude_modules=data.get("exclude_modules"),  # type: ignore[arg-type]
                   base_model_name_or_path=data.get("base_model_name_or_path"))  # type: ignore[arg-type]


def check_regex(pattern: str, key: str) -> None:
    """A valid regular expression without nested repetition: a repeat inside a repeat (`(a+)+`,
    `(a|aa)*`) can backtrack for longer than the universe on a module name that does not match, and
    Python's `re` has no timeout."""
    try:
        tree = re_parser.parse(pattern)
    except re.error as e:
        raise ValueError(f"{key} is not a valid regular expression: {e}") from None

    def walk(items: Any, in_repeat: bool) -> None:
        for op, arg in items:
            if op in (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT):
                low, high, sub = arg
                repeats = high is re_constants.MAXREPEAT or high > 1
                if repeats and in_repeat:
                    raise ValueError(f"{key} {pattern!r} nests a repetition inside another, which can take "
                                     "exponential time to match; write it without the nesting")
                walk(sub, in_repeat or repeats)
            elif op is re_constants.BRANCH:
                if in_repeat:  # alternatives that overlap under a repeat backtrack the same way
                    raise ValueError(f"{key} {pattern!r} repeats a group of alternatives, which can take "
                                     "exponential time to match; write it without the repetition")
                for branch in arg[1]:
                    walk(branch, in_repeat)
            elif op is re_constants.SUBPATTERN:
                walk(arg[-1], in_repeat)

    walk(tree, False)


def _matches(pattern: str | list[str], name: str) -> bool:
    """PEFT's rule: a string must match the whole name; a list names modules by their last components."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))); only lora_A and lora_B train.

    lora_A starts as nn.Linear does (Kaiming-uniform) and lora_B at zero, as in PEFT, so an attached
    adapter leaves the model's outputs unchanged until it is trained. The adapter is float32 whatever
    the base's dtype (AdamW steps on bfloat16 weights would lose small updates).
    """

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        kwargs = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_B(self.lora_A(self.dropout(x).to(torch.float32))) * self.scaling
        return self.base_layer(x) + update.to(x.dtype)

    def merged(self) -> nn.Linear:
        """The base layer with B A * scaling added to its weight (computed in float32)."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
            self.base_layer.weight.add_(delta.to(self.base_layer.weight.dtype))
        return self.base_layer


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in a trainable `LoRALinear`.

    Returns the wrapped module names; raises ValueError when nothing matches (a typo in the targets
    would otherwise train nothing) or when adapters are already attached.
    """
    names = list(_targets(model, config))
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        wrapped = LoRALinear(base, config.r, config.scaling, config.lora_dropout)  # type: ignore[arg-type]
        wrapped.train(base.training)  # a new module trains by default: keep the model's mode (dropout)
        _set_module(model, name, wrapped)
    return names


def _targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Linear]:
    """The modules `config` adapts, by name; ValueError when none (a typo would train nothing) or when
    adapters are attached already."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first to stack another")
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and config.targets(name)}
    if not found:
        raise ValueError(f"no nn.Linear module matches target_modules={config.target_modules!r}")
    return found


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is then an ordinary Idefics2 again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under PEFT's saved names: base_model.model.<module>.lora_{A,B}.weight."""
    return {PEFT_PREFIX + name: tensor.detach().contiguous().cpu()
            for name, tensor in model.state_dict().items() if is_lora_key(name)}


def save_adapter(model: nn.Module, config: LoRAConfig, folder: str | os.PathLike[str]) -> None:
    """adapter_config.json + adapter_model.safetensors, written to a temporary folder and then swapped in."""
    state = lora_state_dict(model)
    if not state:
        raise ValueError("the model has no LoRA adapters to save")
    owns = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE).__contains__
    with write_folder_atomically(Path(folder), owns=owns) as tmp:
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config.to_peft_dict(), indent=2) + "\n", encoding="utf-8")
        save_file(state, tmp / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})


def load_adapter(model: nn.Module, folder: str | os.PathLike[str]) -> LoRAConfig:
    """Attach the adapter saved in `folder` (ours or PEFT's) to `model`; returns its config.

    Every tensor in the file must land on a wrapped module with the right shape, and every wrapped
    module must get its two tensors, so an adapter made for another model fails here, loudly.
    """
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: an adapter folder holds {ADAPTER_CONFIG_FILE} and "
                                    f"{ADAPTER_WEIGHTS_FILE}")
    try:
        config = LoRAConfig.from_peft_dict(json.loads(config_path.read_text(encoding="utf-8")))
        tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(weights_path).items()}
    except (json.JSONDecodeError, SafetensorError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read the adapter in {folder}: {err}") from None
    # Checked before anything is wrapped, so a refused adapter leaves the model as it was.
    expected = {}
    for name, module in _targets(model, config).items():
        expected[f"{name}.lora_A.weight"] = (config.r, module.in_features)
        expected[f"{name}.lora_B.weight"] = (module.out_features, config.r)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        examples = ", ".join(missing[:2] + unexpected[:2] + wrong[:2])
        raise ValueError(f"{weights_path} does not fit this model: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected and {len(wrong)} mis-shaped adapter tensors (e.g. {examples})")
    add_lora(model, config)
    model.load_state_dict(tensors, strict=False)
    return config
