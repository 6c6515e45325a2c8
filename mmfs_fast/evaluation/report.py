"""Files the evaluation writes: each one appears whole or not at all (temporary file, then rename)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_report(report: dict, path) -> Path:
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))
