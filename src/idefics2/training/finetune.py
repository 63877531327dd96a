"""Fine-tune a Hub-layout Idefics2 checkpoint on your own conversations: LoRA adapters (default) or
every weight, on one device or on several with torch.distributed.

    idefics2 finetune --model FOLDER --data train.jsonl --out-dir runs/ft            # LoRA, r = 8
    torchrun --nproc-per-node 2 -m idefics2.training.finetune --model FOLDER --data train.jsonl ...

The data file has one JSON object per line: the conversation in the chat format that
`processor.apply_chat_template` takes, and the image files in the order of its image parts, as
paths relative to the data file:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["photos/cat.jpg"]}

Only the assistant turns are learned. `<out-dir>/adapter` receives the adapter in PEFT's layout
(see `lora`), `<out-dir>/model` a full checkpoint (with `--merge` or `--full`), `<out-dir>/history.jsonl`
the loss per step.

With several processes (torchrun sets WORLD_SIZE), each optimizer step splits `--batch-size` x
world size x `--grad-accum` conversations across the processes, and the loss is divided by the
number of answer tokens of the whole step. So the gradient is the same as one process taking the
whole step alone (tests/test_finetune.py checks the weights agree).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from idefics2.checkpoint import resolve_device
from idefics2.model.idefics2 import Idefics2ForConditionalGeneration, causal_lm_loss
from idefics2.model.text import positions_from_mask
from idefics2.processing.image_file import read_image
from idefics2.processing.processor import Idefics2Processor, reserved_token_in
from idefics2.training.lora import LoRAConfig, add_lora, merge_lora, save_adapter
from idefics2.training.train import (
    CHECKPOINT_FILE,
    IGNORE_INDEX,
    add_config_flags,
    append_history,
    assistant_prefix_ids,
    check_flag_ranges,
    check_resumable,
    export,
    labelled_batch,
    lr_factor,
    param_groups,
    read_checkpoint,
    run_as_script,
    start_history,
    write_checkpoint,
)

logger = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass
class FinetuneConfig:
    """Every knob of a run; written to <out_dir>/finetune_config.json for the record."""

    model: str = ""
    data: str = ""
    eval_data: str | None = None
    eval_every: int = 0
    out_dir: str = "runs/finetune"
    full: bool = False
    lora_r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | None = None
    merge: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        """Every value checked before anything is loaded; a mistake names its flag."""
        check_flag_ranges(self, positive=("batch_size", "grad_accum", "lr", "epochs", "lora_r", "max_steps"),
                          non_negative=("warmup_steps", "weight_decay", "grad_clip", "eval_every",
                                        "checkpoint_every"))
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16 (float16 would need loss scaling), got "
                             f"{self.dtype!r}")
        if self.full and self.dtype != "float32":
            raise ValueError("--full trains the weights themselves, which needs --dtype float32: AdamW steps "
                             "on bfloat16 weights lose small updates (LoRA adapters are float32 on any base)")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    images: list[Path]
    line: int = 0  # in the data file, for error messages


def _count_images(content: Any) -> int:
    return 0 if isinstance(content, str) else sum(part.get("type") == "image" for part in content)


def _check_conversation(record: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return 'expected an object with a non-empty "messages" list'
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return '"images" must be a list of file paths'
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"message {i} needs a role, one of {ROLES}"
        content = message.get("content")
        if not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image")
                                                  for p in content)):
            return f"message {i}: content must be a string or a list of text/image parts"
        texts = [content] if isinstance(content, str) else [p.get("text") for p in content if p["type"] == "text"]
        if not all(isinstance(text, str) for text in texts):
            return f'message {i}: a text part needs a "text" string'
        reserved = next((token for token in map(reserved_token_in, texts) if token), None)
        if reserved:
            return (f"message {i}: the text holds {reserved}, which the chat template writes itself; "
                    'mark an image with an {"type": "image"} part instead')
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return "no assistant turn: there is nothing to learn"
    if any(m["role"] == "assistant" and _count_images(m["content"]) for m in record["messages"]):
        return "an assistant turn holds an image part: images belong to user turns"
    n_parts = sum(_count_images(m["content"]) for m in record["messages"])
    if n_parts != len(images):
        return f"{n_parts} image parts in the messages but {len(images)} files in \"images\""
    return None


def _image_problem(path: Path) -> str | None:
    """Whether PIL recognises the file (its header only: decoding every image up front would cost a pass
    over the data set; a file that is damaged further in is reported, with its line, when it is used)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return None
    except FileNotFoundError:
        return f"image file {path} not found"
    except (UnidentifiedImageError, OSError) as err:
        return f"cannot read image {path}: {err}"


