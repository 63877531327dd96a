"""LoRA adapters (low-rank updates W + (alpha / r) B A) for fine-tuning, saved in PEFT's file layout.

We do not use the `peft` library: it imports transformers, which this package never does. The
files are PEFT's, though (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), so an adapter trained here loads with
`PeftModel.from_pretrained` on transformers' Idefics2, and one trained there loads here
(tests/finetune/test_finetune.py and test_lora_variants.py check both against PEFT).

While adapters are attached, each targeted `Linear` is wrapped in a `LoRALinear`, which renames
its weight to `<module>.base_layer.weight` as PEFT does. `merge_lora` folds the updates into the
weights and restores the plain modules, so the model saves as an ordinary checkpoint.

PEFT's variants of the update that change its form are implemented with PEFT's semantics: DoRA
(`use_dora`: a trained per-row magnitude over the normalised W + s B A), rsLoRA (`use_rslora`:
s = alpha / sqrt(r)), per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) and a bias on B
(`lora_bias`). The base may be a frozen quantized layer (`model.quant`, QLoRA); an adapter trained on
one merges into the float checkpoint it was quantized from.
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
from torch.nn import functional as F

try:  # the parser of `re`, for `check_regex` (its module names changed in Python 3.11)
    from re import _constants as re_constants
    from re import _parser as re_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as re_constants  # type: ignore[no-redef]
    import sre_parse as re_parser  # type: ignore[no-redef]

from idefics2.files import write_folder_atomically
from idefics2.model.quant import Int4Linear, Int8Linear

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The projections of the decoder, the modality projection and the perceiver; the vision tower stays
# frozen and unadapted. This is the target set of the Idefics2 fine-tuning tutorial of the model's authors.
DEFAULT_TARGET_MODULES = (r".*(text_model|modality_projection|perceiver_resampler)"
                          r".*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$")
ADAPTABLE = (nn.Linear, Int8Linear, Int4Linear)
# adapter_config.json options we do not implement, with the value that leaves them off. A file that
# sets one is refused by name rather than loaded as a different adapter.
OFF_OPTIONS: dict[str, tuple[object, ...]] = {
    "fan_in_fan_out": (False,), "bias": ("none",), "modules_to_save": (None, []),
    "layers_to_transform": (None,), "layers_pattern": (None, [], ""), "layer_replication": (None,),
    "trainable_token_indices": (None,), "target_parameters": (None, []), "megatron_config": (None,),
    "use_qalora": (False,), "use_bdlora": (None,), "arrow_config": (None,), "kasa_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,),
    "alora_invocation_tokens": (None,),
    # initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or add a variant
    # (MiCA): their adapters are meant for another base than the checkpoint's
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal"),
}


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
    use_dora: bool = False
    use_rslora: bool = False
    lora_bias: bool = False
    # module-name regular expression -> rank / alpha; the first key matching the end of a name wins
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not _is_rank(self.r):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not _is_finite_number(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        for key in ("use_dora", "use_rslora", "lora_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias is not supported with DoRA (PEFT refuses the pair too)")
        for key, valid, expected in (("rank_pattern", _is_rank, "positive integers"),
                                     ("alpha_pattern", _is_finite_number, "finite numbers")):
            pattern = getattr(self, key)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) and valid(v)
                                                        for k, v in pattern.items()):
                raise ValueError(f"{key} must map module-name patterns to {expected}, got {pattern!r}")
            for k in pattern:
                check_regex(k, f"{key} key")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if value is None and key == "exclude_modules":
                continue
            if isinstance(value, str):
                check_regex(value, key)
            elif not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{key} must be a regular expression or a list of module names, got {value!r}")

    def rank_of(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def scaling_of(self, name: str) -> float:
        """alpha / r of the module `name`, or alpha / sqrt(r) with rsLoRA (which keeps the update's scale
        from shrinking as the rank grows)."""
        alpha, r = _pattern_value(self.alpha_pattern, name, self.lora_alpha), self.rank_of(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, name: str) -> bool:
        return _matches(self.target_modules, name) and not (
            self.exclude_modules is not None and _matches(self.exclude_modules, name))

    def to_peft_dict(self) -> dict[str, object]:
        return {**asdict(self), "peft_type": "LORA", "task_type": None, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
                "layers_pattern": None}

    @classmethod
    def from_peft_dict(cls, data: dict[str, object]) -> LoRAConfig:
        """Read an adapter_config.json; options that change the update's form are refused, not ignored."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"not a LoRA adapter (peft_type={data.get('peft_type')!r})")
        missing = [key for key in ("r", "lora_alpha", "target_modules") if data.get(key) is None]
        if missing:
            raise ValueError(f"the adapter config lacks {missing}")
        unsupported = {key: data[key] for key, off in OFF_OPTIONS.items()
                       if key in data and not any(data[key] == v and type(data[key]) is type(v) for v in off)}
        if unsupported:
            raise ValueError(f"adapter options not supported here: {unsupported}")
        return cls(r=data["r"], lora_alpha=data["lora_alpha"],  # type: ignore[arg-type]
                   lora_dropout=data.get("lora_dropout") or 0.0,  # type: ignore[arg-type]
                   target_modules=data["target_modules"],  # type: ignore[arg-type]
                   exclude_modules=data.get("exclude_modules"),  # type: ignore[arg-type]
                   use_dora=data.get("use_dora", False),  # type: ignore[arg-type]
                   use_rslora=data.get("use_rslora", False),  # type: ignore[arg-type]
                   lora_bias=data.get("lora_bias", False),  # type: ignore[arg-type]
                   rank_pattern=data.get("rank_pattern") or {},  # type: ignore[arg-type]
                   alpha_pattern=data.get("alpha_pattern") or {},  # type: ignore[arg-type]
                   base_model_name_or_path=data.get("base_model_name_or_path"))  # type: ignore[arg-type]


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: the value of the first key, a regular expression,
    that matches the whole name or its end after a dot ("q_proj" matches every "...q_proj")."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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
    return ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector")


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))); only the adapter's tensors train.

    lora_A starts as nn.Linear does (Kaiming-uniform) and lora_B (and its bias, with `lora_bias`) at
    zero, as in PEFT, so an attached adapter leaves the model's outputs unchanged until it is trained.
    The adapter is float32 whatever the base's dtype (AdamW steps on bfloat16 weights would lose small
    updates). The base is an nn.Linear or a frozen quantized layer.

    With DoRA the layer computes m * (W + s B A) x / ||W + s B A|| + b, the norm per output row and
    held constant in the backward pass (the DoRA paper's section 4.3, and PEFT); `lora_magnitude_vector`
    m starts at ||W||. Computed as PEFT does: base(x) + (m / norm - 1) W x' + (m / norm) s B A x', where
    x' is the dropped-out input in training (x otherwise) and base(x) always sees the whole input.
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float, *,
                 use_dora: bool = False, lora_bias: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        device = next(iter(base_layer.state_dict().values())).device  # a weight or a quantized buffer
        kwargs = {"device": device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=lora_bias, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if lora_bias:
            nn.init.zeros_(self.lora_B.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm()) if use_dora else None  # (out,)

    def base_weight(self) -> Tensor:
        """W (out, in) of the base, dequantized from a quantized one."""
        base = self.base_layer
        return base.weight if isinstance(base, nn.Linear) else base.dequantize()

    def weight_norm(self) -> Tensor:
        """||W + s B A|| per output row (out,) in float32, from detached weights: DoRA's constant."""
        with torch.no_grad():
            delta = self.lora_B.weight @ self.lora_A.weight  # (out, in)
            return torch.linalg.norm(self.base_weight().float() + self.scaling * delta, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (..., out) in the base's dtype
        dropped = self.dropout(x).to(torch.float32)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling  # (..., out) float32
        if self.lora_magnitude_vector is None:
            return (result + update).to(result.dtype)
        scale = self.lora_magnitude_vector / self.weight_norm()  # (out,)
        if self.training and isinstance(self.dropout, nn.Dropout):
            wx = F.linear(dropped, self.base_weight().float())  # W x'
        else:
            bias = self.base_layer.bias
            wx = result if bias is None else result - bias  # W x, from the base's own output
        return (result + (scale - 1) * wx + scale * update).to(result.dtype)

    def check_mergeable(self, name: str) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError(f"{name} is quantized: an adapter merges into the float checkpoint the "
                             "base was quantized from (load that, then load_adapter and merge), not into "
                             "int8/int4 weights")
        if self.lora_B.bias is not None and self.base_layer.bias is None:
            raise ValueError(f"{name} has no bias for the adapter's lora_bias to merge into")

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (and bias), computed in float32:
        W + s B A, or with DoRA m / ||W + s B A|| * (W + s B A) per row."""
        base = self.base_layer
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
            if self.lora_magnitude_vector is None:
                base.weight.add_(delta.to(base.weight.dtype))
            else:
                updated = base.weight.float() + delta
                base.weight.copy_((self.lora_magnitude_vector / self.weight_norm())[:, None] * updated)
            if self.lora_B.bias is not None:
                base.bias.add_((self.lora_B.bias * self.scaling).to(base.bias.dtype))
        return base


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
        wrapped = LoRALinear(base, config.rank_of(name), config.scaling_of(name), config.lora_dropout,
                             use_dora=config.use_dora, lora_bias=config.lora_bias)
        wrapped.train(base.training)  # a new module trains by default: keep the model's mode (dropout)
        _set_module(model, name, wrapped)
    return names


def _targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """The modules `config` adapts, by name; ValueError when none (a typo would train nothing) or when
    adapters are attached already."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first to stack another")
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, ADAPTABLE) and config.targets(name)}
    if not found:
        raise ValueError(f"no nn.Linear module matches target_modules={config.target_modules!r}")
    return found


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is then an ordinary Idefics2 again.
    A ValueError (quantized base, lora_bias without a base bias) comes before anything is merged."""
    wrapped = {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    for name, module in wrapped.items():
        module.check_mergeable(name)
    for name, module in wrapped.items():
        _set_module(model, name, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under PEFT's saved names: base_model.model.<module>.lora_{A,B}.weight (and
    lora_B.bias, lora_magnitude_vector)."""
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
        r = config.rank_of(name)
        expected[f"{name}.lora_A.weight"] = (r, module.in_features)
        expected[f"{name}.lora_B.weight"] = (module.out_features, r)
        if config.lora_bias:
            expected[f"{name}.lora_B.bias"] = (module.out_features,)
        if config.use_dora:
            expected[f"{name}.lora_magnitude_vector"] = (module.out_features,)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        examples = ", ".join(missing[:2] + unexpected[:2] + wrong[:2])
        raise ValueError(f"{weights_path} does not fit this model: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected and {len(wrong)} mis-shaped adapter tensors (e.g. {examples})")
    add_lora(model, config)
    model.load_state_dict(tensors, strict=False)
    return config
