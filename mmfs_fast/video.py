"""Stylize the faces of a video, streaming: decode → detect → smooth → align →
stylize in batches → paste back → encode, with the audio copied through.

At most ``batch_size`` decoded frames are held at a time, so memory does not grow
with the video's length. Face quads are tracked from frame to frame and smoothed
with a one-euro filter (Casiez et al., CHI 2012): heavy smoothing while a face is
still, so the crop does not jitter, and little lag while it moves. The same
smoothed quad is used to crop and to paste back, so smoothing never misplaces the
pasted face. A face the detector misses for a few frames keeps its last quad.

Needs the ``faces`` extra (PyAV, dlib): ``pip install 'mmfs_fast[faces]'``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
from tqdm import tqdm

from mmfs_fast import atomic
from mmfs_fast.faces import (Face, FaceDetector, StylizeBatch, align, paste_back, quad_side, require,
                             stylize_in_batches)
from mmfs_fast.models.noise import NOISE_MODES

DEFAULT_FPS = Fraction(30)


class OneEuroFilter:
    """One-euro low-pass filter of a vector signal: the cutoff frequency rises with
    the signal's speed, ``cutoff = min_cutoff + beta·|velocity|`` (Hz, units/s)."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 1.0, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.value = self.velocity = None

    @staticmethod
    def _alpha(cutoff: float, dt: float) -> float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, dt: float) -> np.ndarray:
        if self.value is None:
            self.value, self.velocity = x.copy(), np.zeros_like(x)
            return self.value.copy()
        velocity = (x - self.value) / dt
        self.velocity += self._alpha(self.d_cutoff, dt) * (velocity - self.velocity)
        cutoff = self.min_cutoff + self.beta * float(np.linalg.norm(self.velocity))
        self.value += self._alpha(cutoff, dt) * (x - self.value)
        return self.value.copy()


def _quad_params(quad: np.ndarray) -> np.ndarray:
    """A quad as (centre x, centre y, half x-axis x, half x-axis y): it is a square, so
    these four numbers fix it."""
    return np.concatenate([quad.mean(0), (quad[3] - quad[0]) / 2])


def _params_quad(params: np.ndarray) -> np.ndarray:
    c, x = params[:2], params[2:]
    y = np.array([-x[1], x[0]])
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


@dataclass
class _Track:
    filter: OneEuroFilter
    quad: np.ndarray
    side: float
    missed: int = 0


class QuadTracker:
    """Follows face quads across frames and smooths each one.

    A detection joins the track whose quad centre is nearest, if closer than half a
    face side; otherwise it starts a track. A track with no detection keeps its quad
    for ``hold`` frames, then ends. Smoothing works on quads in units of the face
    side, so ``beta`` does not depend on the resolution.
    """

    def __init__(self, min_cutoff: float = 0.5, beta: float = 1.5, hold: int = 5):
        self.min_cutoff, self.beta, self.hold = min_cutoff, beta, hold
        self.tracks: list[_Track] = []

    def update(self, quads: list[np.ndarray], dt: float) -> list[np.ndarray]:
        """This frame's detected quads → the smoothed quads to use, left to right."""
        unmatched = list(self.tracks)
        for track in self.tracks:
            track.missed += 1
        for quad in quads:
            centre = quad.mean(0)
            track = min(unmatched, key=lambda t: np.linalg.norm(t.quad.mean(0) - centre), default=None)
            if track is None or np.linalg.norm(track.quad.mean(0) - centre) > track.side / 2:
                track = _Track(OneEuroFilter(self.min_cutoff, self.beta), quad, quad_side(quad))
                self.tracks.append(track)
            else:
                unmatched.remove(track)
            track.quad = _params_quad(track.filter(_quad_params(quad) / track.side, dt) * track.side)
            track.missed = 0
        self.tracks = [t for t in self.tracks if t.missed <= self.hold]
        return [t.quad for t in sorted(self.tracks, key=lambda t: t.quad[0, 0])]


