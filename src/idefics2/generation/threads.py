"""CPU thread tuning for decode steps: torch's intra-op thread count, chosen by timing."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_decode_threads(choice: int | None | str, device: torch.device, compile: bool) -> int | None | str:
    """The validated `decode_threads`; None on GPUs, where it means nothing, and for "auto" with
    `compile`, where trying a second thread count would compile a second graph."""
    valid_int = isinstance(choice, int) and not isinstance(choice, bool) and choice >= 1
    if not (choice is None or choice == "auto" or valid_int):
        raise ValueError(f"decode_threads must be a positive integer, None or 'auto', got {choice!r}")
    if device.type != "cpu" or (compile and choice == "auto"):
        return None
    return choice


class ThreadTuner:
    """Chooses torch's intra-op thread count for CPU decode steps by timing them.

    A decode step is ~300 small ops plus one-row matrix products. With 2 threads the products
    use both cores (`fast_linear.linear` splits them: ~1.3x faster steps on an idle machine), but
    every op that forks the thread pool (the split products, SDPA) then waits for the second
    core: microseconds when it is idle, a scheduler time slice (~8 ms, measured) when another
    process holds it, which on a shared 2-core machine is common and makes steps 10-20x slower.
    So each candidate (1 and torch's setting) is timed on two steps, the faster is kept, and the
    other is re-timed every `recheck` steps, since the load changes while generating. A
    `Generator` keeps its tuner between calls, so only its first call pays for the warm-up.
    """

    def __init__(self, candidates: Sequence[int], recheck: int = 32) -> None:
        self.candidates = sorted(set(candidates))
        self.recheck = recheck
        self.recent: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.chosen = self.candidates[0]
        self.steps = 0  # steps timed so far, over every generate call that used this tuner

    def pick(self) -> int:
        """The thread count for the next step."""
        step = self.steps
        warmup = 2 * len(self.candidates)
        if step < warmup:
            return self.candidates[step % len(self.candidates)]
        if step % self.recheck == 0:
            others = [c for c in self.candidates if c != self.chosen]
            return others[(step // self.recheck) % len(others)] if others else self.chosen
        return self.chosen

    def record(self, threads: int, seconds: float) -> None:
        """The time the step run with `threads` took."""
        self.steps += 1
        self.recent[threads] = (self.recent[threads] + [seconds])[-2:]
        timed = {c: min(t) for c, t in self.recent.items() if t}
        self.chosen = min(timed, key=timed.__getitem__)
