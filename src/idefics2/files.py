"""Folders on disk: where a name leads (a local folder, the Hugging Face cache, a download), paths
that stay inside a folder, and writes that are atomic.

The lowest layer under checkpoints and processors, so that model and processor folders follow one
rule. A name that is not a local folder is looked up in the Hugging Face cache; it is downloaded
only when the caller asks (`allow_download=True`, the CLI's `--download`) or the environment says
so (`IDEFICS2_ALLOW_DOWNLOADS=1`): a mistyped local path must not fetch someone else's files.
Writes go to a temporary sibling that replaces the target in one step, so a failure or a kill at
any point leaves the previous complete folder or file in place; temporaries a killed writer left
behind are removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
DOWNLOADS_ENV = "IDEFICS2_ALLOW_DOWNLOADS"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_folder(name: str | os.PathLike[str], *, allow_download: bool | None = None) -> Path:
    """A local folder as is; a Hub repo id ("org/name") from the Hugging Face cache, else downloaded
    when allowed (`allow_download`, default: the `IDEFICS2_ALLOW_DOWNLOADS` environment variable)."""
    path = Path(name)
    if path.is_dir():
        return path
    text = os.fspath(name)
    if path.exists() or not _REPO_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not a folder: pass a folder in the Hub layout (config.json, "
                         "*.safetensors, tokenizer and processor files)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{text!r} is not a local folder (a Hub repo id needs huggingface_hub: "
                         "pip install huggingface_hub)") from None
    with contextlib.suppress(Exception):  # not in the cache
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS, local_files_only=True))
    if allow_download is None:
        allow_download = os.environ.get(DOWNLOADS_ENV, "") not in ("", "0")
    if not allow_download:
        raise ValueError(f"{text!r} is not a local folder, nor a Hub repo in the Hugging Face cache. To "
                         f"download it, pass allow_download=True (CLI: --download) or set {DOWNLOADS_ENV}=1; "
                         "if you meant a local folder, check the path")
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"could not download {text!r} from the Hub ({type(err).__name__}: {reason})") from None


def inside(folder: Path, relative: object, what: str) -> Path:
    """`folder / relative` for a relative path that stays in the folder (no absolute paths, no `..`),
    as named by a file of the folder (`what`: which file and field). Symlinks are followed as they
    are, as the Hub cache's snapshots are links into its blob store."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what}: expected a file name, got {relative!r}")
    parts = PurePosixPath(relative.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or Path(relative).is_absolute() or ":" in parts.parts[0]:
        raise ValueError(f"{what}: {relative!r} points outside the folder {folder}; only files inside it are read")
    return folder / relative


# ------------------------------------------------------------------------------------------ writes
def _temporary_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> None:
    """Remove `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` siblings of `target` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def write_folder_atomically(folder: Path, owns: Callable[[str], bool]) -> Iterator[Path]:
    """Yield a new empty folder beside `folder` to write into. When the block succeeds it replaces
    `folder`, and the old folder's entries that `owns` does not claim (a tokenizer saved beside the
    model) are carried over; when it fails it is deleted and `folder` is left as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(folder, "tmp"), dir=folder.parent))
    try:
        yield tmp
        _set_default_permissions(tmp)
        _swap_into_place(tmp, folder, owns)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomically(path: Path, data: str | bytes) -> None:
    """`path` holds `data` afterwards, or, if this fails at any point, what it held before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _set_default_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors' own temporary files) are private (0700/0600); a checkpoint should get
    the permissions any new file gets, so that it can be shared or shipped inside a package."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def _swap_into_place(new: Path, folder: Path, owns: Callable[[str], bool]) -> None:
    """Replace `folder` by the complete `new` folder in one step where the system can (Linux's
    RENAME_EXCHANGE), so that the path always holds a complete folder; elsewhere in two renames,
    the old folder kept until the new one is in place."""
    if not folder.exists():
        os.replace(new, folder)
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    for entry in folder.iterdir():  # keep the processor/tokenizer files saved beside the model
        if not owns(entry.name) and not (new / entry.name).exists():
            if entry.is_dir():
                shutil.copytree(entry, new / entry.name)
            else:
                shutil.copy2(entry, new / entry.name)
    if _exchange(new, folder):  # `new` now holds the old folder
        shutil.rmtree(new, ignore_errors=True)
        return
    backup = Path(tempfile.mkdtemp(prefix=_temporary_prefix(folder, "old"), dir=folder.parent))
    os.replace(folder, backup / folder.name)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(backup / folder.name, folder)  # put the good checkpoint back (if this fails, it stays in backup)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
