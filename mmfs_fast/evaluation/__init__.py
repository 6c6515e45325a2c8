"""Quality metrics of the MMFS paper from local weights: FID (Inception-v3 pool3), ArcFace
identity distance, LPIPS diversity and CLIP scores, plus a precision/backend gate that
compares two renderings of the same model image by image.

    from mmfs_fast import MMFS
    from mmfs_fast.evaluation import MetricNetworks, evaluate, write_report
    nets = MetricNetworks.from_files("pt_inception-2015-12-05-6726825d.pth", "backbone.pth", "alex.pth",
                                     "alexnet-owt-7be5be79.pth")
    report = evaluate(MMFS.load("mmfs.safetensors"), "ffhq/", real="aahq/", networks=nets, samples=10000)
    write_report(report, "report.json")
"""
from mmfs_fast.evaluation.arcface import IResNet, identity_distance, identity_embedding
from mmfs_fast.evaluation.clip_score import clip_score, clip_target
from mmfs_fast.evaluation.command import add_cli_parser, main
from mmfs_fast.evaluation.fid import FIDInception, GaussianStats, frechet_distance, load_stats
from mmfs_fast.evaluation.lpips import LPIPS
from mmfs_fast.evaluation.report import write_report
from mmfs_fast.evaluation.runner import MetricNetworks, evaluate, reference_stats, render_samples, sample_seeds
from mmfs_fast.evaluation.weights import MetricWeightsError

__all__ = ["FIDInception", "GaussianStats", "IResNet", "LPIPS", "MetricNetworks", "MetricWeightsError",
           "add_cli_parser", "clip_score", "clip_target", "evaluate", "frechet_distance", "identity_distance",
           "identity_embedding", "load_stats", "main", "reference_stats", "render_samples", "sample_seeds",
           "write_report"]