def load_conversations(path: str | os.PathLike[str]) -> list[Conversation]:
    """Parse and check the whole data file before any training; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    conversations = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        problem = _check_conversation(record)
        if problem is not None:
            raise ValueError(f"{path}:{number}: {problem}")
        images = [path.parent / p for p in record.get("images", [])]
        for image in images:
            problem = _image_problem(image)
            if problem is not None:
                raise ValueError(f"{path}:{number}: {problem}")
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str)
                    else m for m in record["messages"]]
        conversations.append(Conversation(messages, images, number))
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


def check_tokenized(conversations: Sequence[Conversation], processor: Idefics2Processor, prefix_ids: Sequence[int],
                    limit: int, path: str) -> None:
    """Tokenize every conversation (image tokens counted, no pixels) before training and refuse, by line,
    one longer than the model's positions (it would run past its rotary range without complaint) or one
    whose assistant turns are not all found as answers (an assistant turn first, or "\nAssistant:"
    inside a user's text, would shift what is learned)."""
    for c in conversations:
        labels = labelled_batch(processor, [c.messages], None, prefix_ids)["labels"][0]
        if len(labels) > limit:
            raise ValueError(f"{path}:{c.line}: the conversation is {len(labels)} tokens long (image tokens "
                             f"included); the model takes at most {limit} positions")
        answers = int((labels == processor.end_of_utterance_id).sum())
        turns = sum(m["role"] == "assistant" for m in c.messages)
        if answers != turns:
            raise ValueError(f"{path}:{c.line}: {turns} assistant turns but {answers} found after tokenization; "
                             "a conversation must not start with an assistant turn, and user text must not "
                             "contain '\\nAssistant:'")


def make_batch(conversations: Sequence[Conversation], processor: Idefics2Processor, prefix_ids: Sequence[int],
               path: str) -> dict[str, Tensor]:
    """Left-padded model inputs with assistant-only labels; an image that cannot be decoded names its line."""
    images = []
    for c in conversations:
        try:
            images.append([read_image(str(p)) for p in c.images])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{path}:{c.line}: cannot read an image: {err}") from None
    return labelled_batch(processor, [c.messages for c in conversations], images if any(images) else None,
                          prefix_ids)


def answer_tokens(labels: Tensor) -> int:
    """How many labels `causal_lm_loss` scores: every position but the first that is not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def answer_loss(model: torch.nn.Module, batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, int]:
    """(mean cross-entropy over the answer tokens, their number) of one batch."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=positions_from_mask(batch["attention_mask"]), pixel_values=batch.get("pixel_values"),
                   pixel_attention_mask=batch.get("pixel_attention_mask"), use_cache=False).logits
    return causal_lm_loss(logits, batch["labels"]), answer_tokens(batch["labels"])


def evaluate(model: torch.nn.Module, conversations: Sequence[Conversation], processor: Idefics2Processor,
             prefix_ids: Sequence[int], path: str, batch_size: int, device: torch.device) -> float:
    """Mean answer-token loss over held-out conversations; with several processes each takes every
    world-size-th conversation and the sums are added up, so every process returns the same value."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(conversations[rank::world])
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, answer tokens
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            loss, n = answer_loss(model, make_batch(mine[i:i + batch_size], processor, prefix_ids, path), device)
            total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def step_indices(n: int, per_step: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of `per_step` example indices: epoch after epoch of seeded permutations, so
    every step is full and each example is seen once per epoch."""
    rng = random.Random(seed)
    pool: list[int] = []
    while True:
        while len(pool) < per_step:
            order = list(range(n))
            rng.shuffle(order)
            pool += order
        yield pool[:per_step]
        pool = pool[per_step:]


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun with several processes this starts the
    process group (NCCL for CUDA, gloo for the CPU) and gives each process its own GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device_name} with {world} processes: pass --device cuda, and each process "
                             "takes the GPU of its LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


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