class FaceFollower:
    """Faces frame after frame, running the (slow) detector only every ``detect_every``
    frames, or while there is no face. In between, the landmarks are re-fitted in each
    face's last detection box, moved along with the face's landmarks."""

    def __init__(self, detector: FaceDetector, detect_every: int = 5):
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        self.detector, self.detect_every = detector, detect_every
        self.frame = 0
        self.faces: list[Face] = []
        self.anchors: list[tuple[np.ndarray, np.ndarray]] = []  # per face: box centre − landmark centre, box size

    def __call__(self, image: np.ndarray) -> list[Face]:
        if self.frame % self.detect_every == 0 or not self.faces:
            self.faces = self.detector(image)
            self.anchors = [(_box_centre(f.box) - f.landmarks.mean(0), np.subtract(f.box[2:], f.box[:2]))
                            for f in self.faces]
        else:
            boxes = []
            for face, (offset, box_size) in zip(self.faces, self.anchors):
                x0, y0 = np.round(face.landmarks.mean(0) + offset - box_size / 2).astype(int)
                boxes.append((x0, y0, x0 + box_size[0], y0 + box_size[1]))
            self.faces = self.detector.refit(image, boxes)
        self.frame += 1
        return self.faces


def _box_centre(box) -> np.ndarray:
    return (np.asarray(box[:2], dtype=np.float64) + box[2:]) / 2


@dataclass
class VideoReport:
    """What :func:`stylize_video` did: frames written, their rate, the frames with no
    face, the quads used per frame (for inspection) and whether audio was copied."""
    frames: int = 0
    fps: Fraction = DEFAULT_FPS
    frames_without_face: int = 0
    quads: list[list[np.ndarray]] = field(default_factory=list)
    audio_copied: bool = False


@dataclass
class _Frame:
    image: np.ndarray
    pts: int
    quads: list[np.ndarray]


def stylize_video(src, dst, stylize_batch: StylizeBatch, size: int = 512, batch_size: int = 8,
                  detector: FaceDetector | None = None, tracker: QuadTracker | None = None,
                  detect_every: int = 5, codec: str = "libx264", crf: int = 18,
                  progress: bool = True) -> VideoReport:
    """Stylize every face of video ``src`` into ``dst`` (its container from the suffix,
    e.g. .mp4). ``stylize_batch``: (B, 3, size, size) in [-1, 1] → the same; give it a
    fixed style and fixed noise, or the video flickers. The detector runs every
    ``detect_every`` frames, the landmarks in every frame. Frames keep their timestamps;
    the first audio stream is copied without re-encoding. Odd frame sizes lose their
    last row/column (the encoder's 4:2:0 chroma needs even sizes)."""
    av = require("av")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    follower = FaceFollower(detector or FaceDetector(), detect_every)
    tracker = tracker or QuadTracker()
    report = VideoReport()
    with av.open(str(src)) as source:
        if not source.streams.video:
            raise ValueError(f"{src}: no video stream")
        video_in = source.streams.video[0]
        audio_in = source.streams.audio[0] if source.streams.audio else None
        report.fps = video_in.average_rate or video_in.guessed_rate or DEFAULT_FPS
        with atomic.writing(dst) as tmp, av.open(str(tmp), "w") as sink:  # no partial video on failure
            options = {"crf": str(crf)} if codec == "libx264" else {}
            video_out = sink.add_stream(codec, rate=report.fps, options=options)
            video_out.width, video_out.height = video_in.width // 2 * 2, video_in.height // 2 * 2
            video_out.pix_fmt = "yuv420p"
            video_out.time_base = video_in.time_base
            audio_out = sink.add_stream_from_template(audio_in) if audio_in is not None else None
            report.audio_copied = audio_out is not None
            encoder = _BatchedStylizer(stylize_batch, size, batch_size, video_out, sink, report)
            dt = 1.0 / float(report.fps)
            frames = _decode_copying_audio(source, video_in, audio_in, audio_out, sink)
            with tqdm(total=video_in.frames or None, unit="frame", disable=not progress, desc="video") as bar:
                for index, frame in enumerate(frames):
                    image = frame.to_ndarray(format="rgb24")[:video_out.height, :video_out.width]
                    quads = tracker.update([f.quad for f in follower(image)], dt)
                    pts = frame.pts if frame.pts is not None else round(index / report.fps / video_in.time_base)
                    encoder.add(_Frame(image, pts, quads))
                    bar.update(1)
                encoder.flush()
                sink.mux(video_out.encode(None))
    return report


