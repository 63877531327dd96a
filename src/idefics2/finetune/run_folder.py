"""A run's folder: the loss history, the resumable checkpoint and the exported model.

Every file is replaced whole (written beside, then moved over), so a run killed mid-write keeps
the last good one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from idefics2.files import write_file_atomically, write_folder_atomically
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.processor import Idefics2Processor

CHECKPOINT_FILE = "checkpoint.pt"

HISTORY_FILE = "history.jsonl"



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
    """`--resume` needs the folder's checkpoint; without one it is refused rather than starting over, which
    would replace the history a mistyped `--out-dir` was meant to continue."""
    if not (folder / CHECKPOINT_FILE).is_file():
        raise ValueError(f"--resume: {folder / CHECKPOINT_FILE} does not exist; drop --resume to start a new run "
                         "(which replaces that folder's history)")

def append_history(folder: Path, record: dict[str, Any], name: str = HISTORY_FILE) -> None:
    with open(folder / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

def write_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """checkpoint.pt, written beside and then moved over the previous one (a kill mid-write keeps it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file_atomically(folder / CHECKPOINT_FILE, buffer.getvalue())

def read_checkpoint(folder: Path, device: torch.device) -> dict[str, Any]:
    # weights_only: torch's restricted unpickler (tensors, numbers, dicts), never arbitrary objects
    return torch.load(folder / CHECKPOINT_FILE, map_location=device, weights_only=True)

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


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """The trainable tensors (adapters, or every weight with --full), the optimizer state and the step."""
    write_checkpoint(folder, {"trainable": {name: p.detach().cpu() for name, p in model.named_parameters()
                                            if p.requires_grad},
                              "optimizer": optimizer.state_dict(), "step": step})

def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from. A checkpoint of other
    trainable tensors (another rank, targets or --full) is refused rather than half-loaded."""
    state = read_checkpoint(folder, device)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if saved.keys() != trainable.keys() or any(saved[k].shape != trainable[k].shape for k in saved):
        raise ValueError(f"{folder / CHECKPOINT_FILE} holds other trainable tensors than this run's (another "
                         "--lora-r, --target-modules or --full?); resume with the flags of the run that wrote it")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])
