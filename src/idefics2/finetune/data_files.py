"""The files fine-tuning data comes in, read as records: JSON Lines (a record a line), a JSON array of
records, a Parquet file, or a folder written by `datasets`' `save_to_disk` (the last two with the
`datasets` extra). What a record must hold is `data`'s concern; here a file that cannot be read is
a ValueError naming the file and, for JSON Lines, the line."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATASETS_EXTRA = 'pip install "idefics2[datasets]"'


def _optional(module: str, what: str) -> Any:
    """An optional dependency, or a ValueError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs the datasets extra: {DATASETS_EXTRA}") from None


def _saved_dataset(folder: Path) -> Any:
    """A folder of `save_to_disk` as one Arrow table (memory-mapped, nothing copied); a DatasetDict's
    folder is refused naming its splits, each of which is a data set folder of its own."""
    datasets = _optional("datasets", f"--data {folder} (a folder: a data set saved by datasets)")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        raise ValueError(f"{folder} is a folder but not a data set written by datasets' save_to_disk "
                         "(dataset_info.json, state.json and Arrow files)") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        raise ValueError(f"{folder} holds the splits {splits} of a DatasetDict; pass one of them, e.g. "
                         f"{folder / splits[0]}")
    return loaded.with_format("arrow")[:]


def _parquet(path: Path) -> Any:
    parquet = _optional("pyarrow.parquet", f"--data {path} (a Parquet file)")
    try:
        return parquet.read_table(path)
    except Exception as err:  # pyarrow's ArrowInvalid and OSError, whichever part of the file is broken
        raise ValueError(f"{path}: cannot read it as Parquet ({err})") from None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of each non-blank line; a line that is not JSON names its number."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def _json_array(path: Path) -> list[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def read_records(path: Path) -> Iterator[tuple[Any, Any, int | None, int]]:
    """(record, the Arrow table holding it or None, its row in a table or array or None, its line in a
    JSON Lines file or 0) for every record of the data, whatever form it comes in."""
    if path.is_dir() or path.suffix == ".parquet":
        table = _saved_dataset(path) if path.is_dir() else _parquet(path)
        rows = (record for batch in table.to_batches(max_chunksize=256) for record in batch.to_pylist())
        yield from ((record, table, row, 0) for row, record in enumerate(rows))
    elif path.suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):  # else lines
        yield from ((record, None, row, 0) for row, record in enumerate(_json_array(path)))
    else:
        yield from ((record, None, None, line) for line, record in _json_lines(path))