def _decode_copying_audio(source, video_in, audio_in, audio_out, sink):
    """Yield the decoded video frames; audio packets go straight to the sink as they come."""
    for packet in source.demux(*(s for s in (video_in, audio_in) if s is not None)):
        if packet.stream is audio_in:
            if packet.dts is not None:  # the demuxer's empty flush packet has none
                packet.stream = audio_out
                sink.mux(packet)
        else:
            yield from packet.decode()


class _BatchedStylizer:
    """Holds decoded frames until their faces fill a batch, stylizes them together,
    pastes them back and encodes the frames in order."""

    def __init__(self, stylize_batch: StylizeBatch, size: int, batch_size: int, stream, sink,
                 report: VideoReport):
        self.stylize_batch, self.size, self.batch_size = stylize_batch, size, batch_size
        self.stream, self.sink, self.report = stream, sink, report
        self.pending: list[_Frame] = []

    def add(self, frame: _Frame) -> None:
        self.pending.append(frame)
        if len(self.pending) >= self.batch_size or sum(len(f.quads) for f in self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        faces = [align(f.image, f.quads, self.size) for f in self.pending]
        stylized = stylize_in_batches(self.stylize_batch, torch.cat(faces), self.batch_size) if faces else None
        start = 0
        for f in self.pending:
            image = f.image
            if f.quads:
                image = paste_back(image, stylized[start:start + len(f.quads)], f.quads)
                start += len(f.quads)
            else:
                self.report.frames_without_face += 1
            self._encode(image, f.pts)
            self.report.quads.append(f.quads)
        self.pending = []

    def _encode(self, image: np.ndarray, pts: int) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = pts, self.stream.time_base
        self.sink.mux(self.stream.encode(frame))
        self.report.frames += 1


# -- CLI ---------------------------------------------------------------------------------------
def add_cli_parser(sub) -> None:
    """The ``video`` subcommand (registered by mmfs_fast.cli)."""
    from mmfs_fast.commands import common
    from mmfs_fast.faces import add_detector_options

    p = sub.add_parser("video", help="stylize the faces of a video (needs the 'faces' extra)",
                       description="Stylize every face of a video with one style (--seed, --text or --ref); "
                                   "the audio is copied through.")
    p.add_argument("input", help="video file")
    p.add_argument("output", help="output video file (e.g. out.mp4)")
    common.add_model_options(p)
    style = p.add_mutually_exclusive_group()
    style.add_argument("--text", help="text prompt style (needs CLIP)")
    style.add_argument("--ref", help="reference image style (needs CLIP)")
    p.add_argument("--seed", type=int, help="random style seed (and noise seed)")
    # "random" (NOISE_MODES' third) would redraw the noise every frame: the video would flicker
    p.add_argument("--noise", default="fixed", choices=[m for m in NOISE_MODES if m != "random"],
                   help="fixed: one noise draw for every frame (default); zero: no noise")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crf", type=int, default=18, help="x264 quality: lower is better (default 18)")
    p.add_argument("--detect-every", type=int, default=5,
                   help="run the face detector every N frames, follow the landmarks in between (default 5)")
    p.add_argument("--smoothing", type=float, default=0.5,
                   help="one-euro minimum cutoff in Hz: lower is steadier, higher follows faster (default 0.5)")
    add_detector_options(p)
    p.set_defaults(func=run_video)


def run_video(args) -> int:
    from mmfs_fast.commands import common
    from mmfs_fast.faces import FacesUnavailable, cli_setup

    if args.batch_size < 1 or args.detect_every < 1:
        raise common.UsageError("--batch-size and --detect-every must be >= 1")
    try:
        av = require("av")
    except FacesUnavailable as e:
        raise common.as_usage_error(e) from e
    try:  # before the (slow) model loads
        with av.open(args.input) as source:
            if not source.streams.video:
                raise common.UsageError(f"{args.input}: no video stream")
    except av.FFmpegError as e:
        raise common.UsageError(f"{args.input}: not a readable video ({e})") from e
    detector, mmfs, stylize_batch = cli_setup(args)
    report = stylize_video(args.input, args.output, stylize_batch, mmfs.size, args.batch_size, detector,
                           QuadTracker(min_cutoff=args.smoothing), args.detect_every)
    common.err(f"wrote {report.frames} frames at {float(report.fps):.3g} fps to {args.output}"
            + (", audio copied" if report.audio_copied else "")
            + (f"; no face in {report.frames_without_face} frame(s)" if report.frames_without_face else ""))
    return common.EXIT_OK
