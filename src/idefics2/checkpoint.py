"""Checkpoint I/O: Hub-layout folders of safetensors shards <-> our models.

Loading builds the model on the meta device and assigns tensors read from memory-mapped
safetensors files, so peak memory stays near the weights' size; names are the Hub's, so the only
transform is dropping the `model.` prefix for `Idefics2Model`. Saving writes into a temporary
folder and swaps it into place, so a failed save never leaves a half-written checkpoint where a
good one was. Pickle (`.bin`) checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from idefics2.config import Idefics2Config
from idefics2.files import inside, resolve_folder, write_folder_atomically
from idefics2.model.quant import AwqLayers, checkpoint_tensors, quantization_targets, quantize_weight
from idefics2.shard_files import (
    TRIM_EVERY,
    Shard,
    copied_shard,
    mapped_shard,
    release_freed_memory,
    shard_keys,
)

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}

M = TypeVar("M", bound=nn.Module)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or "auto" keep each tensor's stored dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"cpu", "cuda", "cuda:1", ... as a torch.device. A name torch does not know, or CUDA on a machine
    without it, is a ValueError here rather than a crash on the first tensor sent there."""
    try:
        resolved = torch.device(device if device is not None else "cpu")
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({err}); expected cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device")
    return resolved


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order; an index may name only files
    inside the folder."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{index} is not a JSON object ({err})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: weight_map must be an object of tensor name -> shard file, got "
                             f"{type(weight_map).__name__}")
        names = sorted({inside(folder, n, f"{index} weight_map[{k!r}]").relative_to(folder).as_posix()
                        for k, n in weight_map.items()})
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are not in the folder: {missing}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise ValueError(f"{folder} holds only pickle weights ({', '.join(pickles)}). Pickle files can run "
                         "arbitrary code when loaded, so idefics2 reads safetensors only: convert them once "
                         "with a tool you trust, e.g. `safetensors.torch.save_file(torch.load(f, "
                         "weights_only=True), 'model.safetensors')`.")
    raise ValueError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Skip torch's parameter initialisers while building on the meta device.

    Every weight is about to be replaced by the checkpoint's; on meta the initialisers would do no
    work, yet dispatching them there imports torch's Python decompositions (seconds at start-up).
    """
    skipped = {name: getattr(nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in skipped.items():
            setattr(nn.init, name, fn)


_INITIALISERS = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _checkpoint_key_map(cls: type[nn.Module], keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> our key. A class whose `checkpoint_prefix` is set (the headless
    `Idefics2Model`: "model.") loads a full checkpoint's keys under that prefix and drops the rest."""
    prefix = getattr(cls, "checkpoint_prefix", "")
    if prefix and any(k.startswith(prefix) for k in keys):
        return {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
    base = getattr(cls, "base_model_prefix", "")
    if not prefix and base and not any(k.startswith(base + ".") for k in keys):
        # a headless model's checkpoint loaded into the class with the head: its keys go under `model.`
        return {k: k if k.startswith("lm_head.") else f"{base}.{k}" for k in keys}
    return {k: k for k in keys}


def load_pretrained(cls: type[M], folder_or_repo_id: str | os.PathLike[str], *, dtype: Any = None,
                    device: Any = None, perceiver_eps_from_text: bool = False,
                    progress: bool | None = None, config: Idefics2Config | None = None,
                    report: dict[str, list[str]] | None = None, quantization: tuple[str, int] | None = None) -> M:
    """Build `cls` (Idefics2Model or Idefics2ForConditionalGeneration) from a checkpoint folder.

    dtype: None/"auto" keeps the stored dtype; device: where the weights go (default CPU).
    progress: a progress bar over the bytes read (default: on for checkpoints over 1 GB on a terminal).
    config: use this instead of the folder's config.json. report: see `_build`.
    """
    folder = resolve_folder(folder_or_repo_id)
    if config is None:
        config = Idefics2Config.from_pretrained(folder, perceiver_eps_from_text=perceiver_eps_from_text)
    files = weight_files(folder)
    total = sum(f.stat().st_size for f in files)
    if progress is None:
        progress = total > 1e9
    check_layer_counts(config, [k for file in files for k in shard_keys(file)], folder)

    copies = quantization is not None or "quantization_config" in config.extra  # see `copied_shard`

    def shards() -> Iterator[Shard]:
        for file in files:
            with (copied_shard if copies else mapped_shard)(file) as shard:
                yield shard

    # disable=None: tqdm shows the bar only on a terminal.
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights",
              disable=None if progress else True) as bar:
        return _build(cls, config, shards(), dtype=dtype, device=device, source=f"checkpoint {folder}",
                      read=lambda t: bar.update(t.numel() * t.element_size()), report=report,
                      quantization=quantization)


