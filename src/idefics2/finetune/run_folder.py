"""A run's folder: the loss history, the resumable checkpoint and the exported model.

Every file is replaced whole (written beside, then moved over), so a run killed mid-write keeps
the last good one.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from idefics2.files import write_file_atomically, write_folder_atomically
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.processor import Idefics2Processor

CHECKPOINT_FILE = "checkpoint.pt"

HISTORY_FILE = "history.jsonl"

# What a run leaves in its folder; a new run is refused where any of them is found
RUN_FILES = (CHECKPOINT_FILE, HISTORY_FILE, "adapter", "model", "summary.json", "finetune_config.json")


def start_history(folder: Path, resumed_step: int) -> None:
    """A fresh run starts an empty history.jsonl (never mixing in an old run's curve); a resumed one drops
    the records written after its checkpoint (a run killed between two checkpoints)."""
    path = folder / HISTORY_FILE
    if not resumed_step:
        path.unlink(missing_ok=True)
    elif path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):  # blank, or cut short by a kill mid-write
                continue
        write_file_atomically(path, "".join(line + "\n" for line in kept))  # a failure keeps every record


def check_resumable(folder: Path) -> None:
    """`--resume` needs the folder's checkpoint; without one it is refused rather than starting over."""
    if not (folder / CHECKPOINT_FILE).is_file():
        raise ValueError(f"--resume: {folder / CHECKPOINT_FILE} does not exist; drop --resume to start a new run")


def check_same_run(folder: Path, run: Mapping[str, Any]) -> None:
    """The checkpoint must come from a run of the same shape: `run` (the settings that decide the
    updates, by flag name) must equal the checkpoint's, or the continuation would be another run than
    the one it claims to extend. Read without loading its tensors (mmap)."""
    path = folder / CHECKPOINT_FILE
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run")
    if saved is None:
        raise ValueError(f"--resume: {path} does not record the settings of its run (an older version wrote "
                         "it); start a new run")
    changed = [f"{name} ({saved.get(name)!r} in the checkpoint, {run.get(name)!r} now)"
               for name in sorted(set(saved) | set(run)) if saved.get(name) != run.get(name)]
    if changed:
        raise ValueError(f"--resume: this run differs from the one {path} continues in " + "; ".join(changed)
                         + ". Resume with that run's settings (a larger --max-steps may extend it), or start "
                           "a new run in another --out-dir")


def check_fresh(folder: Path, overwrite: bool) -> None:
    """A new run into a folder that holds an earlier one is refused: it would drop that run's history and
    leave its checkpoint or exports beside the new ones. With `overwrite` they are deleted (by process 0,
    `clear_run`) instead."""
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if found and not overwrite:
        raise ValueError(f"--out-dir {folder} already holds a run ({', '.join(found)}): pass --resume to continue "
                         "it, --overwrite to replace it, or choose another --out-dir")


def clear_run(folder: Path) -> None:
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def start_run(folder: Path, config: Mapping[str, Any], resumed_step: int, overwrite: bool) -> None:
    """Process 0 opens the folder once every process has checked it: an overwritten run's files deleted
    (`check_fresh` let them through), the run's flags recorded in finetune_config.json, and the history
    started or cut back to the resumed checkpoint (`start_history`)."""
    if overwrite:
        clear_run(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "finetune_config.json").write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")
    start_history(folder, resumed_step)


def append_history(folder: Path, record: dict[str, Any], name: str = HISTORY_FILE) -> None:
    with open(folder / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """checkpoint.pt, written beside and then moved over the previous one (a kill mid-write keeps it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file_atomically(folder / CHECKPOINT_FILE, buffer.getvalue())


def read_checkpoint(folder: Path) -> dict[str, Any]:
    # weights_only: torch's restricted unpickler (tensors, numbers, dicts), never arbitrary objects;
    # mmap: the processes of a run share the file's pages instead of each reading a copy
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True, mmap=True)


def export(model: Idefics2ForConditionalGeneration, processor: Idefics2Processor, folder: Path,
           generation: dict[str, Any] | None = None) -> None:
    """Hub layout: config + safetensors (+ the model's generation config, or `generation`), processor
    files, tokenizer, chat template. Written whole into a temporary folder that then replaces `folder`,
    so a failure never leaves weights without their tokenizer."""
    with write_folder_atomically(Path(folder), owns=lambda name: True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def trained_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the trainable tensors by parameter name, the optimizer state by the same names), whole and on
    the CPU in process 0 (empty elsewhere). Every process calls it: a sharded (FSDP) model gathers its
    shards; for an unsharded one it is a copy. The optimizer state is keyed by name, not position,
    so a checkpoint written with FSDP resumes without it and the other way round."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    if optimizer is None:
        weights, optim = get_model_state_dict(model, options=options), {}
    else:
        weights, optim = get_state_dict(model, optimizer, options=options)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in weights.items() if name in trainable}, optim


def rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every process's random generators (torch's CPU one, the GPU's, Python's `random`), in rank
    order: they draw the dropout masks, so a resumed run continues the same draws. The data order
    needs none: it is a function of the seed and the step (`step_indices`)."""
    mine: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    run: Mapping[str, Any], device: torch.device) -> None:
    """The trainable tensors (adapters, or every weight with --full), the optimizer state, the step,
    every process's random generators and the run's settings (`check_resumable`). Every process
    calls it (a sharded model gathers its tensors); process 0 writes."""
    weights, optim = trained_state(model, optimizer)
    rng = rng_states(device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_checkpoint(folder, {"trainable": weights, "optimizer": optim, "step": step, "rng": rng,
                                  "run": dict(run)})


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Restore what `save_checkpoint` wrote (into a sharded model too: each process keeps its shards)
    and this process's random generators; returns the step to continue from. A checkpoint of other
    trainable tensors (another rank, targets or --full) is refused rather than half-loaded."""
    state = read_checkpoint(folder)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if saved.keys() != trainable.keys() or any(saved[k].shape != trainable[k].shape for k in saved):
        raise ValueError(f"{folder / CHECKPOINT_FILE} holds other trainable tensors than this run's (another "
                         "--lora-r, --target-modules or --full?); resume with the flags of the run that wrote it")
    set_state_dict(model, optimizer, model_state_dict=saved, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    set_rng_state(state["rng"][dist.get_rank() if dist.is_initialized() else 0], device)
    return int(state["step"])
