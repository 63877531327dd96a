"""A run's folder: a new run never mixes with an earlier one, and a resume continues only the run that
wrote the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune import _history, checkpoint, data  # noqa: F401 - fixtures

from idefics2.finetune.command import FinetuneConfig, finetune
from idefics2.finetune.run_folder import CHECKPOINT_FILE, check_same_run, write_checkpoint


@pytest.mark.parametrize("left", ["checkpoint.pt", "history.jsonl", "adapter"])
def test_a_new_run_into_the_folder_of_another_is_refused(tmp_path: Path, left: str) -> None:
    """It used to delete the old history and replace adapter/, leaving the old checkpoint beside them."""
    path = tmp_path / left
    path.mkdir() if left == "adapter" else path.write_text("earlier run\n")
    with pytest.raises(ValueError, match=rf"--out-dir {tmp_path} already holds a run \({left}\): pass --resume to "
                                         r"continue it, --overwrite to replace it, or choose another --out-dir"):
        finetune(FinetuneConfig(model="nowhere", data="nothing.jsonl", out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [left] and (path.is_dir() or path.read_text() == "earlier run\n")


def test_overwrite_deletes_the_earlier_run(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    (tmp_path / "history.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    (tmp_path / "checkpoint.pt").write_bytes(b"stale")
    (tmp_path / "adapter").mkdir()
    finetune(FinetuneConfig(model=str(checkpoint), data=str(data), out_dir=str(tmp_path), full=True, max_steps=2,
                            threads=1, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune_config.json", "history.jsonl", "model",
                                                          "summary.json"]
    assert len(_history(tmp_path)) == 2 and 9.0 not in _history(tmp_path)


def test_a_resume_must_continue_the_run_of_the_checkpoint(tmp_path: Path) -> None:
    run = {"--batch-size": 2, "--lr": 1e-4, "processes (world size)": 2, "conversations in --data": 9}
    write_checkpoint(tmp_path, {"step": 3, "run": run})
    check_same_run(tmp_path, run)
    with pytest.raises(ValueError, match=r"in --lr \(0\.0001 in the checkpoint, 0\.001 now\); processes \(world size\) "
                                         r"\(2 in the checkpoint, 1 now\)\. Resume with that run's settings"):
        check_same_run(tmp_path, {**run, "--lr": 1e-3, "processes (world size)": 1})
    with pytest.raises(ValueError, match=r"--lora-dropout \(None in the checkpoint, 0\.1 now\)"):  # a flag added since
        check_same_run(tmp_path, {**run, "--lora-dropout": 0.1})
    write_checkpoint(tmp_path, {"step": 3, "trainable": {"w": torch.zeros(1)}})
    with pytest.raises(ValueError, match=rf"{tmp_path / CHECKPOINT_FILE} does not record the settings of its run"):
        check_same_run(tmp_path, run)


@pytest.mark.parametrize(("settings", "message"), [
    ({"resume": True, "overwrite": True}, "pass one"),
    ({"fsdp_mixed_precision": True}, "--fsdp-mixed-precision is the precision of --fsdp; pass both"),
    ({"fsdp": True, "dtype": "bfloat16"}, "--fsdp keeps float32 shards"),
    ({"fsdp": True}, "--fsdp shards the model over the processes torchrun starts; with one process, drop it"),
])
def test_settings_that_do_not_fit_together_are_refused_before_loading(tmp_path: Path, settings: dict,
                                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        finetune(FinetuneConfig(model="nowhere", data="nothing.jsonl", out_dir=str(tmp_path / "out"), **settings))
    assert not (tmp_path / "out").exists()
