"""Fine-tune a Hub-layout Idefics2 checkpoint on your own conversations: LoRA adapters (default) or
every weight, on one device or on several with torch.distributed.

    idefics2 finetune --model FOLDER --data train.jsonl --out-dir runs/ft            # LoRA, r = 8
    torchrun --nproc-per-node 2 -m idefics2.finetune --model FOLDER --data train.jsonl ...

The data file has one JSON object per line: the conversation in the chat format that
`processor.apply_chat_template` takes, and the image files in the order of its image parts, as
paths relative to the data file:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["photos/cat.jpg"]}

`--data` also takes a JSON array of such records, a Parquet file or a `datasets` `save_to_disk` folder
(the `datasets` extra), whose images may be the encoded bytes `datasets` stores, and records of
`question`/`answer` strings or the Cauldron's `texts` turns with an `image` or `images` column (see
`idefics2.finetune.data`).

Only the assistant turns are learned. `<out-dir>/adapter` receives the adapter in PEFT's layout
(see `idefics2.lora`), `<out-dir>/model` a full checkpoint (with `--merge` or `--full`), `<out-dir>/history.jsonl`
the loss per step.

With several processes (torchrun sets WORLD_SIZE), each optimizer step splits `--batch-size` x
world size x `--grad-accum` conversations across the processes, and the loss is divided by the
number of answer tokens of the whole step. So the gradient is the same as one process taking the
whole step alone (tests/finetune/test_finetune.py checks the weights agree). Each process holds the
whole model (DDP), or with `--fsdp` a shard of its weights, gradients and AdamW state (FSDP2,
`loop.shard_model`; tests/finetune/test_fsdp.py checks it trains the weights of DDP).

`<out-dir>/checkpoint.pt` (`--checkpoint-every`) holds the trainable tensors, the optimizer state,
every process's random generators and the settings that shape the run: `--resume` continues exactly
(dropout too) and refuses other settings by name. A new run into a folder that holds a run is
refused unless `--overwrite`.
"""


