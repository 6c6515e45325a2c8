"""The evaluation run: stylize sampled faces with random styles, stream them through the
metric networks, and collect every number in a report.

Sample ``i`` is face ``i mod len(faces)`` with a style z and noise maps drawn from seeds
derived from (seed, i) alone, so any sample can be recomputed on its own, whatever the
batch size, and a run can resume from its cached chunks. Images are measured as an 8-bit
PNG of them would hold them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import mmfs_fast
from mmfs_fast import io
from mmfs_fast.evaluation import arcface, fid
from mmfs_fast.evaluation.clip_score import clip_score, clip_target
from mmfs_fast.evaluation.lpips import LPIPS
from mmfs_fast.atomic import atomic_write
from mmfs_fast.evaluation.weights import sha256

CHUNK = 256  # samples per cached chunk: what an interrupted run loses at most
# draws per sample: the FID/ArcFace stylization, LPIPS diversity's second one, the CLIP-style noise
DRAW_MAIN, DRAW_SECOND, DRAW_CLIP = 0, 1, 2


@dataclass
class MetricNetworks:
    """The networks the metrics need (None: that metric is not computed) and, for the
    report, the weight files they came from."""
    inception: nn.Module | None = None
    arcface: nn.Module | None = None
    lpips: nn.Module | None = None
    weights: dict = field(default_factory=dict)

    @classmethod
    def from_files(cls, inception=None, arcface_weights=None, lpips_weights=None, lpips_backbone=None):
        """Load the networks whose files are given (paths or None)."""
        nets = cls(inception=fid.FIDInception.from_file(inception) if inception else None,
                   arcface=arcface.IResNet.from_file(arcface_weights) if arcface_weights else None,
                   lpips=LPIPS.from_files(lpips_weights, lpips_backbone) if lpips_weights or lpips_backbone
                   else None)
        for name, path in (("inception", inception), ("arcface", arcface_weights), ("lpips", lpips_weights),
                           ("lpips_backbone", lpips_backbone)):
            if path:
                nets.weights[name] = {"path": str(path), "sha256": sha256(path)}
        return nets

    def to(self, device) -> "MetricNetworks":
        for name in ("inception", "arcface", "lpips"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device=device, dtype=torch.float32))
        return self


def sample_seeds(seed: int, index: int, draw: int) -> tuple[int, int]:
    """(style seed, noise seed) of one sample's draw, independent streams from (seed, index, draw)."""
    z_seed, noise_seed = np.random.SeedSequence([seed, index, draw]).generate_state(2)
    return int(z_seed), int(noise_seed)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the 8-bit levels a saved PNG holds (SPEC §1), still in [-1, 1]."""
    return ((images.float() * 0.5 + 0.5).clamp(0, 1) * 255).round() / 127.5 - 1


def render_samples(mmfs, faces: torch.Tensor, indices, seed: int, draw: int, w_plus=None) -> torch.Tensor:
    """Stylize ``faces`` as samples ``indices`` (random z per sample unless ``w_plus``)."""
    seeds = [sample_seeds(seed, i, draw) for i in indices]
    maps = [mmfs.random_noise(1, torch.Generator().manual_seed(noise_seed)) for _, noise_seed in seeds]
    noise = [torch.cat(per_res) for per_res in zip(*maps)]
    style = mmfs.style_from_seed([z_seed for z_seed, _ in seeds]) if w_plus is None else w_plus
    return mmfs.render(faces, style, noise)


def fingerprint(*parts) -> str:
    """A hash of tensors (modules' state dicts) and JSON-able values: names the cache entries."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            for key, tensor in part.state_dict().items():
                digest.update(key.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in io.IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(io.IMAGE_SUFFIXES)})")
    return files


def _load_faces(files, indices, size: int, device) -> torch.Tensor:
    return torch.stack([io.load_image(files[i % len(files)], size) for i in indices]).to(device)


