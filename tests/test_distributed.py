"""Data-parallel training (train/distributed.py) on two CPU processes (gloo): rank 0's weights
reach every rank, the gradients are averaged, and the ranks stay identical and equal one process
trained on their concatenated batch; without the all-reduce they would not.

The steps are Stage I's (its loss, optimiser step and averaging) on inputs given explicitly,
noise maps included, so that the one-process run sees exactly the ranks' samples."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmfs_fast.train.config import TrainConfig
from mmfs_fast.train.distributed import World, average_gradients, broadcast_state
from mmfs_fast.train.trainer import build_stage

RANKS, BATCH, STEPS = 2, 2, 3
# Stage I on tiny models: its trained parameters get gradients from both the L1 and the D-feature term
CONFIG = dict(stage=1, random_init=True, size=128, ngf=4, style_dim=16, n_mlp=2, d_base=8, batch_size=BATCH,
              impl="ref", workers=0, out_dir="unused")


def step_inputs(step: int, stage):
    """The whole (RANKS·BATCH) batch of one step: faces, z and every noise map."""
    g = torch.Generator().manual_seed(100 + step)
    n = RANKS * BATCH
    x = torch.rand(n, 3, 128, 128, generator=g) * 2 - 1
    z = torch.randn(n, 16, generator=g)
    noise = [torch.randn(n, 1, r, r, generator=g) for r in stage.G.noise_resolutions]
    return x, z, noise


def train_steps(stage, samples: slice) -> None:
    """STEPS reconstruction steps on ``samples`` of each batch."""
    for step in range(STEPS):
        x, z, noise = step_inputs(step, stage)
        x, z, noise = x[samples], z[samples], [n[samples] for n in noise]
        stage.reconstruction_step(lambda: stage.G(x, z=z, noise=noise), x)


def rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    try:
        world = World(rank, RANKS)
        stage = build_stage(TrainConfig(**CONFIG), world)
        if rank == 1:  # a rank that built other weights is overwritten by rank 0's
            with torch.no_grad():
                for p in stage.G.parameters():
                    p.add_(1.0)
        broadcast_state(world, stage.G)
        # the all-reduce alone: rank r's gradients (r + 1)·arange average to 1.5·arange; a None grad stays None
        params = list(stage.G.parameters())[:3]
        for p in params[1:]:
            p.grad = (rank + 1.0) * torch.arange(p.numel(), dtype=p.dtype).view_as(p)
        average_gradients(world, params)
        averaged = [p.grad for p in params]
        stage.G.zero_grad(set_to_none=True)
        train_steps(stage, slice(rank * BATCH, (rank + 1) * BATCH))
        torch.save({"averaged": averaged, "G": {k: v.clone() for k, v in stage.G.state_dict().items()}},
                   f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def one_process(samples: slice) -> tuple[dict, dict]:
    """(initial, trained) weights of G trained in this process alone, on ``samples`` of each batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage = build_stage(TrainConfig(**CONFIG))
        start = {k: v.clone() for k, v in stage.G.state_dict().items()}
        train_steps(stage, samples)
        return start, stage.G.state_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole_batch():
    return one_process(slice(None))


def trained_keys(start: dict, trained: dict) -> list[str]:
    keys = [k for k in start if not torch.equal(start[k], trained[k])]
    assert len(keys) > 10
    return keys


def test_ranks_train_like_one_process_on_the_whole_batch(tmp_path, whole_batch):
    start, single = whole_batch
    ranks = mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=RANKS, join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=max(deadline - time.monotonic(), 0)):  # True once every rank exited cleanly
        if time.monotonic() >= deadline:  # a collective that one rank never joins hangs: fail instead
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 300 s")
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    for averaged in (s["averaged"] for s in saved):
        assert averaged[0] is None
        for grad in averaged[1:]:
            torch.testing.assert_close(grad, 1.5 * torch.arange(grad.numel(), dtype=grad.dtype).view_as(grad))
    ranks = [s["G"] for s in saved]
    trained_keys(start, single)
    for k in start:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        torch.testing.assert_close(ranks[0][k], single[k], rtol=1e-5, atol=2e-6, msg=k)


def test_without_averaging_each_rank_would_drift_from_the_whole_batch(whole_batch):
    """The counter-test: a rank whose gradients were not averaged trains on its half alone, and
    the test above would see it: Adam moves each weight by about lr = 1e-3 a step."""
    start, single = whole_batch
    keys = trained_keys(start, single)
    halves = [one_process(slice(r * BATCH, (r + 1) * BATCH))[1] for r in range(RANKS)]
    for half in halves:
        assert max((half[k] - single[k]).abs().max().item() for k in keys) > 1e-4
    assert max((halves[0][k] - halves[1][k]).abs().max().item() for k in keys) > 1e-4
