"""Files the evaluation writes: each one appears whole or not at all (mmfs_fast.atomic)."""
from __future__ import annotations

import json
from pathlib import Path

from mmfs_fast.atomic import write_text


def write_report(report: dict, path) -> Path:
    return write_text(path, json.dumps(report, indent=2, sort_keys=False, allow_nan=True) + "\n")
