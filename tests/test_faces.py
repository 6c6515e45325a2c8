"""Faces in photos: the FFHQ recipe in closed form, detection and alignment on a real
photo (scikit-image's astronaut), paste-back against an analytic mask and an identity
round trip, several faces, no face, and the missing-extra message."""
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmfs_fast import faces
from mmfs_fast.io import ImageError

pytest.importorskip("dlib", reason="needs the 'faces' extra")
skimage_data = pytest.importorskip("skimage.data")

CROP = 512


@pytest.fixture(scope="module")
def detector():
    return faces.FaceDetector()


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


def to_uint8(crop: torch.Tensor) -> np.ndarray:
    return ((crop.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def eye_centres(landmarks):
    return landmarks[36:42].mean(0), landmarks[42:48].mean(0)


def ffhq_eye_targets(landmarks, size):
    """Where the FFHQ recipe puts the eyes in a size² crop, worked out with angles: the
    crop's x axis has the angle of eye-to-eye plus eye-to-mouth turned a quarter turn
    anticlockwise on screen (both then point along the eye line), it is centred
    0.1·eye-to-mouth below the eyes' midpoint and 2·max(2·|eye-to-eye|, 1.8·|eye-to-mouth|) wide."""
    left, right = eye_centres(landmarks)
    mid = (left + right) / 2
    e2e = right - left
    e2m = (landmarks[48] + landmarks[54]) / 2 - mid
    angle = math.atan2(e2e[1] - e2m[0], e2e[0] + e2m[1])
    side = 2 * max(2 * np.hypot(*e2e), 1.8 * np.hypot(*e2m))
    centre = mid + 0.1 * e2m
    unrotate = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    return [size / 2 + unrotate @ (eye - centre) * size / side for eye in (left, right)]


def distance_inside_square(quad, shape):
    """Per pixel of an image of ``shape``: how far inside the quad's square its centre is,
    in square sides (negative outside)."""
    ys, xs = np.mgrid[:shape[0], :shape[1]] + 0.5
    uv = faces.crop_coordinates(quad, np.stack([xs.ravel(), ys.ravel()], 1), 1).reshape(*xs.shape, 2)
    return np.minimum(uv, 1 - uv).min(-1)


def canonical_landmarks(eye_distance, mouth_distance, mouth_width=30.0):
    """68 landmarks whose eyes are at (∓d/2, 0) and mouth corners at (∓w/2, m)."""
    lm = np.zeros((68, 2))
    lm[36:42] = (-eye_distance / 2, 0)
    lm[42:48] = (eye_distance / 2, 0)
    lm[48] = (-mouth_width / 2, mouth_distance)
    lm[54] = (mouth_width / 2, mouth_distance)
    return lm


@pytest.mark.parametrize("d, m", [(40.0, 30.0), (40.0, 60.0)])  # the eye term wins, then the mouth term
def test_ffhq_quad_closed_form_and_rotation_equivariant(d, m):
    lm = canonical_landmarks(d, m)
    half = max(2 * d, 1.8 * m)
    centre = np.array([0.0, 0.1 * m])
    expected = centre + half * np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]])
    np.testing.assert_allclose(faces.ffhq_quad(lm), expected, atol=1e-9)

    angle = 0.4
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = np.array([300.0, 200.0])
    np.testing.assert_allclose(faces.ffhq_quad(lm @ rotation.T + shift), expected @ rotation.T + shift, atol=1e-9)


def test_ffhq_quad_rejects_wrong_landmarks():
    with pytest.raises(ValueError, match="68"):
        faces.ffhq_quad(np.zeros((5, 2)))


def test_aligned_eyes_at_ffhq_positions(detector, astronaut):
    found = detector(astronaut)
    assert len(found) == 1
    face = found[0]
    x0, y0, x1, y1 = face.box
    assert 150 < x0 < x1 < 300 and 50 < y0 < y1 < 200  # her face, not the flag or the suit

    crop = faces.align(astronaut, [face.quad], CROP)
    assert crop.shape == (1, 3, CROP, CROP) and crop.min() >= -1 and crop.max() <= 1
    in_crop = detector(to_uint8(crop[0]))
    assert len(in_crop) == 1
    for eye, target in zip(eye_centres(in_crop[0].landmarks), ffhq_eye_targets(face.landmarks, CROP)):
        np.testing.assert_allclose(eye, target, atol=3.0)