_LAYER_KEYS = {"text_config": re.compile(r"text_model\.layers\.(\d+)\."),
               "vision_config": re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")}


def check_layer_counts(config: Idefics2Config, keys: list[str], folder: Path) -> None:
    """The config's layer counts against the layers the checkpoint holds, before anything is built:
    a config asking for more layers than there are weights would otherwise build them all first."""
    for section, pattern in _LAYER_KEYS.items():
        found = {int(m.group(1)) for k in keys if (m := pattern.search(k))}
        wanted = getattr(config, section).num_hidden_layers
        if found and wanted != max(found) + 1:
            raise ValueError(f"{folder / CONFIG_FILE}: {section}.num_hidden_layers is {wanted}, but the weights "
                             f"hold {max(found) + 1} layers")


def load_state_dict(cls: type[M], config: Idefics2Config, state_dict: dict[str, torch.Tensor], *,
                    dtype: Any = None, device: Any = None, report: dict[str, list[str]] | None = None) -> M:
    """Build `cls` with `config` and the tensors of `state_dict` (names as in a checkpoint or as the
    model's own), with the checks of `load_pretrained`."""
    def copy(key: str) -> torch.Tensor:  # the model gets its own tensors, as from files
        return state_dict[key].detach().clone()

    return _build(cls, config, [(list(state_dict), copy)], dtype=dtype, device=device, source="state_dict",
                  read=lambda t: None, report=report)


def _build(cls: type[M], config: Idefics2Config, shards: Iterable[Shard], *, dtype: Any, device: Any,
           source: str, read: Callable[[torch.Tensor], None], report: dict[str, list[str]] | None = None,
           quantization: tuple[str, int] | None = None) -> M:
    """The model built on the meta device, every weight assigned from `shards`; a ValueError listing
    missing, unexpected and mis-shaped keys when they do not fit. With a `report` (the caller asked
    for the loading info, as transformers' `output_loading_info=True`), missing weights are
    initialised as in a new model and, with unexpected keys, listed there instead; mis-shaped ones
    still raise. `quantization` (method, group size): the decoder's and connector's linear weights
    are quantized as each is read (`model.quant`), so the float copy of one weight at a time is
    all that is held beside the quantized model."""
    target_dtype = resolve_dtype(dtype)
    with skip_init(), torch.device("meta"):
        model = cls(config)  # type: ignore[call-arg]
    targets = quantization_targets(model, quantization)
    quantized: dict[str, nn.Module] = {}
    awq = AwqLayers.for_config(config, source, quantization)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected
    if tied:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    bad_dtype: list[str] = []  # integer or bool tensors where the model has float weights
    dtypes: set[torch.dtype] = set()
    quantized_bytes = trimmed_at = 0
    for keys, get_tensor in shards:
        key_map = _checkpoint_key_map(cls, keys)
        for ckpt_key in keys:
            key = key_map.get(ckpt_key)
            if key is None:
                continue  # a head the headless model does not have
            if awq is not None and awq.take(key, ckpt_key, get_tensor, expected):
                continue
            if key not in expected:
                if not (tied and key == "lm_head.weight"):
                    unexpected.append(ckpt_key)
                continue
            tensor = get_tensor(ckpt_key)
            if not tensor.is_floating_point():
                bad_dtype.append(f"{ckpt_key}: {tensor.dtype}")
                continue
            dtypes.add(tensor.dtype)
            if tensor.shape != expected[key]:
                mis_shaped.append(f"{ckpt_key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key])}")
                continue
            read(tensor)
            if key.endswith(".weight") and key[:-len(".weight")] in targets:
                assert quantization is not None
                layer = quantize_weight(tensor, *quantization)
                quantized[key[:-len(".weight")]] = layer.to(device) if device is not None else layer
                state[key] = tensor.new_empty(0)  # present; the quantized layer replaces it below
                quantized_bytes += tensor.nbytes
                if quantized_bytes - trimmed_at > TRIM_EVERY:
                    release_freed_memory()
                    trimmed_at = quantized_bytes
                continue
            if target_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(target_dtype)
            state[key] = tensor.to(device) if device is not None else tensor
    if awq is not None:
        for name, layer in awq.layers(device).items():
            quantized[name] = layer
            state[f"{name}.weight"] = torch.empty(0)  # present: the quantized layer replaces it below
    if bad_dtype:
        raise ValueError(f"{source} holds tensors that are not floating point where the model has float "
                         f"weights: {bad_dtype[:20]}")
    if target_dtype is None and len(dtypes) > 1:
        raise ValueError(f"{source} mixes tensor dtypes ({sorted(str(d) for d in dtypes)}); the model needs one: "
                         "pass dtype= (e.g. dtype='float32')")
    missing = sorted(k for k in set(expected) - set(state) if not any(m.startswith(f"{k}:") for m in mis_shaped))
    if report is not None and not mis_shaped:
        report["missing_keys"], report["unexpected_keys"] = missing, unexpected
        if missing:
            logger.warning("%s: %d weights missing, initialised as in a new model: %s", source, len(missing),
                           missing[:20])
        _initialise(model, missing, target_dtype or next(iter(dtypes), torch.float32), device)
        missing, unexpected = [], []
    if missing or unexpected or mis_shaped:
        raise ValueError(f"{source} does not fit the model built from its config:"
                         + (f"\n  missing keys ({len(missing)}): {missing[:20]}" if missing else "")
                         + (f"\n  unexpected keys ({len(unexpected)}): {unexpected[:20]}" if unexpected else "")
                         + (f"\n  mis-shaped keys ({len(mis_shaped)}): {mis_shaped[:20]}" if mis_shaped else ""))
    for name in quantized:
        state.pop(f"{name}.weight")
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked above; a tied head is absent
    for name, layer in quantized.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        layer.bias = getattr(owner, attr).bias  # loaded (or None) with the rest
        setattr(owner, attr, layer)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _initialise(model: nn.Module, keys: list[str], dtype: torch.dtype, device: Any) -> None:
    """Real tensors for the still-meta weights `keys`, drawn as a new model's are: biases zero,
    norm weights and perceiver latents one, the rest N(0, the text config's initializer_range)."""
    std = getattr(model.config.text_config, "initializer_range", 0.02) or 0.02
    for key in keys:
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, name)
        value = torch.empty(old.shape, dtype=dtype, device=device if device is not None else "cpu")
        with torch.no_grad():
            if name == "bias":
                value.zero_()
            elif name == "latents" or type(owner).__name__.endswith("Norm"):
                value.fill_(1.0)
            else:
                value.normal_(0.0, std)
        if isinstance(old, nn.Parameter):
            setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(name, value)


