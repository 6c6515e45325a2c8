"""Video: a short clip made here (scikit-image's astronaut panned 2 px per frame, with a
tone as audio) goes through stylize_video; frame count, rate, duration, audio packets,
pixels and the steadiness of the crop are checked against the source."""
import math

import numpy as np
import pytest

from mmfs_fast import faces, video

av = pytest.importorskip("av", reason="needs the 'faces' extra")
pytest.importorskip("dlib", reason="needs the 'faces' extra")
skimage_data = pytest.importorskip("skimage.data")

FRAMES, FPS, SIDE, PAN = 16, 12, 192, 2  # PAN: pixels the view moves right per frame
SAMPLE_RATE = 16000


def pan_frames(n):
    """The photo panned PAN px per frame, with sensor-like noise that makes landmarks jitter."""
    photo = skimage_data.astronaut().astype(float)
    rng = np.random.default_rng(0)
    return [np.clip(photo[30:30 + SIDE, 124 + PAN * i:124 + PAN * i + SIDE] + rng.normal(0, 6, (SIDE, SIDE, 3)),
                    0, 255).astype(np.uint8) for i in range(n)]


def write_clip(path, frames, with_audio):
    # lossless (crf 0): libx264's lossy output differs from run to run here, which made the
    # jitter bounds flaky; lossless frames decode the same every time
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        if with_audio:
            audio = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
        if with_audio:
            t = np.arange(SAMPLE_RATE * len(frames) // FPS) / SAMPLE_RATE
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for start in range(0, tone.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, start
                out.mux(audio.encode(chunk))
            out.mux(audio.encode(None))


def read_clip(path):
    """(decoded RGB frames, video stream facts, audio packet payloads)."""
    with av.open(str(path)) as clip:
        stream = clip.streams.video[0]
        facts = {"rate": stream.average_rate, "duration": float(stream.duration * stream.time_base),
                 "audio streams": len(clip.streams.audio)}
        images = [frame.to_ndarray(format="rgb24") for frame in clip.decode(stream)]
    audio = []
    with av.open(str(path)) as clip:
        if clip.streams.audio:
            audio = [bytes(p) for p in clip.demux(clip.streams.audio[0]) if p.dts is not None]
    return images, facts, audio


@pytest.fixture(scope="module")
def detector():
    return faces.FaceDetector()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "pan.mp4"
    write_clip(path, pan_frames(FRAMES), with_audio=True)
    return path


@pytest.fixture(scope="module")
def identity_run(clip, detector):
    out = clip.with_name("out.mp4")
    report = video.stylize_video(clip, out, lambda batch: batch, size=128, batch_size=5, detector=detector,
                                 progress=False)
    return out, report


def psnr(a, b):
    return 10 * math.log10(255 ** 2 / np.mean((a.astype(float) - b) ** 2))


def test_round_trip_keeps_frames_rate_duration_and_audio(clip, identity_run):
    out, report = identity_run
    source_frames, source, source_audio = read_clip(clip)
    frames, facts, audio = read_clip(out)
    assert report.frames == len(frames) == len(source_frames) == FRAMES
    assert report.fps == facts["rate"] == source["rate"] == FPS
    assert facts["duration"] == pytest.approx(source["duration"], abs=1e-6)
    assert report.frames_without_face == 0 and all(len(q) == 1 for q in report.quads)
    assert report.audio_copied and len(audio) > 0 and audio == source_audio
    # identity stylization: the video comes back, up to resampling and re-encoding
    assert min(psnr(a, b) for a, b in zip(frames, source_frames)) > 30


def test_crop_follows_the_pan_without_jitter(clip, identity_run, detector):
    _, report = identity_run

    def centre_and_side(quad):
        return [*quad.mean(0), faces.quad_side(quad)]

    smoothed = np.array([centre_and_side(quads[0]) for quads in report.quads])
    raw = np.array([centre_and_side(detector(image)[0].quad) for image in read_clip(clip)[0]])
    # the face moves PAN px left per frame and keeps its size: second differences are zero
    # for a steady pan; the filter needs a few frames to pick up the speed
    settled = smoothed[4:]
    jitter = np.abs(np.diff(settled, n=2, axis=0)).max(0)
    raw_jitter = np.abs(np.diff(raw[4:], n=2, axis=0)).max(0)
    assert (jitter < [0.4, 0.4, 2.0]).all() and (jitter < raw_jitter / 2).all(), (jitter, raw_jitter)
    np.testing.assert_allclose(np.diff(settled[-6:, 0]), -PAN, atol=0.2)
    np.testing.assert_allclose(smoothed[:, 1], smoothed[0, 1], atol=1.0)  # no vertical drift
    np.testing.assert_allclose(smoothed[:, 2], smoothed[0, 2], rtol=0.02)


def test_no_face_and_no_audio(tmp_path, detector):
    blank = [np.full((SIDE, SIDE, 3), 90 + 10 * i, np.uint8) for i in range(4)]
    src, out = tmp_path / "blank.mp4", tmp_path / "blank_out.mp4"
    write_clip(src, blank, with_audio=False)

    def must_not_run(batch):
        raise AssertionError("no face: nothing to stylize")

    report = video.stylize_video(src, out, must_not_run, size=64, detector=detector, progress=False)
    frames, facts, audio = read_clip(out)
    assert report.frames == report.frames_without_face == len(frames) == 4
    assert not report.audio_copied and facts["audio streams"] == 0
    for frame, image in zip(frames, blank):
        assert np.abs(frame.astype(int) - image).max() <= 2


def test_stylize_video_checks_its_input(tmp_path, detector):
    with pytest.raises(ValueError, match="batch_size"):
        video.stylize_video(tmp_path / "x.mp4", tmp_path / "y.mp4", lambda b: b, batch_size=0, detector=detector)


def test_one_euro_filter_smooths_still_signals_and_follows_moving_ones():
    rng = np.random.default_rng(0)
    still = 5.0 + rng.normal(0, 1, (200, 1))
    f = video.OneEuroFilter(min_cutoff=1.0, beta=0.0)
    out = np.array([f(x, 1 / 30) for x in still])
    assert out[50:].std() < still[50:].std() / 3
    assert out[50:].mean() == pytest.approx(5.0, abs=0.3)

    # on a ramp, the steady-state lag of a plain EMA is v·τ (τ = 1/(2π·cutoff)); speed raises the cutoff
    ramp = np.arange(200.0)[:, None] * 0.1
    for beta, expected_lag in [(0.0, 3.0 / (2 * math.pi)), (1.0, None)]:
        f = video.OneEuroFilter(min_cutoff=1.0, beta=beta)
        lag = float((ramp - np.array([f(x, 1 / 30) for x in ramp]))[-1, 0])
        if expected_lag is not None:
            assert lag == pytest.approx(expected_lag, rel=0.05)
        else:
            assert 0 < lag < 3.0 / (2 * math.pi) / 2


def test_tracker_holds_a_missed_face_then_drops_it():
    quad = np.array([[0.0, 0.0], [0.0, 100.0], [100.0, 100.0], [100.0, 0.0]])
    other = quad + [300.0, 0.0]
    tracker = video.QuadTracker(hold=2)
    assert len(tracker.update([other, quad], 0.04)) == 2
    held = tracker.update([quad + 1.0], 0.04)  # `other` missed once: held where it was
    assert len(held) == 2 and np.allclose(held[1], other)
    tracker.update([quad], 0.04)
    assert len(tracker.update([quad], 0.04)) == 1  # missed 3 > hold frames: dropped
    assert len(tracker.update([quad + [150.0, 0.0]], 0.04)) == 2  # too far from the track: a new face


def test_cli_video_subcommand(tmp_path, clip, monkeypatch):
    import argparse

    from mmfs_fast.commands import common
    from mmfs_fast.models import StylizerConfig

    real_load = common.load_mmfs
    # a small random model: the default random one is 512²
    monkeypatch.setattr(common, "load_mmfs", lambda args: real_load(args, StylizerConfig(size=64, ngf=4, style_dim=32)))
    parser = argparse.ArgumentParser()
    video.add_cli_parser(parser.add_subparsers())
    out = tmp_path / "styled.mp4"
    args = parser.parse_args(["video", str(clip), str(out), "--random-init", "--device", "cpu", "--seed", "1"])
    assert args.func(args) == common.EXIT_OK
    frames, facts, audio = read_clip(out)
    assert len(frames) == FRAMES and facts["rate"] == FPS and len(audio) > 0

    (tmp_path / "notes.mp4").write_text("not a video")
    for name, problem in [("missing.mp4", "No such file"), ("notes.mp4", "Invalid data")]:
        args = parser.parse_args(["video", str(tmp_path / name), str(out), "--random-init"])
        with pytest.raises(common.UsageError, match=f"not a readable video .*{problem}"):
            args.func(args)


def test_follower_detects_every_nth_frame_and_tracks_landmarks_in_between(detector):
    images = pan_frames(9)
    detected = [detector(image)[0] for image in images]
    log = []

    class LoggingDetector:
        def __call__(self, image):
            log.append("detect")
            return detector(image)

        def refit(self, image, boxes):
            log.append("refit")
            return detector.refit(image, boxes)

    follower = video.FaceFollower(LoggingDetector(), detect_every=4)
    followed = [follower(image) for image in images]
    assert log == ["detect", "refit", "refit", "refit"] * 2 + ["detect"]
    for faces_in_frame, reference in zip(followed, detected):
        assert len(faces_in_frame) == 1
        # within the landmarks' own frame-to-frame noise on these noisy frames (side ≈ 174 px)
        np.testing.assert_allclose(faces_in_frame[0].quad, reference.quad, atol=4.0)
    with pytest.raises(ValueError, match="detect_every"):
        video.FaceFollower(detector, detect_every=0)
