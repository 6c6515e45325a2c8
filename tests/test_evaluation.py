"""mmfs_fast.evaluation: the metric math against independent references, the networks against
their reference implementations on random weights, and the eval command end to end."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from mmfs_fast import MMFS, cli
from mmfs_fast.evaluation import (FIDInception, GaussianStats, IResNet, LPIPS, MetricNetworks, MetricWeightsError,
                                  evaluate, frechet_distance, identity_distance, write_report)
from mmfs_fast.evaluation.arcface import crop_ffhq_face
from mmfs_fast.models import Stylizer, StylizerConfig

LPIPS_HEADS = Path(__import__("lpips").__file__).parent / "weights" / "v0.1" / "alex.pth"
SMALL = StylizerConfig(size=64, ngf=4, style_dim=32, n_mlp=2, clip_mapper=False)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, batch-norm statistics included, scaled so that the signal
    neither dies nor explodes through deep stacks (a constant output would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.is_floating_point():
                continue
            noise = torch.randn(value.shape, generator=g)
            if "running_var" in key:
                noise = torch.rand(value.shape, generator=g) + 0.5
            elif value.ndim >= 2:  # conv / linear weights: He's variance 2 / fan-in (ReLUs halve it)
                noise = noise * (2 / value[0].numel()) ** 0.5
            elif key.endswith("weight"):  # batch-norm and PReLU scales around 1
                noise = 1 + 0.1 * noise
            else:
                noise = 0.1 * noise
            value.copy_(noise)
    return module.eval()


# -- FID math --------------------------------------------------------------------
def test_frechet_distance_of_two_gaussians_in_closed_form():
    # diagonal covariances commute: Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ (σ1 − σ2)² with σ the standard deviations
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    # and under a common rotation, which keeps the distance
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    b = rng.normal(size=(250, 40)) * 2 + 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_streamed_statistics_equal_numpy_in_float64():
    rng = np.random.default_rng(2)
    features = (rng.normal(size=(101, 16)) * 50 + 1000).astype(np.float32)  # a large mean: cancellation
    stats = GaussianStats(16)
    for start in range(0, 101, 17):
        stats.update(features[start:start + 17])
    assert stats.count == 101
    np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        stats.update(features[:, :5])


# -- the networks against references -----------------------------------------------
@pytest.fixture(scope="module")
def inception():
    return randomize(FIDInception())


def test_fid_inception_equals_pytorch_fid_blocks(inception, tmp_path):
    """pytorch-fid's FID blocks inside torchvision's Inception-v3, with the same random weights
    (loaded from a file in pytorch-fid's layout, 1008-class head included)."""
    import torchvision
    from pytorch_fid import inception as pf

    ref = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for name, block in [("Mixed_5b", pf.FIDInceptionA(192, 32)), ("Mixed_5c", pf.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pf.FIDInceptionA(288, 64)), ("Mixed_6b", pf.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pf.FIDInceptionC(768, 160)), ("Mixed_6d", pf.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pf.FIDInceptionC(768, 192)), ("Mixed_7b", pf.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pf.FIDInceptionE_2(2048))]:
        setattr(ref, name, block)
    state = inception.state_dict()
    ref.load_state_dict({**ref.state_dict(), **state})
    ref.eval()
    torch.save(ref.state_dict(), tmp_path / "pt_inception.pth")
    inception = FIDInception.from_file(tmp_path / "pt_inception.pth")
    ramp = torch.linspace(0, 1, 48)
    x = torch.stack([torch.rand(3, 48, 48), torch.stack([ramp.outer(ramp), ramp.expand(48, 48), 1 - ramp.outer(ramp)])])
    with torch.no_grad():
        y = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            y = getattr(ref, name)(y)
        expected = y.mean(dim=(2, 3))
        got = inception(x)
    assert got.shape == (2, 2048) and (got[0] - got[1]).abs().max() > 1e-2 * got.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lpips_equals_the_lpips_package_with_its_released_heads(tmp_path):
    import lpips

    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()  # released heads, random backbone
    backbone = {f"features.{name.split('.', 2)[2]}": v for name, v in ref.state_dict().items()
                if name.startswith("net.slice")}
    backbone["classifier.1.weight"] = torch.zeros(4096, 9216)  # torchvision's file has a head: ignored
    torch.save(backbone, tmp_path / "alexnet.pth")
    ours = LPIPS.from_files(LPIPS_HEADS, tmp_path / "alexnet.pth")
    assert ours.net == "alex"
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x0, x1), ref(x0, x1).flatten(), rtol=1e-5, atol=1e-6)
        assert torch.all(ours(x0, x0) == 0)