from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from idefics2.finetune.data import (
    assistant_prefix_ids,
    check_tokenized,
    load_conversations,
    load_processor,
    make_batch,
)
from idefics2.finetune.flags import add_config_flags, check_flag_ranges, run_as_script
from idefics2.finetune.loop import (
    LR_SCHEDULES,
    evaluate,
    lr_multiplier,
    optimizer_step,
    param_groups,
    shard_model,
    start_distributed,
    step_indices,
    training_precision,
)
from idefics2.finetune.reporting import REPORT_TO, Report
from idefics2.finetune.run_folder import (
    append_history,
    check_fresh,
    check_resumable,
    check_same_run,
    export,
    load_checkpoint,
    save_checkpoint,
    start_run,
    trained_state,
)
from idefics2.lora import LoRAConfig, add_lora, merge_lora, save_adapter
from idefics2.model.quant import check_quantization
from idefics2.modeling import Idefics2ForConditionalGeneration

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Every knob of a run; written to <out_dir>/finetune_config.json for the record."""

    model: str = ""
    data: str = ""
    eval_data: str | None = None
    eval_every: int = 0
    image_splitting: bool | None = None
    longest_edge: int | None = None
    report_to: str = "none"
    out_dir: str = "runs/finetune"
    full: bool = False
    lora_r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | None = None
    use_dora: bool = False
    use_rslora: bool = False
    quantization: str | None = None
    group_size: int = 128
    merge: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False
    fsdp_mixed_precision: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        """Every value checked before anything is loaded; a mistake names its flag."""
        check_flag_ranges(self, positive=("batch_size", "grad_accum", "lr", "epochs", "lora_r", "max_steps",
                                                    "longest_edge"),
                          non_negative=("warmup_steps", "weight_decay", "grad_clip", "eval_every",
                                        "checkpoint_every"))
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16 (float16 would need loss scaling), got "
                             f"{self.dtype!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        if self.full and self.dtype != "float32":
            raise ValueError("--full trains the weights themselves, which needs --dtype float32: AdamW steps "
                             "on bfloat16 weights lose small updates (LoRA adapters are float32 on any base)")
        if self.fsdp and self.dtype != "float32":
            raise ValueError("--fsdp keeps float32 shards of the weights, so it needs --dtype float32; add "
                             "--fsdp-mixed-precision to gather and compute in bfloat16")
        if self.fsdp_mixed_precision and not self.fsdp:
            raise ValueError("--fsdp-mixed-precision is the precision of --fsdp; pass both")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out-dir, --overwrite replaces it: pass one")
        if self.quantization is not None:
            check_quantization(self.quantization, self.group_size)
            refused = {"full": "trains the weights themselves, which a quantized base holds in int8/int4",
                       "merge": "would fold the adapter into int8/int4 weights; merge it into the float "
                                "checkpoint instead (idefics2 chat --adapter, or load_adapter + "
                                "merge_adapter)",
                       "fsdp": "shards float weights; a quantized base is not sharded"}
            for flag, why in refused.items():
                if getattr(self, flag):
                    raise ValueError(f"--{flag} with --quantization: --{flag} {why}")


# The settings a resumed run may change: where files are, how often it evaluates and checkpoints, how
# many steps it takes, and how it computes the same gradients. Every other one shapes the updates.
RESUMABLE_CHANGES = ("model", "data", "eval_data", "eval_every", "out_dir", "merge", "gradient_checkpointing",
                     "fsdp", "checkpoint_every", "resume", "overwrite", "epochs", "max_steps", "device", "threads",
                     "report_to")


def run_settings(cfg: FinetuneConfig, world: int, examples: int) -> dict[str, Any]:
    """What shapes the run's updates, named as a user sets it; stored in the checkpoint, and a resume
    with other values is refused (`check_same_run`)."""
    return {**{"--" + name.replace("_", "-"): value for name, value in asdict(cfg).items()
               if name not in RESUMABLE_CHANGES},
            "processes (world size)": world, "conversations in --data": examples}


def mark_trainable(model: Idefics2ForConditionalGeneration, lora: LoRAConfig | None) -> list[str]:
    """Every weight trainable (`--full`), or LoRA adapters added as the only trainable tensors; returns the
    adapted modules' names. Training and `unsharded_copy` both use it, so their trained tensors' names agree."""
    if lora is None:
        model.requires_grad_(True)
        return []
    return add_lora(model, lora)


def prepare_for_training(model: Idefics2ForConditionalGeneration, cfg: FinetuneConfig, lora: LoRAConfig | None,
                         rank: int, device: torch.device) -> None:
    """The loaded base made ready to train, before the optimizer sees its parameters: the trainable tensors
    marked, gradient checkpointing, each process's dropout seed, and with `--fsdp` the weights sharded."""
    torch.manual_seed(cfg.seed)  # the adapters' initial values, the same in every process
    names = mark_trainable(model, lora)
    if rank == 0 and lora is not None:
        logger.info("LoRA r=%d on %d modules", cfg.lora_r, len(names))
    if cfg.gradient_checkpointing:  # each decoder and vision layer recomputed in the backward pass
        model.gradient_checkpointing_enable()
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ between processes
    if cfg.fsdp:
        shard_model(model, device, cfg.fsdp_mixed_precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        logger.info("%.2f M trainable parameters of %.2f M", sum(p.numel() for p in trainable) / 1e6,
                    sum(p.numel() for p in model.parameters()) / 1e6)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the fine-tuning; returns the summary written (by rank 0) to <out_dir>/summary.json."""
    out = Path(cfg.out_dir)
    if cfg.resume:
        check_resumable(out)
    else:
        check_fresh(out, cfg.overwrite)
    report = Report(cfg.report_to, out)  # names a missing tensorboard package before anything loads
    rank, world, device = start_distributed(cfg.device)
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over the processes torchrun starts; with one process, drop it")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lora = None if cfg.full else LoRAConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, base_model_name_or_path=cfg.model,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
        **({"target_modules": cfg.target_modules} if cfg.target_modules else {}))
    conversations = load_conversations(cfg.data)
    held_out = load_conversations(cfg.eval_data) if cfg.eval_data else []
    run = run_settings(cfg, world, len(conversations))
    if cfg.resume:
        check_same_run(out, run)
    processor = load_processor(cfg.model, cfg.image_splitting, cfg.longest_edge)
    prefix_ids = assistant_prefix_ids(processor.tokenizer)
    model = Idefics2ForConditionalGeneration.from_pretrained(cfg.model, dtype=cfg.dtype, device=device,
                                                             quantization=cfg.quantization,
                                                             group_size=cfg.group_size)
    for path, items in ((cfg.data, conversations), (cfg.eval_data, held_out)):
        check_tokenized(items, processor, prefix_ids, model.config.text_config.max_position_embeddings, str(path))
    prepare_for_training(model, cfg, lora, rank, device)
    per_step = cfg.batch_size * world * cfg.grad_accum
    steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * len(conversations) / per_step))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    start = 0
    if cfg.resume:  # every process loads it (and its random generators), before DDP wraps the model
        start = load_checkpoint(out, model, optimizer, device)
        if rank == 0:
            logger.info("resumed from step %d", start)
    # find_unused_parameters: a micro-batch without images leaves the connector's adapters without gradients
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
    ) if world > 1 and not cfg.fsdp else None
    if world > 1:
        dist.barrier()  # every process has checked the folder before process 0 writes to it
    if rank == 0:
        start_run(out, asdict(cfg), start, cfg.overwrite)
    precision = training_precision(device, cfg.fsdp_mixed_precision)
    model.train()
    stream = step_indices(len(conversations), per_step, cfg.seed)
    for _ in range(start):  # the conversations of the steps already taken
        next(stream)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="finetune", disable=rank != 0,
               dynamic_ncols=True)
    loss_value: float | None = None  # these stay None when a resumed run has no steps left
    eval_loss: float | None = None
    for step in bar:
        lr = cfg.lr * lr_multiplier(cfg.lr_schedule, step, steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = next(stream)
        micro = [[conversations[i] for i in chosen[(m * world + rank) * cfg.batch_size:
                                                     (m * world + rank + 1) * cfg.batch_size]]
                 for m in range(cfg.grad_accum)]
        batches = [make_batch(mb, processor, prefix_ids, cfg.data) for mb in micro]
        with precision:
            loss_value, grad_norm = optimizer_step(model, ddp, batches, optimizer, cfg.grad_clip, world, device)
        record = {"step": step + 1, "loss": round(loss_value, 6), "grad_norm": round(grad_norm, 6), "lr": lr}
        if held_out and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == steps):
            with precision:
                eval_loss = evaluate(model, held_out, processor, prefix_ids, str(cfg.eval_data), cfg.batch_size,
                                     device)
            record["eval_loss"] = round(eval_loss, 6)
        if rank == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            append_history(out, record)
            report.log(record)
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(out, model, optimizer, step + 1, run, device)  # every process: FSDP gathers
    bar.close()
    report.close()
    summary = {"steps": steps, "examples_per_step": per_step, "final_loss": loss_value, "world_size": world,
               **({"eval_loss": eval_loss} if held_out else {})}
    if cfg.fsdp:
        model = unsharded_copy(model, cfg, lora, rank)
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


def unsharded_copy(model: Idefics2ForConditionalGeneration, cfg: FinetuneConfig, lora: LoRAConfig | None,
                   rank: int) -> Idefics2ForConditionalGeneration:
    """In process 0, the base reloaded on the CPU with the trained tensors of a sharded model put in, so
    the adapter and merged exports are written as without FSDP; the other processes keep `model`.
    Every process calls it (the tensors are gathered)."""
    trained, _ = trained_state(model)
    if rank != 0:
        return model
    plain = Idefics2ForConditionalGeneration.from_pretrained(cfg.model, dtype=cfg.dtype)
    mark_trainable(plain, lora)
    keys = plain.load_state_dict(trained, strict=False)
    assert not keys.unexpected_keys, keys.unexpected_keys
    return plain


HELP = {
    "model": "Hub-layout checkpoint folder to fine-tune",
    "data": 'conversations: a JSON Lines file, one {"messages": [chat messages], "images": [paths '
            'relative to the file]} a line; or a JSON array, a Parquet file or a datasets save_to_disk '
            'folder, with "messages", "question"/"answer" or "texts" and "images"/"image" columns (README, '
            "Fine-tuning)",
    "image_splitting": "override the processor's do_image_splitting (the four crops beside each image)",
    "longest_edge": "override the processor's size: images resized to N pixels on their longest side (its "
                    "shortest_edge, the side every image is brought up to, lowered to N if above)",
    "report_to": "also write history.jsonl's scalars to <out-dir>/tensorboard (needs idefics2[tensorboard])",
    "lr_schedule": "after the linear warm-up from 0: cosine or linear decay to --min-lr-ratio x --lr, or "
                   "constant (transformers' get_*_schedule_with_warmup, step by step; default cosine)",
    "min_lr_ratio": "where the cosine and linear decays end, as a fraction of --lr",
    "eval_data": "held-out conversations (same format): their answer loss is logged as eval_loss",
    "eval_every": "evaluate every N steps (0: only after the last step)",
    "out_dir": "where adapter/, model/ and history.jsonl go", "full": "train every weight instead of LoRA adapters",
    "lora_r": "adapter rank", "lora_alpha": "adapter scale numerator (scale = alpha / r)",
    "target_modules": "regular expression of the module names to adapt (default: decoder, modality "
                      "projection and perceiver projections)",
    "use_dora": "DoRA: a trained magnitude per output row over the normalised W + scale B A (PEFT's "
                "use_dora)",
    "use_rslora": "rank-stabilised scale alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)",
    "quantization": "int8 or int4: train the adapters on a frozen quantized decoder and connector "
                    "(QLoRA); the adapter then applies to the float checkpoint",
    "group_size": "inputs per int4 scale (32, 64, 128 or 256)",
    "merge": "also write <out-dir>/model with the adapters folded into the weights",
    "gradient_checkpointing": "recompute each decoder and vision layer in the backward pass instead of "
                              "keeping its activations (less memory, ~30%% more compute, same gradients)",
    "fsdp": "under torchrun, shard the weights, gradients and optimizer state over the processes (FSDP2: "
            "one unit per decoder layer, the rest in the root)",
    "fsdp_mixed_precision": "with --fsdp: gather the weights and compute in bfloat16, reduce the gradients "
                            "in float32 onto float32 shards",
    "overwrite": "start a new run in an --out-dir that holds an earlier one, deleting its files",
    "checkpoint_every": "save <out-dir>/checkpoint.pt every N steps and after the last (0 = never)",
    "resume": "continue from <out-dir>/checkpoint.pt (the same run's flags, checked; a larger --max-steps "
              "extends it)",
    "max_steps": "optimizer steps (default: --epochs over the data)",
    "batch_size": "conversations per process per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "dtype": "the base weights' dtype: float32 or bfloat16 (LoRA only; adapters stay float32)",
    "device": "cpu or cuda (one GPU per process)",
    "threads": "CPU threads (default: torch's)", "grad_clip": "clip the gradient norm to this (0 = no clipping)",
}


def register_finetune_command(subparsers: Any, help: str | None = None) -> argparse.ArgumentParser:
    """Add `finetune` (with the CLI's one-line `help`) to the subparsers; `args.func(args)` runs it."""
    parser = subparsers.add_parser("finetune", help=help, description=__doc__.split("\n\n")[0])
    add_config_flags(parser, FinetuneConfig, HELP, required=("model", "data"), floats=("epochs",),
                     ints=("max_steps", "threads", "longest_edge"), switches=("image_splitting",),
                     choices={"lr_schedule": list(LR_SCHEDULES), "report_to": list(REPORT_TO)})
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    summary = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("done: %s", json.dumps(summary))


def main(argv: Sequence[str] | None = None) -> None:
    run_as_script("python -m idefics2.finetune", "finetune", register_finetune_command, argv)
