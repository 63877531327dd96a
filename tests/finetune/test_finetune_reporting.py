"""`finetune --report-to tensorboard`: the event file holds history.jsonl's scalars, read back with
TensorBoard's own reader; a resumed run's events replace those after its checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_finetune import checkpoint, data  # noqa: F401 - fixtures

from idefics2.finetune.command import FinetuneConfig, finetune
from idefics2.finetune.reporting import TENSORBOARD_DIR, Report

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    reader = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def _from_history(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """history.jsonl's scalars as TensorBoard stores them (float32)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                scalars.setdefault(name, []).append((record["step"], float(np.float32(value))))
    return scalars


def test_the_event_file_holds_the_history(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    finetune(
        FinetuneConfig(
            model=str(checkpoint),
            data=str(data),
            eval_data=str(data),
            eval_every=3,
            out_dir=str(tmp_path),
            lora_r=4,
            lr=1e-2,
            warmup_steps=2,
            max_steps=6,
            lr_schedule="linear",
            min_lr_ratio=0.0,
            batch_size=2,
            threads=1,
            report_to="tensorboard",
        )
    )
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    events = _events(tmp_path / TENSORBOARD_DIR)
    assert set(events) == {"loss", "grad_norm", "lr", "eval_loss"}
    assert events == _from_history(history)
    assert [step for step, _ in events["eval_loss"]] == [3, 6]
    # the rates of the run: transformers' linear schedule with warm-up, step by step
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=2, num_training_steps=6
    )
    expected = []
    for _ in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [r["lr"] for r in history] == pytest.approx(expected, abs=1e-15)


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(tmp_path: Path) -> None:
    """As history.jsonl drops the records after the checkpoint, the events from the first step logged on
    are purged: a run killed after step 4 with its checkpoint at step 2 shows steps 1-2, then the new 3-5."""
    first = Report("tensorboard", tmp_path)
    for step in range(1, 5):
        first.log({"step": step, "loss": 10.0 + step})
    first.close()
    resumed = Report("tensorboard", tmp_path)
    for step in range(3, 6):
        resumed.log({"step": step, "loss": 20.0 + step})
    resumed.close()
    assert _events(tmp_path / TENSORBOARD_DIR) == {
        "loss": [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]
    }
    Report("none", tmp_path / "quiet").log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "quiet").exists()


def test_a_missing_tensorboard_is_named_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    with pytest.raises(
        ValueError, match=r'needs the tensorboard package: pip install "idefics2\[tensorboard\]"'
    ):
        finetune(FinetuneConfig(model="nowhere", data="nothing.jsonl", report_to="tensorboard"))
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, got 'wandb'"):
        Report("wandb", Path("nowhere"))
