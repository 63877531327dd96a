"""Where a run's scalars go besides history.jsonl: `--report-to tensorboard` writes the same records
(loss, grad_norm, lr, eval_loss, under those names, at their step) as TensorBoard event files in
<out-dir>/tensorboard, with the optional `tensorboard` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_TO = ("none", "tensorboard")

TENSORBOARD_DIR = "tensorboard"


class Report:
    """The history records of process 0, also sent to `report_to`. The writer is found when the run
    starts (a missing package is named before any model is loaded) and opened at the first record,
    whose step it purges from: TensorBoard then drops what an earlier run, or the part of a resumed run
    after its checkpoint, wrote from that step on, as `start_history` does for history.jsonl."""

    def __init__(self, report_to: str, folder: Path) -> None:
        if report_to not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
        self.folder = folder / TENSORBOARD_DIR
        self.writer_class: Any = None
        self.writer: Any = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError('--report-to tensorboard needs the tensorboard package: pip install '
                                 '"idefics2[tensorboard]"') from None
            self.writer_class = SummaryWriter

    def log(self, record: dict[str, Any]) -> None:
        """One history record: {"step": n, name: value, ...}."""
        if self.writer_class is None:
            return
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(self.folder), purge_step=record["step"])
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()  # as each history line is written: a killed run keeps every step it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
