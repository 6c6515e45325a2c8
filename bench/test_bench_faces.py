"""Faces in photos and videos (issue 10): faces/s of detection + FFHQ alignment on
scikit-image's astronaut (alone and tiled 2×1: two faces), and end-to-end fps of
stylize_video on a short clip made here (the photo panned 2 px per frame): decode,
detect/follow, align, stylize with the Engine (512² fp16 on a GPU, the reduced
profile's Stylizer on the CPU; random weights), paste back, encode.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from harness import DEVICE, ON_GPU, PROFILE
from mmfs_fast import faces, video

av = pytest.importorskip("av", reason="needs the 'faces' extra")
skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image (the faces extra's test photo)")

CROP = 512  # the FFHQ crop the model takes
ROUNDS = 3 if ON_GPU else 2
CLIP_FRAMES = 48 if ON_GPU else 12
CLIP_SIDE, CLIP_FPS, PAN = 256, 24, 2


@pytest.fixture(scope="module")
def detector() -> faces.FaceDetector:
    try:
        return faces.FaceDetector()
    except faces.FacesUnavailable as e:  # dlib or its landmark model missing
        pytest.skip(str(e))


def photo(tiles: int) -> np.ndarray:
    return np.concatenate([skimage_data.astronaut()] * tiles, axis=1)


@pytest.mark.parametrize("tiles", [1, 2])
def test_detect_align(tiles: int, detector, measure, benchmark):
    image = photo(tiles)
    found = len(detector(image))
    if found != tiles:
        pytest.fail(f"expected {tiles} face(s) in the tiled astronaut, the detector found {found}")
    seconds = measure(lambda: faces.align(image, [f.quad for f in detector(image)], CROP), group="faces detect+align",
                      rounds=ROUNDS, task="detect_align", faces=found, photo=f"{image.shape[1]}x{image.shape[0]}",
                      crop=CROP)
    benchmark.extra_info["faces_per_s"] = found / seconds


@pytest.fixture(scope="module")
def panned_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("faces-bench") / "pan.mp4"
    image = skimage_data.astronaut()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=CLIP_FPS)
        stream.width = stream.height = CLIP_SIDE
        stream.pix_fmt = "yuv420p"
        for i in range(CLIP_FRAMES):
            view = np.ascontiguousarray(image[30:30 + CLIP_SIDE, 124 + PAN * i:124 + PAN * i + CLIP_SIDE])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(view, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def test_video(panned_clip, detector, measure, benchmark):
    from mmfs_fast.api import MMFS

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mmfs_fast: RANDOM-INITIALISED")
        mmfs = MMFS.load(random_init=True, config=PROFILE.stylizer, device=DEVICE)
    stylize_batch = faces.mmfs_stylize_batch(mmfs, mmfs.style_from_seed(0))
    output = panned_clip.with_name("out.mp4")

    def run():
        video.stylize_video(panned_clip, output, stylize_batch, size=mmfs.size, detector=detector, progress=False)

    seconds = measure(run, group="faces video", rounds=ROUNDS, task="video", frames=CLIP_FRAMES,
                      frame=f"{CLIP_SIDE}x{CLIP_SIDE}", size=mmfs.size, precision="fp16" if ON_GPU else "fp32")  # MMFS's default
    benchmark.extra_info["fps"] = CLIP_FRAMES / seconds