def test_lpips_vgg_by_direct_computation():
    model = randomize(LPIPS("vgg"), seed=4)
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    scale = lambda x: (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / \
        torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)  # noqa: E731
    expected = torch.zeros(2)
    a, b = scale(x0), scale(x1)
    tap = 0
    with torch.no_grad():
        for index, layer in enumerate(model.features):
            a, b = layer(a), layer(b)
            if index in (3, 8, 15, 22, 29):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                w = model.heads[tap].weight.view(1, -1, 1, 1)
                expected += ((na - nb) ** 2 * w).sum(1).mean(dim=(1, 2))
                tap += 1
        torch.testing.assert_close(model(x0, x1), expected, rtol=1e-5, atol=1e-6)


def test_iresnet_loads_arcface_torch_layouts_and_distance_is_one_minus_cosine(tmp_path):
    net = randomize(IResNet(layers=(1, 2, 1, 1), widths=(8, 8, 16, 16), num_features=24), seed=5)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "backbone.pth")  # DDP prefix
    loaded = IResNet.from_file(tmp_path / "backbone.pth")
    assert [len(getattr(loaded, f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 1]
    faces, stylized = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ea, eb = net(crop_ffhq_face(faces)), net(crop_ffhq_face(stylized))
        expected = 1 - F.cosine_similarity(ea, eb, dim=1)
        torch.testing.assert_close(identity_distance(loaded, faces, stylized), expected, rtol=1e-5, atol=1e-6)
        assert expected.min() > 1e-3  # the random network tells the images apart
        assert identity_distance(loaded, faces, faces).abs().max() < 1e-6
    # the crop: rows 35..223, columns 32..220 of a 256² face
    x = torch.zeros(1, 3, 256, 256)
    x[:, :, 35:223, 32:220] = 1
    assert crop_ffhq_face(x).min() == pytest.approx(1) and crop_ffhq_face(x).shape == (1, 3, 112, 112)


def test_missing_and_foreign_weights_name_the_file(tmp_path):
    with pytest.raises(MetricWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        FIDInception.from_file(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MetricWeightsError, match=r"other\.pth.*missing: Conv2d_1a_3x3"):
        FIDInception.from_file(tmp_path / "other.pth")
    with pytest.raises(MetricWeightsError, match=r"other\.pth: not an arcface_torch iresnet"):
        IResNet.from_file(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MetricWeightsError, match=r"junk\.pth: cannot read"):
        LPIPS.from_files(tmp_path / "junk.pth", tmp_path / "junk.pth")
    with pytest.raises(MetricWeightsError, match="alexnet-owt-7be5be79.pth"):
        LPIPS.from_files(LPIPS_HEADS, None)


# -- the run -----------------------------------------------------------------------
def save_faces(folder: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cli.synthetic_face(size, rng).save(folder / f"face{i}.png")
    return folder


@pytest.fixture(scope="module")
def small_model():
    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        return MMFS.load(random_init=True, config=SMALL, device="cpu")


def positive_heads(model: LPIPS) -> LPIPS:
    for head in model.heads:  # LPIPS's released heads are non-negative
        head.weight.data.abs_()
    return model


def linear_features() -> torch.nn.Module:
    """A cheap stand-in for Inception (checked on its own above), 24 features wide."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(3 * 64, 24))


def test_evaluate_end_to_end_is_deterministic_and_resumes(tmp_path, small_model, monkeypatch):
    from mmfs_fast.evaluation import runner

    faces, real = save_faces(tmp_path / "faces", 2), save_faces(tmp_path / "real", 3, seed=1)
    nets = MetricNetworks(inception=linear_features(), lpips=positive_heads(randomize(LPIPS("alex"), seed=6)),
                          arcface=randomize(IResNet((1, 1, 1, 1), (8, 8, 8, 8), 16), seed=7))
    kwargs = dict(faces=faces, real=real, networks=nets, samples=3, seed=5, batch_size=2, progress=False)
    monkeypatch.setattr(runner, "CHUNK", 2)
    report = evaluate(small_model, cache_dir=tmp_path / "cache", **kwargs)
    metrics = report["runs"][0]["metrics"]
    assert report["samples"] == 3 and report["real"]["count"] == 3 and report["faces"]["count"] == 2
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert metrics["arcface_distance"]["count"] == 3 and metrics["lpips_diversity"]["count"] == 3
    assert 0 < metrics["lpips_diversity"]["mean"]  # two random styles of a face differ
    assert 0 < metrics["arcface_distance"]["min"]
    assert {k: report["runs"][0]["model"][k] for k in ("precision", "impl")} == {"precision": "fp32", "impl": "auto"}
    # the cache: the reference statistics and two chunks of samples; an interrupted run (the last
    # chunk missing) recomputes only that chunk and gives the same numbers
    assert len(list((tmp_path / "cache").glob("real-*.npz"))) == 1
    chunks = sorted((tmp_path / "cache").glob("samples-*/*.npz"))
    assert [c.name for c in chunks] == ["00000000-00000002.npz", "00000002-00000003.npz"]
    chunks[1].unlink()
    rendered, render = [], runner.render_samples
    monkeypatch.setattr(runner, "render_samples",
                        lambda m, f, idx, *a: rendered.append(list(idx)) or render(m, f, idx, *a))
    assert evaluate(small_model, cache_dir=tmp_path / "cache", **kwargs)["runs"][0]["metrics"] == metrics
    assert rendered == [[2], [2]]  # sample 2's two stylizations, nothing else
    monkeypatch.setattr(runner, "render_samples", render)
    # the same seed in a new cache (and another batch size): the same numbers; another seed: others
    fresh = evaluate(small_model, cache_dir=tmp_path / "fresh", **{**kwargs, "batch_size": 3})
    assert fresh["runs"][0]["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-5)
    assert fresh["runs"][0]["metrics"]["arcface_distance"]["mean"] == pytest.approx(
        metrics["arcface_distance"]["mean"], rel=1e-5)
    other = evaluate(small_model, cache_dir=tmp_path / "cache", **{**kwargs, "seed": 6, "diversity_samples": 1})
    assert other["runs"][0]["metrics"]["arcface_distance"]["mean"] != metrics["arcface_distance"]["mean"]
    assert other["runs"][0]["metrics"]["lpips_diversity"]["count"] == 1  # its second chunk has none
    write_report(report, tmp_path / "r" / "report.json")
    assert json.loads((tmp_path / "r" / "report.json").read_text())["runs"][0]["metrics"]["fid"] == metrics["fid"]


def test_the_fid_of_the_run_is_the_fid_of_the_rendered_samples(tmp_path, small_model):
    """Recompute FID from images rendered independently (render + round + features, no cache)."""
    from mmfs_fast.evaluation.runner import quantize, render_samples

    faces, real = save_faces(tmp_path / "faces", 3), save_faces(tmp_path / "real", 4, seed=2)
    features = linear_features()
    report = evaluate(small_model, faces, real, MetricNetworks(inception=features), samples=4, seed=9,
                      batch_size=3, cache_dir=tmp_path / "cache", progress=False)
    face_files = sorted(faces.glob("*.png"))
    from mmfs_fast.io import load_image

    with torch.no_grad():
        fake = []
        for i in range(4):
            face = load_image(face_files[i % 3], 64)[None]
            fake.append(features(quantize(render_samples(small_model, face, [i], 9, 0)) * 0.5 + 0.5))
        real_feats = features(torch.stack([quantize(load_image(p, 64)) for p in sorted(real.glob("*.png"))]) * 0.5
                              + 0.5)
    a, b = torch.cat(fake).double().numpy(), real_feats.double().numpy()
    root = scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False)
                                                                  - 2 * root)
    assert report["runs"][0]["metrics"]["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


class StandInCLIP:
    """CLIP's interface, cheap: image features are a fixed projection of the mean colour."""

    def __init__(self):
        self.proj = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))

    def encode_text(self, texts):
        return F.normalize(torch.stack([torch.randn(512, generator=torch.Generator().manual_seed(len(t)))
                                        for t in texts]), dim=-1)

    def encode_image(self, x):
        return F.normalize(x.float().mean(dim=(2, 3)) @ self.proj, dim=-1)

    def encode_pil(self, images):
        from mmfs_fast.io import load_image

        return self.encode_image(torch.stack([load_image(i, 16) for i in images]))


def test_clip_scores_of_text_and_reference_styles(tmp_path):
    from mmfs_fast.evaluation.runner import DRAW_CLIP, quantize, render_samples

    torch.manual_seed(0)
    mmfs = MMFS(Stylizer(StylizerConfig(size=32, ngf=4, style_dim=512, n_mlp=2)), StandInCLIP())
    faces = save_faces(tmp_path / "faces", 2, size=32)
    ref = save_faces(tmp_path / "ref", 1, size=32, seed=3) / "face0.png"
    arc = randomize(IResNet((1, 1, 1, 1), (8, 8, 8, 8), 16), seed=2)
    report = evaluate(mmfs, faces, networks=MetricNetworks(arcface=arc), samples=2, seed=4, progress=False,
                      styles=[{"text": "pop art"}, {"ref": str(ref)}], style_samples=3, batch_size=2,
                      cache_dir=tmp_path / "cache")
    text, image = report["runs"][0]["metrics"]["styles"]
    assert text["text"] == "pop art" and image["ref"] == str(ref) and text["clip_score"]["count"] == 3
    files = sorted(faces.glob("*.png"))
    from mmfs_fast.io import load_image

    with torch.no_grad():
        x = torch.stack([load_image(files[i % 2], 32) for i in range(3)])
        for style, entry in ((dict(text="pop art"), text), (dict(ref=str(ref)), image)):
            shown = quantize(render_samples(mmfs, x, range(3), 4, DRAW_CLIP, mmfs.style(**style)))
            target = mmfs.clip.encode_text(["pop art"]) if "text" in style else mmfs.clip.encode_pil([ref])
            want = (F.normalize(shown.mean(dim=(2, 3)) @ mmfs.clip.proj, dim=-1) * target).sum(1)
            assert entry["clip_score"]["mean"] == pytest.approx(want.mean().item(), abs=1e-6)
            assert entry["arcface_distance"]["mean"] == pytest.approx(
                identity_distance(arc, x, shown).mean().item(), abs=1e-6)


# -- the command -------------------------------------------------------------------
def test_eval_command_compare_writes_the_report_and_gates(tmp_path):
    faces = save_faces(tmp_path / "faces", 2)
    torch.manual_seed(0)
    Stylizer(SMALL).save(tmp_path / "model.safetensors")
    torch.save(randomize(IResNet((1, 1, 1, 1), (8, 8, 8, 8), 16), seed=8).state_dict(), tmp_path / "arc.pth")
    torch.save({k: v for k, v in randomize(LPIPS("alex"), seed=9).state_dict().items() if k.startswith("features.")},
               tmp_path / "alexnet.pth")
    base = ["eval", "--ckpt", str(tmp_path / "model.safetensors"), "--faces", str(faces), "--samples", "3",
            "--metrics", "arcface,lpips", "--arcface-weights", str(tmp_path / "arc.pth"), "--lpips-weights",
            str(LPIPS_HEADS), "--lpips-backbone", str(tmp_path / "alexnet.pth"), "--device", "cpu",
            "--no-progress", "--batch-size", "2"]
    out = tmp_path / "report.json"
    assert cli.main(base + ["--compare", "fp32,bf16", "--out", str(out), "--max-pixel-diff", "2"]) == 0
    report = json.loads(out.read_text())
    assert [r["model"]["precision"] for r in report["runs"]] == ["fp32", "bf16"]
    assert report["runs"][0]["model"]["ckpt_sha256"] == __import__("hashlib").sha256(
        (tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert set(report["weights"]) == {"arcface", "lpips", "lpips_backbone"}
    diff = report["difference"]
    assert 0 < diff["pixel_max_abs"]["max"] < 0.5 and diff["lpips"]["count"] == 3  # bf16 differs, a little
    assert diff["gate"]["passed"] and "arcface_distance" in diff["metrics"]
    assert not list(tmp_path.glob(".report.*"))  # the atomic write left no temporary file
    # a gate that the bf16 rendering cannot pass: exit 1, the report still written
    assert cli.main(base + ["--compare", "fp32,bf16", "--out", str(out), "--max-pixel-diff", "1e-9"]) == 1
    assert json.loads(out.read_text())["difference"]["gate"]["passed"] is False


def test_eval_command_usage_errors_name_the_missing_file(tmp_path, capsys):
    faces = save_faces(tmp_path / "faces", 1)
    base = ["eval", "--random-init", "--faces", str(faces), "--device", "cpu"]
    assert cli.main(base + ["--real", str(faces)]) == 2
    message = capsys.readouterr().err
    assert "--inception-weights" in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "--arcface-weights" in message and "backbone.pth" in message and "alexnet-owt-7be5be79.pth" in message
    assert cli.main(base + ["--metrics", "fid", "--inception-weights", "nope.pth", "--real", str(faces)]) == 2
    assert "no such file nope.pth" in capsys.readouterr().err
    assert cli.main(base + ["--metrics", "fid"]) == 2
    assert "--real" in capsys.readouterr().err
    assert cli.main(base + ["--metrics", "lpips", "--compare", "fp32,fp99"]) == 2
    assert "'fp99' is neither a precision" in capsys.readouterr().err
