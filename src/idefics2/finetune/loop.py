"""The pieces of a training loop: the learning-rate schedule, AdamW groups, the order of examples,
the answer loss, held-out evaluation and one optimizer step over one or several processes."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from idefics2.checkpoint import resolve_device
from idefics2.finetune.data import Conversation, answer_tokens, make_batch
from idefics2.model.idefics2 import causal_lm_loss
from idefics2.model.text import positions_from_mask
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.processor import Idefics2Processor

LR_SCHEDULES = ("cosine", "linear", "constant_with_warmup")


def cosine_progress(step: int, steps: int, warmup_steps: int) -> float:
    """How far the decay has come after the warm-up, in [0, 1], as transformers'
    `get_cosine_schedule_with_warmup` counts it: the warm-up steps are not part of the cosine."""
    return max(0, step - warmup_steps) / max(1, steps - warmup_steps)


def cosine_decay(progress: float) -> float:
    """Half a cosine period, from 1 at progress 0 to 0 at progress 1."""
    return 0.5 * (1 + math.cos(math.pi * progress))


def lr_multiplier(schedule: str, step: int, steps: int, warmup_steps: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (counted from 0) of `steps`, as a fraction of `--lr`.

    Step by step what transformers' `get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`
    and `get_constant_schedule_with_warmup` give (a linear warm-up from 0 over `warmup_steps`, then the
    decay over the steps after it), except that the cosine and linear decays end at `min_ratio` instead
    of 0, as transformers' `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)` does.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant_with_warmup":
        return 1.0
    progress = cosine_progress(step, steps, warmup_steps)
    return min_ratio + (1 - min_ratio) * (1 - progress if schedule == "linear" else cosine_decay(progress))


def lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """The shapes recipe's schedule: a linear warm-up reaching 1 at step `warmup_steps`, then the cosine from
    1 to `min_ratio` over the run's overall progress in [0, 1] (steps or wall-clock time, whichever is
    further), warm-up included."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return min_ratio + (1 - min_ratio) * cosine_decay(min(1.0, progress))


def param_groups(model: nn.Module, weight_decay: float,
                  decay_positions: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters in two AdamW groups: no weight decay on norms, biases and latents (1-D or
    learned-query tensors), nor on the vision position table unless `decay_positions` (decay would
    pull a sine/cosine table back to zero)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.dim() < 2 or name.endswith("latents") or (
            not decay_positions and name.endswith("position_embedding.weight"))
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def forward_batch(model: torch.nn.Module, batch: dict[str, Tensor], **kwargs: Any) -> Any:
    """The model's output on one left-padded training batch (`labelled_batch`): positions counted from
    the attention mask, so padding does not shift them, and no cache. `kwargs` go to the model
    (`labels`, `output_hidden_states`)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=positions_from_mask(batch["attention_mask"]), pixel_values=batch.get("pixel_values"),
                 pixel_attention_mask=batch.get("pixel_attention_mask"), use_cache=False, **kwargs)


def answer_loss(model: torch.nn.Module, batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, int]:
    """(mean cross-entropy over the answer tokens, their number) of one batch."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = forward_batch(model, batch).logits
    return causal_lm_loss(logits, batch["labels"]), answer_tokens(batch["labels"])


def evaluate(model: torch.nn.Module, conversations: Sequence[Conversation], processor: Idefics2Processor,
             prefix_ids: Sequence[int], path: str, batch_size: int, device: torch.device) -> float:
    """Mean answer-token loss over held-out conversations; with several processes each takes every
    world-size-th conversation and the sums are added up, so every process returns the same value.
    Every process runs the same number of forward passes (one with fewer conversations repeats the
    first and drops its loss): a sharded model gathers its layers in each one, together."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(conversations[rank::world])
    rounds = math.ceil(math.ceil(len(conversations) / world) / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, answer tokens
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(rounds):
            part = mine[i * batch_size:(i + 1) * batch_size]
            loss, n = answer_loss(model, make_batch(part or conversations[:1], processor, prefix_ids, path), device)
            if part:
                total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def start_distributed(device_name: str) -> tuple[int, int, torch.device]:
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
    grad_norm = torch.nn.utils.clip_grad_norm_(stepped, grad_clip if grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # sharded gradients (FSDP): the norm over every shard
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        total = torch.tensor(step_loss, device=device)
        dist.all_reduce(total)
        step_loss = total.item()
    return step_loss, float(grad_norm)


def shard_model(model: Idefics2ForConditionalGeneration, device: torch.device, mixed_precision: bool) -> None:
    """FSDP2 over every process, in place: each decoder layer is a unit whose weights are gathered
    just for its forward and backward, the root unit holds the rest; parameters, gradients and
    AdamW's state stay split across the processes. With `mixed_precision` the gathered weights and
    the computation are bfloat16, the gradients are reduced in float32 onto float32 master shards.

    The vision tower and the connector belong to the root unit, not one unit per vision layer: they run
    once per image shape of a micro-batch and not at all without images, so the processes would call
    a per-layer gather a different number of times (and hang); in the root they are gathered once per
    forward on every process. The root reduces a zero gradient for a parameter its process did not
    use (a micro-batch without images leaves the connector's adapters without one), as DDP's
    find_unused_parameters does.

    The processes must also reduce the units in the same order. A layer's reduction fires in the
    backward pass once the gradient of its input is computed, but only if that input requires one,
    which behind frozen embeddings holds only where image features (adapted in the connector) were
    merged in; elsewhere it would wait for the end and come after the root's. So the token embeddings'
    output is made to require a gradient.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in model.model.text_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def training_precision(device: torch.device, mixed_precision: bool) -> AbstractContextManager:
    """bfloat16 autocast for FSDP's mixed precision: a LoRA adapter casts its input to float32, which
    must meet the gathered bfloat16 adapter weights in a bfloat16 product."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision else nullcontext()