def _summary(values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "count": int(values.size)} if values.size else {"count": 0}


# -- reference statistics -----------------------------------------------------
def reference_stats(real, inception: nn.Module, size: int, cache_dir, batch_size: int = 16,
                    device="cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of the real style images: an .npz of statistics as it is, else a
    folder, whose statistics are cached in ``cache_dir`` (keyed by the files, their sizes and
    times, the network and the size)."""
    if Path(real).suffix == ".npz":
        return fid.load_stats(real)
    files = list_images(real)
    listing = [(str(p.relative_to(real)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cached = Path(cache_dir) / f"real-{fingerprint(inception, listing, size)}.npz"
    if cached.is_file():
        return fid.load_stats(cached)
    stats = fid.GaussianStats()
    with torch.no_grad(), tqdm(total=len(files), unit="img", desc="real images", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            batch = _load_faces(files, range(start, min(start + batch_size, len(files))), size, device)
            stats.update(inception(quantize(batch) * 0.5 + 0.5).cpu().numpy())
            bar.update(batch.shape[0])
    stats.save(cached, folder=str(real))
    return stats.mean, stats.cov, stats.count


# -- the sampled stylizations -------------------------------------------------
def _measure_chunk(models: dict, files, nets: MetricNetworks, start: int, end: int, seed: int,
                   diversity_samples: int, batch_size: int, bar) -> dict[str, np.ndarray]:
    """Per-sample numbers of samples [start, end) for every model (and their differences)."""
    out: dict[str, list] = {}
    names = list(models)
    for first in range(start, end, batch_size):
        indices = list(range(first, min(first + batch_size, end)))
        images, loaded = {}, _load_faces(files, indices, next(iter(models.values())).size, "cpu")
        for j, (name, mmfs) in enumerate(models.items()):
            faces = loaded.to(mmfs.device)
            raw = render_samples(mmfs, faces, indices, seed, DRAW_MAIN)
            images[name] = raw
            shown = quantize(raw)
            if nets.inception is not None:
                out.setdefault(f"{j}.features", []).append(nets.inception(shown * 0.5 + 0.5).cpu().numpy())
            if nets.arcface is not None:
                out.setdefault(f"{j}.identity", []).append(
                    arcface.identity_distance(nets.arcface, faces, shown).cpu().numpy())
            diverse = [k for k, i in enumerate(indices) if i < diversity_samples]
            if nets.lpips is not None and diverse:
                second = quantize(render_samples(mmfs, faces[diverse], [indices[k] for k in diverse], seed,
                                                 DRAW_SECOND))
                out.setdefault(f"{j}.diversity", []).append(nets.lpips(shown[diverse], second).cpu().numpy())
        if len(names) == 2:
            a, b = (images[n].float().cpu() for n in names)
            diff = (a - b).abs().flatten(1)
            out.setdefault("pixel_mean_abs", []).append(diff.mean(1).numpy())
            out.setdefault("pixel_max_abs", []).append(diff.amax(1).numpy())
            if nets.lpips is not None:
                out.setdefault("lpips_between", []).append(
                    nets.lpips(quantize(images[names[0]]), quantize(images[names[1]])).cpu().numpy())
        bar.update(len(indices))
    return {k: np.concatenate(v) for k, v in out.items()}


def measure_samples(models: dict, files, nets: MetricNetworks, samples: int, seed: int, diversity_samples: int,
                    batch_size: int, cache_dir, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-sample numbers of samples [0, samples), computed in chunks of :data:`CHUNK` that are
    cached (atomically) as they finish, so a rerun resumes where an interrupted one stopped."""
    key = fingerprint(*(m.stylizer for m in models.values()), [_model_facts(m) for m in models.values()],
                      nets.inception, nets.arcface, nets.lpips,
                      [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files], seed, diversity_samples)
    folder = Path(cache_dir) / f"samples-{key}"
    parts = []
    with torch.no_grad(), tqdm(total=samples, unit="img", desc="stylized samples", disable=not progress) as bar:
        for start in range(0, samples, CHUNK):
            end = min(start + CHUNK, samples)
            path = folder / f"{start:08d}-{end:08d}.npz"
            if path.is_file():
                with np.load(path) as cached:
                    parts.append(dict(cached))
                bar.update(end - start)
                continue
            chunk = _measure_chunk(models, files, nets, start, end, seed, diversity_samples, batch_size, bar)
            atomic_write(path, lambda f: np.savez(f, **chunk))
            parts.append(chunk)
    # chunks past diversity_samples have no diversity entries
    return {k: np.concatenate([p[k] for p in parts if k in p]) for k in dict.fromkeys(k for p in parts for k in p)}


# -- text and reference styles ------------------------------------------------
def style_scores(mmfs, files, nets: MetricNetworks, styles: list[dict], count: int, seed: int,
                 batch_size: int, progress: bool = True) -> list[dict]:
    """For each style ({"text": ...} or {"ref": path}): the CLIP score (cosine between the
    stylized faces and the prompt in CLIP space) and the ArcFace distance, over ``count`` faces."""
    results = []
    for style in styles:
        target = clip_target(mmfs.clip, **style)
        w_plus = mmfs.style(**style)
        scores, identity = [], []
        desc = f"style {style.get('text') or Path(style['ref']).name}"
        with torch.no_grad(), tqdm(total=count, unit="img", desc=desc, disable=not progress) as bar:
            for first in range(0, count, batch_size):
                indices = list(range(first, min(first + batch_size, count)))
                faces = _load_faces(files, indices, mmfs.size, mmfs.device)
                shown = quantize(render_samples(mmfs, faces, indices, seed, DRAW_CLIP, w_plus))
                scores.append(clip_score(mmfs.clip, shown, target).cpu().numpy())
                if nets.arcface is not None:
                    identity.append(arcface.identity_distance(nets.arcface, faces, shown).cpu().numpy())
                bar.update(len(indices))
        entry = {**{k: str(v) for k, v in style.items()}, "clip_score": _summary(np.concatenate(scores))}
        if identity:
            entry["arcface_distance"] = _summary(np.concatenate(identity))
        results.append(entry)
    return results


# -- the whole run ------------------------------------------------------------
def _model_facts(mmfs) -> dict:
    engine = mmfs.engine
    impls = sorted({m.impl for m in mmfs.stylizer.modules() if hasattr(m, "impl")})
    return {"precision": engine.precision if engine is not None else str(mmfs.dtype).removeprefix("torch."),
            "impl": impls[0] if len(impls) == 1 else impls, "engine": engine is not None,
            "device": str(mmfs.device), "size": mmfs.size, "config": str(mmfs.config)}


def evaluate(models, faces, real=None, networks: MetricNetworks | None = None, samples: int = 10000,
             seed: int = 0, diversity_samples: int | None = None, styles=(), style_samples: int = 100,
             batch_size: int = 16, cache_dir="eval-cache", model_info: dict | None = None,
             progress: bool = True) -> dict:
    """Evaluate one MMFS (or, for a precision/backend gate, a dict of two) and return the report.

    models: an :class:`mmfs_fast.MMFS` or {name: MMFS}. faces: a folder or a list of face
    images (cycled when ``samples`` is larger). real: a folder of real style images or an
    .npz of their statistics (needed for FID). networks: which metrics to compute.
    diversity_samples: how many samples LPIPS diversity uses (default all). styles: text/
    reference styles for CLIP scores, as {"text": ...} / {"ref": path}. model_info: extra facts
    per model for the report (checkpoint path and hash, op backend).
    """
    models = {"model": models} if not isinstance(models, dict) else dict(models)
    if not 1 <= len(models) <= 2:
        raise ValueError(f"evaluate one model or compare two, got {len(models)}")
    if samples < 2 or batch_size < 1:
        raise ValueError(f"samples must be >= 2 (a covariance) and batch_size >= 1, got {samples}, {batch_size}")
    nets = networks or MetricNetworks()
    measured = any(net is not None for net in (nets.inception, nets.arcface, nets.lpips))
    if not (measured or styles):
        raise ValueError("nothing to measure: give the networks of at least one metric, or styles for CLIP scores")
    if nets.inception is not None and real is None:
        raise ValueError("FID needs the real style images: real=<folder or .npz of statistics>")
    files = list_images(faces) if isinstance(faces, (str, Path)) else [Path(f) for f in faces]
    diversity_samples = samples if diversity_samples is None else min(diversity_samples, samples)
    if len({(m.size, str(m.device)) for m in models.values()}) != 1:
        raise ValueError("models compared must have the same size and device")
    device = next(iter(models.values())).device
    nets.to(device)

    report = {"mmfs_fast": mmfs_fast.__version__, "samples": samples, "seed": seed,
              "diversity_samples": diversity_samples if nets.lpips is not None else 0,
              "faces": {"source": str(faces) if isinstance(faces, (str, Path)) else "list", "count": len(files)},
              "weights": nets.weights, "sample_protocol": "sample i: face i mod count, z and noise from "
              "numpy SeedSequence([seed, i, draw]); images rounded to 8 bits before every metric"}
    real_stats = None
    if nets.inception is not None:
        real_stats = reference_stats(real, nets.inception, next(iter(models.values())).size, cache_dir, batch_size,
                                     device, progress)
        report["real"] = {"source": str(real), "count": real_stats[2]}
    numbers = measure_samples(models, files, nets, samples, seed, diversity_samples, batch_size, cache_dir,
                              progress) if measured else {}
    runs = []
    for j, (name, mmfs) in enumerate(models.items()):
        metrics = {}
        if real_stats is not None:
            stats = fid.GaussianStats()
            stats.update(numbers[f"{j}.features"])
            metrics["fid"] = fid.frechet_distance(stats.mean, stats.cov, real_stats[0], real_stats[1])
        if nets.arcface is not None:
            metrics["arcface_distance"] = _summary(numbers[f"{j}.identity"])
        if nets.lpips is not None:
            metrics["lpips_diversity"] = _summary(numbers.get(f"{j}.diversity", np.zeros(0)))
        if styles:
            metrics["styles"] = style_scores(mmfs, files, nets, list(styles), style_samples, seed, batch_size,
                                             progress)
        runs.append({"name": name, "model": {**_model_facts(mmfs), **(model_info or {}).get(name, {})},
                     "metrics": metrics})
    report["runs"] = runs
    if len(models) == 2 and measured:
        report["difference"] = {
            "pixel_mean_abs": _summary(numbers["pixel_mean_abs"]), "pixel_max_abs": _summary(numbers["pixel_max_abs"]),
            "units": "[-1, 1] image values of the unrounded outputs (1.0 = 127.5 levels of 8 bits)"}
        if "lpips_between" in numbers:
            report["difference"]["lpips"] = _summary(numbers["lpips_between"])
        report["difference"]["metrics"] = _metric_deltas(runs[0]["metrics"], runs[1]["metrics"])
    return report


def _metric_deltas(a: dict, b: dict) -> dict:
    """second − first for every headline number both runs have."""
    def headline(metrics):
        out = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in metrics.items()
               if k != "styles" and (not isinstance(v, dict) or "mean" in v)}
        for s in metrics.get("styles", []):
            out[f"clip_score[{s.get('text', s.get('ref'))}]"] = s["clip_score"]["mean"]
        return out
    ha, hb = headline(a), headline(b)
    return {k: hb[k] - ha[k] for k in ha if k in hb and not (math.isnan(ha[k]) or math.isnan(hb[k]))}