def optimizer_step(model: torch.nn.Module, ddp: torch.nn.parallel.DistributedDataParallel | None,
                   batches: Sequence[dict[str, Tensor]], optimizer: torch.optim.Optimizer, grad_clip: float,
                   world: int, device: torch.device) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches; returns (the step's answer loss over every
    process, the gradient norm before clipping).

    Each micro-batch's summed loss is divided by the answer tokens of the whole step over every
    process, times the world size because DDP averages the processes' gradients: two processes then
    train the same weights as one process taking the whole step. Gradients are synchronised only
    on the last micro-batch.
    """
    tokens = torch.tensor(float(sum(answer_tokens(b["labels"]) for b in batches)), device=device)
    if world > 1:
        dist.all_reduce(tokens)
    forward = ddp if ddp is not None else model
    scale = world / tokens.item()
    step_loss = 0.0
    for m, batch in enumerate(batches):
        sync = ddp is None or m == len(batches) - 1
        with nullcontext() if sync else ddp.no_sync():  # type: ignore[union-attr]
            mean, n = answer_loss(forward, batch, device)
            loss = mean * n * scale
            loss.backward()
        step_loss += loss.item() / world
    # The norm before clipping (0 = no clipping) is logged: with the loss, it shows a scaling mistake.
    stepped = [p for group in optimizer.param_groups for p in group["params"]]  # the trainable tensors
    grad_norm = float(torch.nn.utils.clip_grad_norm_(stepped, grad_clip if grad_clip > 0 else math.inf))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        total = torch.tensor(step_loss, device=device)
        dist.all_reduce(total)
        step_loss = total.item()
    return step_loss, grad_norm


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the fine-tuning; returns the summary written (by rank 0) to <out_dir>/summary.json."""
    if cfg.resume:
        check_resumable(Path(cfg.out_dir))
    rank, world, device = _distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lora = None if cfg.full else LoRAConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, base_model_name_or_path=cfg.model,
        **({"target_modules": cfg.target_modules} if cfg.target_modules else {}))
    conversations = load_conversations(cfg.data)
    held_out = load_conversations(cfg.eval_data) if cfg.eval_data else []
    processor = Idefics2Processor.from_pretrained(cfg.model)
    prefix_ids = assistant_prefix_ids(processor.tokenizer)
    model = Idefics2ForConditionalGeneration.from_pretrained(cfg.model, dtype=cfg.dtype, device=device)
    for path, items in ((cfg.data, conversations), (cfg.eval_data, held_out)):
        check_tokenized(items, processor, prefix_ids, model.config.text_config.max_position_embeddings, str(path))
    if lora is None:
        model.requires_grad_(True)
    else:
        torch.manual_seed(cfg.seed)  # the adapters' initial values, the same in every process
        names = add_lora(model, lora)
        if rank == 0:
            logger.info("LoRA r=%d on %d modules", cfg.lora_r, len(names))
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ between processes
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        logger.info("%.2f M trainable parameters of %.2f M", sum(p.numel() for p in trainable) / 1e6,
                    sum(p.numel() for p in model.parameters()) / 1e6)
    per_step = cfg.batch_size * world * cfg.grad_accum
    steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * len(conversations) / per_step))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    out = Path(cfg.out_dir)
    start = 0
    if cfg.resume:  # every process loads it, before DDP wraps the model
        start = load_checkpoint(out, model, optimizer, device)
        if rank == 0:
            logger.info("resumed from step %d", start)
    # find_unused_parameters: a micro-batch without images leaves the connector's adapters without gradients
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
    ) if world > 1 else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
        start_history(out, start)
        stale = [name for name, written in (("adapter", lora is not None), ("model", cfg.full or cfg.merge))
                 if not written and (out / name).exists()]
        if stale:
            logger.warning("%s in %s come(s) from an earlier run; this run will not replace it",
                           " and ".join(f"{name}/" for name in stale), out)
    model.train()
    stream = step_indices(len(conversations), per_step, cfg.seed)
    for _ in range(start):  # the conversations of the steps already taken
        next(stream)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="finetune", disable=rank != 0,
               dynamic_ncols=True)
    loss_value: float | None = None  # these stay None when a resumed run has no steps left
    eval_loss: float | None = None
    for step in bar:
        lr = cfg.lr * lr_factor(step / steps, step, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = next(stream)
        micro = [[conversations[i] for i in chosen[(m * world + rank) * cfg.batch_size:
                                                     (m * world + rank + 1) * cfg.batch_size]]
                 for m in range(cfg.grad_accum)]
        batches = [make_batch(mb, processor, prefix_ids, cfg.data) for mb in micro]
        loss_value, grad_norm = optimizer_step(model, ddp, batches, optimizer, cfg.grad_clip, world, device)
        record = {"step": step + 1, "loss": round(loss_value, 6), "grad_norm": round(grad_norm, 6), "lr": lr}
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps):
            eval_loss = evaluate(model, held_out, processor, prefix_ids, str(cfg.eval_data), cfg.batch_size, device)
            record["eval_loss"] = round(eval_loss, 6)
        if rank == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            append_history(out, record)
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
                save_checkpoint(out, model, optimizer, step + 1)
    bar.close()
    summary = {"steps": steps, "examples_per_step": per_step, "final_loss": loss_value, "world_size": world,
               **({"eval_loss": eval_loss} if held_out else {})}
    if rank == 0:
        model.eval()
        if lora is not None:
            save_adapter(model, lora, out / "adapter")
        if cfg.full or cfg.merge:
            export(merge_lora(model), processor, out / "model")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------- CLI