def test_tilted_face_is_levelled(detector, astronaut):
    """A photo turned by 15° gives the same aligned crop: eyes level, where the upright one has them."""
    upright = detector(to_uint8(faces.align(astronaut, [detector(astronaut)[0].quad], CROP)[0]))[0]
    tilted = np.asarray(Image.fromarray(astronaut).rotate(15, resample=Image.BICUBIC, expand=True))
    found = detector(tilted)
    assert len(found) == 1
    levelled = detector(to_uint8(faces.align(tilted, [found[0].quad], CROP)[0]))[0]
    left, right = eye_centres(levelled.landmarks)
    assert abs(left[1] - right[1]) < 2.0
    for eye, reference in zip((left, right), eye_centres(upright.landmarks)):
        np.testing.assert_allclose(eye, reference, atol=3.0)


def test_paste_back_mask_is_the_feathered_square():
    """A white crop pasted onto black shows the mask: a smoothstep over the outer tenth of
    the square, 0 (untouched) outside it."""
    image = np.zeros((200, 220, 3), np.uint8)
    quad = np.array([[40.0, 30.0], [40.0, 130.0], [140.0, 130.0], [140.0, 30.0]])
    out = faces.paste_back(image, torch.ones(1, 3, 64, 64), [quad], feather=0.1)
    u = (np.arange(220) + 0.5 - 40) / 100
    v = (np.arange(200) + 0.5 - 30) / 100
    edge = np.minimum(np.minimum(u, 1 - u)[None, :], np.minimum(v, 1 - v)[:, None])
    ramp = np.clip(edge / 0.1, 0, 1)
    expected = np.round(255 * ramp * ramp * (3 - 2 * ramp))
    assert np.abs(out.astype(int) - expected[..., None]).max() <= 1
    assert (out[edge <= 0] == 0).all()


def test_identity_round_trip_restores_the_photo(detector, astronaut):
    face = detector(astronaut)[0]
    crops = faces.align(astronaut, [face.quad], CROP)
    out = faces.paste_back(astronaut, crops, [face.quad])
    assert out.shape == astronaut.shape and out.dtype == np.uint8

    edge = distance_inside_square(face.quad, astronaut.shape)
    outside, inner = edge <= 0, edge >= 0.1
    np.testing.assert_array_equal(out[outside], astronaut[outside])
    error = np.abs(out[inner].astype(float) - astronaut[inner])
    assert error.mean() < 3.0 and np.percentile(error, 99) < 25


def test_two_faces_give_two_crops(detector, astronaut):
    photo = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    calls = []

    def identity(batch):
        calls.append(len(batch))
        return batch

    result = faces.stylize_photo(photo, identity, detector, size=128)
    assert len(result.faces) == 2 and result.crops.shape == (2, 3, 128, 128) and calls == [2]
    assert result.faces[0].box[2] <= 512 <= result.faces[1].box[0]
    # the second face is the mirror image of the first, so is its crop (up to landmark noise)
    assert (result.crops[0] - result.crops[1].flip(-1)).abs().mean() < 0.06
    assert result.composite.shape == photo.shape


def test_photo_without_a_face_is_reported(detector, tmp_path, astronaut):
    blank = np.full((120, 160, 3), 200, np.uint8)

    def must_not_run(batch):
        raise AssertionError("no face: nothing to stylize")

    result = faces.stylize_photo(blank, must_not_run, detector, size=64)
    assert result.faces == [] and result.crops.shape == (0, 3, 64, 64)
    np.testing.assert_array_equal(result.composite, blank)

    Image.fromarray(blank).save(tmp_path / "blank.png")
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files = [(tmp_path / name, name.split(".")[0]) for name in ("blank.png", "broken.png", "astronaut.png")]
    out_dir = tmp_path / "out"
    results = dict(faces.stylize_photo_files(files, lambda b: -b, out_dir, size=64, paste=True, detector=detector))
    assert results[tmp_path / "blank.png"].faces == []
    assert isinstance(results[tmp_path / "broken.png"], ImageError)
    assert len(results[tmp_path / "astronaut.png"].faces) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["astronaut.png", "astronaut_face0.png"]


