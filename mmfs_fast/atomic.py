"""Every file the project writes appears whole or not at all: it is written to a temporary
file in the same folder (so that the rename stays on one file system), flushed to disk, then
renamed over the target. A writer killed midway leaves only its temporary file, named
``.<stem>.<pid>.tmp<suffix>`` (the suffix kept, for writers that pick a format from it);
the next write into that folder removes those of processes that are no longer alive.

Failures to write (read-only folder, full disk, file-size limit) are
:class:`~mmfs_fast.errors.WriteError` naming the file.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from mmfs_fast.errors import write_error

_TEMP = re.compile(r"\..+\.(\d+)\.tmp(\.[^.]*)?")


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder) -> list[Path]:
    """Remove the temporary files of dead writers in ``folder``; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def make_dirs(folder) -> Path:
    """``folder`` and its parents, as a WriteError when that is not possible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None
    return folder


_cleaned: set[Path] = set()


@contextlib.contextmanager
def writing(path) -> Iterator[Path]:
    """The temporary path to write ``path`` through, renamed over it when the block ends
    (fsynced first); removed if the block raises. OSErrors become WriteErrors."""
    path = Path(path)
    make_dirs(path.parent)
    if path.parent not in _cleaned:
        remove_stale_temps(path.parent)
        _cleaned.add(path.parent)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(binary file)``, atomically."""
    path = Path(path)
    with writing(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def save_torch(obj, path) -> Path:
    """torch.save, atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def save_pil(image, path, format: str = "PNG") -> Path:
    """A PIL image, atomically."""
    return atomic_write(path, lambda f: image.save(f, format=format))