HELP = {
    "model": "Hub-layout checkpoint folder to fine-tune",
    "data": 'one conversation per line: {"messages": [chat messages], "images": [paths relative to the file]} '
            "(README, Fine-tuning)",
    "eval_data": "held-out conversations (same format): their answer loss is logged as eval_loss",
    "eval_every": "evaluate every N steps (0: only after the last step)",
    "out_dir": "where adapter/, model/ and history.jsonl go", "full": "train every weight instead of LoRA adapters",
    "lora_r": "adapter rank", "lora_alpha": "adapter scale numerator (scale = alpha / r)",
    "target_modules": "regular expression of the module names to adapt (default: decoder, modality "
                      "projection and perceiver projections)",
    "merge": "also write <out-dir>/model with the adapters folded into the weights",
    "checkpoint_every": "save <out-dir>/checkpoint.pt every N steps and after the last (0 = never)",
    "resume": "continue from <out-dir>/checkpoint.pt (same flags; a larger --max-steps extends the run)",
    "max_steps": "optimizer steps (default: --epochs over the data)",
    "batch_size": "conversations per process per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "dtype": "the base weights' dtype: float32 or bfloat16 (LoRA only; adapters stay float32)",
    "device": "cpu or cuda (one GPU per process)",
    "threads": "CPU threads (default: torch's)", "grad_clip": "clip the gradient norm to this (0 = no clipping)",
}


def register_finetune_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `finetune` to the CLI's subparsers; `args.func(args)` runs it."""
    parser = subparsers.add_parser("finetune", help="fine-tune a checkpoint on your conversations (LoRA)",
                                   description=__doc__.split("\n\n")[0])
    add_config_flags(parser, FinetuneConfig, HELP, required=("model", "data"), floats=("epochs",),
                     ints=("max_steps", "threads"))
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    summary = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("done: %s", json.dumps(summary))


def main(argv: Sequence[str] | None = None) -> None:
    run_as_script("finetune", register_finetune_command, argv)


if __name__ == "__main__":
    main()