def test_with_a_small_mmfs_model(detector, astronaut):
    from mmfs_fast.api import MMFS
    from mmfs_fast.models import StylizerConfig

    with pytest.warns(UserWarning, match="RANDOM-INITIALISED"):
        mmfs = MMFS.load(random_init=True, device="cpu", config=StylizerConfig(size=64, ngf=4, style_dim=32),
                         engine=False)  # renders with the Stylizer, whose noise strengths we set
    with torch.no_grad():  # noise strengths start at 0: make the noise visible
        for name, param in mmfs.stylizer.named_parameters():
            if name.endswith("noise.weight"):
                param.fill_(0.5)
    w = mmfs.style_from_seed(3)
    fixed = faces.mmfs_stylize_batch(mmfs, w, "fixed", seed=1)
    result = faces.stylize_photo(astronaut, fixed, detector, size=mmfs.size)
    assert result.crops.shape == (1, 3, 64, 64) and torch.isfinite(result.crops).all()
    aligned = faces.align(astronaut, [result.faces[0].quad], 64)
    torch.testing.assert_close(fixed(aligned), result.crops)  # fixed noise: the same face renders the same
    assert not torch.equal(faces.mmfs_stylize_batch(mmfs, w, "random")(aligned), result.crops)
    with pytest.raises(ValueError, match="noise"):
        faces.mmfs_stylize_batch(mmfs, w, "sometimes")


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(faces.FacesUnavailable, match=r"pip install 'mmfs_fast\[faces\]'"):
        faces.FaceDetector()
    monkeypatch.setattr(faces.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(faces.FacesUnavailable, match="face-recognition-models"):
        faces.landmark_model_path()


def test_paste_back_checks_its_inputs(astronaut):
    quad = np.array([[0.0, 0.0], [0.0, 10.0], [10.0, 10.0], [10.0, 0.0]])
    with pytest.raises(ValueError, match="2 crops for 1 quads"):
        faces.paste_back(astronaut, torch.zeros(2, 3, 8, 8), [quad])
    with pytest.raises(ValueError, match="feather"):
        faces.paste_back(astronaut, torch.zeros(1, 3, 8, 8), [quad], feather=0.0)


@pytest.fixture
def small_random_mmfs(monkeypatch):
    """The CLI's model loader, returning a small random model (the default one is 512²)."""
    from mmfs_fast.commands import common
    from mmfs_fast.models import StylizerConfig

    real_load = common.load_mmfs
    monkeypatch.setattr(common, "load_mmfs", lambda args: real_load(args, StylizerConfig(size=64, ngf=4, style_dim=32)))


def test_cli_stylize_align(tmp_path, astronaut, small_random_mmfs):
    import argparse

    from mmfs_fast.commands import common

    parser = argparse.ArgumentParser()
    common.add_model_options(parser)
    faces.add_align_options(parser)
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(tmp_path / "blank.png")
    args = parser.parse_args(["--random-init", "--device", "cpu", "--align", "--paste-back"])
    args.out, args.seed, args.text, args.ref, args.noise, args.batch_size = tmp_path / "out", 5, None, None, "random", 4
    files = [(tmp_path / "astronaut.png", "astronaut"), (tmp_path / "blank.png", "blank")]
    assert faces.run_stylize_align(args, files) == common.EXIT_OK
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.png", "astronaut_face0.png"]
    assert Image.open(tmp_path / "out" / "astronaut.png").size == (512, 512)


def test_face_at_the_photo_edge_is_mirrored_and_pasted_back(detector, astronaut):
    photo = np.ascontiguousarray(astronaut[60:, 165:])
    face = detector(photo)[0]
    assert face.quad.min() < -10  # the crop square sticks out of the photo
    crop = faces.align(photo, [face.quad], 256)
    # outside the photo, align mirrors it about its edge: the same as cropping from a padded copy
    pad = 64
    padded = np.pad(photo, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    torch.testing.assert_close(crop, faces.align(padded, [face.quad + pad], 256), atol=1e-4, rtol=0)

    out = faces.paste_back(photo, crop, [face.quad])
    edge = distance_inside_square(face.quad, photo.shape)
    np.testing.assert_array_equal(out[edge <= 0], photo[edge <= 0])
    assert np.abs(out[edge >= 0.1].astype(float) - photo[edge >= 0.1]).mean() < 3.0
