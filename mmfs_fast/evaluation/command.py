"""``mmfs-fast eval``: the metrics of a checkpoint, or a gate between two precisions/backends."""
from __future__ import annotations

from pathlib import Path

METRICS = ("fid", "arcface", "lpips")
PRECISIONS = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
IMPLS = ("auto", "ref", "cuda", "triton")


def add_cli_parser(subparsers) -> None:
    from mmfs_fast.commands.common import add_trust_options

    p = subparsers.add_parser(
        "eval", help="quality metrics (FID, ArcFace distance, LPIPS diversity, CLIP scores) from local weights",
        description="Stylize --samples faces with random styles and measure them: FID against --real, "
                    "ArcFace distance to the input face, LPIPS between two random stylizations of a face; "
                    "CLIP scores for --text/--ref styles. --compare A,B measures two precisions or backends "
                    "of the model and their per-image difference. Nothing is downloaded.")
    p.add_argument("--ckpt", help="MMFS checkpoint (official .pt/.pth or mmfs_fast .safetensors)")
    p.add_argument("--random-init", action="store_true", help="a random model (meaningless numbers): tests only")
    p.add_argument("--faces", required=True, help="folder of aligned input faces (cycled if fewer than --samples)")
    p.add_argument("--real", help="folder of real style images, or an .npz of their FID statistics")
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--diversity-samples", type=int, help="samples LPIPS diversity uses (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default=",".join(METRICS),
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all)")
    p.add_argument("--inception-weights", help="FID Inception: pt_inception-2015-12-05-6726825d.pth (pytorch-fid)")
    p.add_argument("--arcface-weights", help="ArcFace: arcface_torch iresnet backbone.pth (insightface)")
    p.add_argument("--lpips-weights", help="LPIPS linear layers: alex.pth or vgg.pth from the lpips package")
    p.add_argument("--lpips-backbone", help="torchvision alexnet-owt-7be5be79.pth or vgg16-397923af.pth")
    p.add_argument("--text", action="append", default=[], help="a text style to CLIP-score (repeatable)")
    p.add_argument("--ref", action="append", default=[], help="a reference style image to CLIP-score (repeatable)")
    p.add_argument("--clip-weights", help="CLIP ViT-B/32 (OpenAI ViT-B-32.pt) for --text/--ref")
    add_trust_options(p)
    p.add_argument("--style-samples", type=int, default=100, help="faces per --text/--ref style")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", help="rendering precision (default: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--impl", default="auto", choices=IMPLS, help="op backend")
    p.add_argument("--compare", help="two renderings of the model, e.g. fp32,fp16 or ref,cuda or fp16:ref,fp16:cuda")
    p.add_argument("--max-lpips-diff", type=float, help="with --compare: fail (exit 1) if an image pair's LPIPS "
                                                        "exceeds this")
    p.add_argument("--max-pixel-diff", type=float, help="with --compare: fail (exit 1) if a pixel differs by more "
                                                        "(in [-1, 1] units)")
    p.add_argument("--cache-dir", help="feature cache (default: <out without suffix>.cache)")
    p.add_argument("--out", default="report.json", help="the report (JSON, written atomically)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def parse_variant(spec: str, dtype, impl) -> dict:
    """'fp16', 'cuda' or 'fp16:cuda' → {"dtype", "impl"}, the unnamed part from the defaults."""
    variant = {"dtype": dtype, "impl": impl}
    for token in filter(None, spec.strip().split(":")):
        if token in PRECISIONS:
            variant["dtype"] = token
        elif token in IMPLS:
            variant["impl"] = token
        else:
            raise ValueError(f"--compare: {token!r} is neither a precision ({', '.join(PRECISIONS)}) "
                             f"nor a backend ({', '.join(IMPLS)})")
    return variant


def main(args) -> int:
    """Run ``mmfs-fast eval``; bad options or weights raise the CLI's UsageError (exit 2)."""
    import warnings

    from mmfs_fast.api import MMFS
    from mmfs_fast.commands.common import EXIT_OK, EXIT_SOME_FAILED, RANDOM_INIT_BANNER, UsageError, as_usage_error, err
    from mmfs_fast.encoders import EncoderWeightsError
    from mmfs_fast.evaluation.report import write_report
    from mmfs_fast.evaluation.runner import MetricNetworks, evaluate
    from mmfs_fast.evaluation.weights import MetricWeightsError, sha256
    from mmfs_fast.io import ImageError
    from mmfs_fast.models import CheckpointError

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise UsageError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if args.ckpt is None and not args.random_init:
        raise UsageError("no model: pass --ckpt <MMFS checkpoint> (or --random-init for a pipeline test)")
    if "fid" in metrics and args.real is None:
        raise UsageError("FID needs the real style images: --real <folder or .npz> (or leave fid out of --metrics)")
    if (args.text or args.ref) and not (args.clip_weights or args.random_init):
        raise UsageError("--text and --ref need CLIP: pass --clip-weights ViT-B-32.pt")
    if args.compare and not metrics:
        raise UsageError("--compare measures the sampled stylizations: keep at least one of --metrics")
    if args.max_lpips_diff is not None or args.max_pixel_diff is not None:
        if not args.compare:
            raise UsageError("--max-lpips-diff and --max-pixel-diff gate a --compare run")
    try:
        variants = {"model": {"dtype": args.dtype, "impl": args.impl}}
        if args.compare:
            specs = [s.strip() for s in args.compare.split(",")]
            if len(specs) != 2 or specs[0] == specs[1]:
                raise ValueError(f"--compare takes two different variants, e.g. fp32,fp16; got {args.compare!r}")
            variants = {s: parse_variant(s, args.dtype, args.impl) for s in specs}
    except ValueError as e:
        raise as_usage_error(e) from e

    given = {"fid": [("--inception-weights", args.inception_weights)],
             "arcface": [("--arcface-weights", args.arcface_weights)],
             "lpips": [("--lpips-weights", args.lpips_weights), ("--lpips-backbone", args.lpips_backbone)]}
    files = {flag: path for m in metrics for flag, path in given[m]}
    missing = [(m, flag) for m in metrics for flag, path in given[m] if path is None]
    if missing:
        raise UsageError("; ".join(f"{m} needs {flag}: {_how_to_get(flag)}" for m, flag in missing)
                         + " Nothing is downloaded (or leave the metric out of --metrics).")
    try:
        nets = MetricNetworks.from_files(files.get("--inception-weights"), files.get("--arcface-weights"),
                                         files.get("--lpips-weights"), files.get("--lpips-backbone"))
    except MetricWeightsError as e:
        raise as_usage_error(e) from e

    if args.random_init:
        err(RANDOM_INIT_BANNER)
        warnings.filterwarnings("ignore", message="mmfs_fast: RANDOM-INITIALISED")
    models, info = {}, {}
    ckpt_hash = sha256(args.ckpt) if args.ckpt else None
    for name, variant in variants.items():
        try:
            models[name] = MMFS.load(args.ckpt, args.clip_weights, device=args.device, dtype=variant["dtype"],
                                     impl=variant["impl"], random_init=args.random_init,
                                     allow_cast=args.allow_cast, trust_torchscript=args.trust_torchscript)
        except (CheckpointError, EncoderWeightsError, ValueError, RuntimeError, TypeError) as e:
            raise (UsageError(f"{name}: {e}") if args.compare else as_usage_error(e)) from e
        info[name] = {"ckpt": args.ckpt, "ckpt_sha256": ckpt_hash, "random_init": args.random_init}
        if args.clip_weights:
            info[name]["clip_weights"] = {"path": args.clip_weights, "sha256": sha256(args.clip_weights)}

    out = Path(args.out)
    styles = [{"text": t} for t in args.text] + [{"ref": r} for r in args.ref]
    try:
        report = evaluate(models if args.compare else models["model"], args.faces, args.real, nets,
                          samples=args.samples, seed=args.seed, diversity_samples=args.diversity_samples,
                          styles=styles, style_samples=args.style_samples, batch_size=args.batch_size,
                          cache_dir=args.cache_dir or out.with_suffix(".cache"), model_info=info,
                          progress=not args.no_progress)
    except (ValueError, ImageError) as e:
        raise as_usage_error(e) from e
    status = EXIT_OK
    if args.compare:
        gate = _gate(report["difference"], args.max_lpips_diff, args.max_pixel_diff)
        report["difference"]["gate"] = gate
        status = EXIT_OK if gate["passed"] else EXIT_SOME_FAILED
    write_report(report, out)
    err(f"wrote {out}" + ("" if status == EXIT_OK else ": the --compare gate FAILED"))
    return status


def _how_to_get(flag: str) -> str:
    from mmfs_fast.evaluation import arcface, fid, lpips

    return {"--inception-weights": fid.HOW_TO_GET, "--arcface-weights": arcface.HOW_TO_GET,
            "--lpips-weights": lpips.HEADS_HOW_TO_GET, "--lpips-backbone": lpips.BACKBONE_HOW_TO_GET}[flag]


def _gate(difference: dict, max_lpips, max_pixel) -> dict:
    checks = {}
    if max_lpips is not None:
        if "lpips" not in difference:
            checks["lpips"] = {"limit": max_lpips, "passed": False, "why": "no LPIPS network (--lpips-weights)"}
        else:
            checks["lpips"] = {"limit": max_lpips, "worst": difference["lpips"]["max"],
                               "passed": difference["lpips"]["max"] <= max_lpips}
    if max_pixel is not None:
        worst = difference["pixel_max_abs"]["max"]
        checks["pixel"] = {"limit": max_pixel, "worst": worst, "passed": worst <= max_pixel}
    return {"checks": checks, "passed": all(c["passed"] for c in checks.values())}
