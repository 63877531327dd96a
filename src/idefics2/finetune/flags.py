"""Command-line flags from a config dataclass, and the range checks every training config makes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any


def check_flag_ranges(config: Any, positive: Sequence[str], non_negative: Sequence[str] = ()) -> None:
    """A ValueError naming the `--flag` of the first config field out of range (None, unset, passes), and
    the shared check of `min_lr_ratio` in [0, 1]: the checks `train` and `finetune` both make."""
    for names, in_range, expected in ((positive, lambda v: v > 0, "positive"),
                                      (non_negative, lambda v: v >= 0, "0 or more")):
        for name in names:
            value = getattr(config, name)
            if value is not None and not in_range(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {config.min_lr_ratio}")


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, helps: dict[str, str], *,
                     required: Sequence[str] = (), choices: dict[str, list[str]] | None = None,
                     floats: Sequence[str] = (), ints: Sequence[str] = (),
                     switches: Sequence[str] = ()) -> None:
    """One `--flag` per field of a config dataclass: booleans are switches, and `switches` names fields
    whose default None means "as the files say" (`--flag` True, `--no-flag` False); the rest take a value of
    the default's type (`floats`/`ints` name fields whose default is None), and `--help` shows the default."""
    defaults = config_class()
    for f in fields(config_class):
        flag, default, text = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), helps.get(f.name, "")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=text)
        elif f.name in switches:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name in required:
            parser.add_argument(flag, required=True, help=text)
        elif choices and f.name in choices:
            parser.add_argument(flag, choices=choices[f.name], default=default, help=text)
        else:
            kind = float if isinstance(default, float) or f.name in floats else (
                int if isinstance(default, int) or f.name in ints else str)
            parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})".strip())


def run_as_script(prog: str, command: str, register: Callable[[Any], argparse.ArgumentParser],
                  argv: Sequence[str] | None) -> None:
    """`prog ARGS` (e.g. `python -m idefics2.finetune`) runs what `idefics2 <command> ARGS` runs:
    `register` adds the command to a parser's subparsers, as the CLI does."""
    parser = argparse.ArgumentParser(prog=prog)
    register(parser.add_subparsers(required=True))
    args = parser.parse_args([command, *(argv if argv is not None else sys.argv[1:])])
    args.func(args)
