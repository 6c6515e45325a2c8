"""What a run reports (rank 0 only): loss terms per step in a CSV file (and TensorBoard
when installed), sample grids, and a progress bar with ETA."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from tqdm import tqdm

from mmfs_fast import atomic
from mmfs_fast.errors import write_error
from mmfs_fast.io import image_grid, save_image

LOSSES_CSV = "losses.csv"


class Monitor:
    def __init__(self, out_dir: Path, start_step: int, total_steps: int, enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled
        self.csv_path = out_dir / LOSSES_CSV
        self.columns: list[str] | None = None
        self.writer = None
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                             desc="train")
        if enabled:
            self._drop_rows_after(start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their old rows (and a
        row cut short by a kill), replacing the file atomically."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            self.columns = rows[0]
            kept = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= step]
            text = io.StringIO()
            csv.writer(text).writerows(kept)
            atomic.write_text(self.csv_path, text.getvalue())

    def log(self, step: int, losses: dict[str, float]) -> None:
        """Losses of the step just finished (``step`` counts from 1)."""
        if self.enabled:
            self.progress.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
        self.progress.update(1)
        if not self.enabled:
            return
        if self.columns is None:
            self.columns = ["step", *losses]
            text = io.StringIO()
            csv.writer(text).writerow(self.columns)
            atomic.write_text(self.csv_path, text.getvalue())
        # one row appended per step (rewriting the file each step would cost O(steps)); a row a
        # kill cuts short is dropped when the run resumes
        try:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow([step] + [repr(losses.get(name, float("nan"))) for name in self.columns[1:]])
        except OSError as e:
            raise write_error(self.csv_path, e) from None
        if self.writer is not None:
            for name, value in losses.items():
                self.writer.add_scalar(f"loss/{name}", value, step)

    def save_samples(self, step: int, rows: list[torch.Tensor]) -> Path | None:
        """One PNG: each (B, 3, H, W) batch of ``rows`` is a row of the grid."""
        if not self.enabled:
            return None
        images = [img for row in rows for img in row]
        return save_image(image_grid(images, columns=rows[0].shape[0]), self.out_dir / "samples" / f"{step:07d}.png")

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
