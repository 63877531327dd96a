"""Reading safetensors shards tensor by tensor: through the memory map, or copied one at a time.

`checkpoint` loads through these. Every failure to read is a ValueError naming the file (and the
tensor), whatever safetensors or the OS raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# One source of weights: its keys and a function reading one of them (a safetensors shard, a state dict).
Shard = tuple[list[str], Callable[[str], torch.Tensor]]


@contextlib.contextmanager
def _safe_open(file: Path) -> Iterator[Any]:
    """A safetensors file opened for reading; a file that is not one is a ValueError naming it."""
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as err:  # SafetensorError and OSError alike: empty, truncated, garbage
        raise ValueError(f"{file} is not a readable safetensors file ({' '.join(str(err).split())[:200]})") from None
    with handle as f:
        yield f


# safetensors' dtype names -> torch's, for the tensors `copied_shard` reads itself.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@contextlib.contextmanager
def copied_shard(file: Path) -> Iterator[Shard]:
    """A shard whose tensors are each read into memory of their own (a positioned file read), where
    `mapped_shard`'s are views of safetensors' memory map. A load that quantizes reads every weight
    once and keeps only its quantized form: through the map, every page read would stay resident in
    the process until the shard is closed (~5 GB per shard of idefics2-8b); a copy is freed as soon
    as its weight is quantized. The header is the one safetensors has just validated."""
    keys = shard_keys(file)
    with open(file, "rb") as raw:
        size = int.from_bytes(raw.read(8), "little")
        header = json.loads(raw.read(size))
        start = 8 + size

        def get_tensor(key: str) -> torch.Tensor:
            info = header[key]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{file}: tensor {key!r} has dtype {info['dtype']}; expected one of "
                                 f"{sorted(_SAFETENSORS_DTYPES)}")
            begin, end = info["data_offsets"]
            data = bytearray(end - begin)
            if os.preadv(raw.fileno(), [data], start + begin) != len(data):
                raise ValueError(f"{file}: tensor {key!r} is cut short (the file is truncated)")
            if not data:
                return torch.empty(info["shape"], dtype=dtype)
            return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])

        yield keys, get_tensor


def shard_keys(file: Path) -> list[str]:
    with _safe_open(file) as f:
        return list(f.keys())


@contextlib.contextmanager
def mapped_shard(file: Path) -> Iterator[Shard]:
    """A shard whose tensors are views of safetensors' memory map: nothing is copied until used."""
    with _safe_open(file) as f:
        yield list(f.keys()), lambda key: _read(f, file, key)


def _read(f: Any, file: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as err:
        raise ValueError(f"{file}: cannot read tensor {key!r} ({' '.join(str(err).split())[:200]})") from None


TRIM_EVERY = 2**29  # bytes of float weights quantized between two `release_freed_memory` calls


def release_freed_memory() -> None:
    """Return the free pages inside the C heap to the system (glibc's `malloc_trim`; elsewhere
    nothing). Quantizing while loading frees a float copy and its temporaries per weight while
    small tensors that stay (norms, biases) are allocated between them, so the heap cannot shrink
    from its top: loading idefics2-8b in int8 ended 3 GiB above the 8.5 GiB the model holds,
    and 0.3 GiB above it with a trim every 512 MiB quantized."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