def parse_size(size: int | str) -> int:
    """"5GB" -> 5e9 bytes, "500MiB" -> 500 * 2**20; ints are bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size; expected e.g. '5GB', '500MB' or bytes as int")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_pretrained(model: nn.Module, folder: str | os.PathLike[str], *, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors shards (+ index when more than one) to `folder`.

    Files already in `folder` that are not model files (tokenizer, processor configs) are kept.
    """
    folder = Path(folder)
    max_bytes = parse_size(max_shard_size)
    config: Idefics2Config = model.config  # type: ignore[assignment]
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    added, replaced, quantization_config = checkpoint_tensors(model)
    state = {**{k: v for k, v in state.items() if k not in replaced}, **added}
    if any(".lora_A." in key for key in state):
        raise ValueError("the model has LoRA adapters attached: save them with idefics2.lora.save_adapter, "
                         "or fold them in with idefics2.lora.merge_lora before save_pretrained")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the reference omits the tied head too
    with write_folder_atomically(folder, owns=_is_model_file) as tmp:
        if quantization_config is not None:  # config.json says how the weights are stored
            config = copy.deepcopy(config)
            config.extra["quantization_config"] = quantization_config
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and hasattr(generation_config, "to_dict"):
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config.to_dict(), indent=2) + "\n")
        shards = _shards(state, max_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _is_model_file(name: str) -> bool:
    return name in (CONFIG_FILE, INDEX_FILE, GENERATION_CONFIG_FILE) or (
        name.startswith("model") and name.endswith(".safetensors"))
