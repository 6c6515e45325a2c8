"""Faces in the wild: detection, 68 landmarks, FFHQ alignment and paste-back.

MMFS expects faces aligned like FFHQ. For a photo we find every face (dlib's HOG
detector and its 68-point shape predictor, both offline: the predictor ships in
the ``face-recognition-models`` package), turn its eye and mouth landmarks into an
oriented square (the "quad") with the FFHQ recipe, and resample that square to the
model size. After stylization, :func:`paste_back` warps each stylized square back
into the photo through a feathered mask: pixels outside the squares keep their
exact original values.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i+1) × [j, j+1),
so its centre is (i + 0.5, j + 0.5). A quad lists its corners top-left, bottom-left,
bottom-right, top-right of the aligned crop, as (x, y).

Needs the ``faces`` extra: ``pip install 'mmfs_fast[faces]'``.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mmfs_fast.models.noise import NOISE_MODES

StylizeBatch = Callable[[torch.Tensor], torch.Tensor]

EXTRA_HINT = "pip install 'mmfs_fast[faces]' (dlib-bin, face-recognition-models, av)"
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
# 68-point layout (iBUG 300-W): eyes and the outer mouth corners
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)
MOUTH_LEFT, MOUTH_RIGHT = 48, 54


class FacesUnavailable(ImportError):
    """The optional ``faces`` extra is not installed."""


def require(module: str):
    """Import a dependency of the faces extra, or say how to install it."""
    try:
        return __import__(module)
    except ImportError as e:
        raise FacesUnavailable(f"{module} is missing: face alignment and video need the 'faces' extra: "
                               f"{EXTRA_HINT}") from e


def landmark_model_path() -> Path:
    # found without importing face_recognition_models: its __init__ needs pkg_resources
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacesUnavailable(f"face-recognition-models is missing (the 68-point landmark model): {EXTRA_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / LANDMARK_MODEL
    if not path.is_file():
        raise FacesUnavailable(f"{path} is missing: reinstall face-recognition-models")
    return path


# -- the FFHQ recipe ----------------------------------------------------------------
def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop square (4, 2) of 68 landmarks (68, 2).

    The square is centred a tenth of the way from the eyes' midpoint to the mouth's,
    turned so that its x axis follows the eye line (corrected by the eye-to-mouth
    direction), and its half side is the larger of 2× the eye distance and 1.8× the
    eye-to-mouth distance.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 (x, y) landmarks, got shape {lm.shape}")
    eye_left, eye_right = lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0)
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (lm[MOUTH_LEFT] + lm[MOUTH_RIGHT]) / 2 - eye_avg
    x = eye_to_eye - _turn_clockwise(eye_to_mouth)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / np.hypot(*x)
    y = _turn_clockwise(x)
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _turn_clockwise(v: np.ndarray) -> np.ndarray:
    """v turned 90° clockwise on screen (image y points down): (x, y) → (-y, x)."""
    return np.array([-v[1], v[0]])


def quad_side(quad: np.ndarray) -> float:
    return float(np.hypot(*(np.asarray(quad)[3] - np.asarray(quad)[0])))


def crop_coordinates(quad: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """Photo points (N, 2) → their positions in the ``size``² crop of ``quad``."""
    q = np.asarray(quad, dtype=np.float64)
    axes = np.stack([q[3] - q[0], q[1] - q[0]], axis=1)  # columns: crop x and y axes in the photo
    return np.linalg.solve(axes, (np.asarray(points, dtype=np.float64) - q[0]).T).T * size


# -- detection ------------------------------------------------------------------------
@dataclass(frozen=True)
class Face:
    """One detected face: box (x0, y0, x1, y1), detector score, 68 landmarks (68, 2)
    and the FFHQ quad (4, 2), all in the photo's continuous pixel coordinates."""
    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray
    quad: np.ndarray


class FaceDetector:
    """dlib's HOG face detector + 68-point landmarks.

    ``upsample``: times the detector doubles the image (finds faces down to ~40 px
    at 1, ~80 px at 0). ``min_score``: detector confidence below which a detection is
    dropped (0.5 removes most false positives). ``detect_side``: detection runs on a
    copy whose longer side is at most this (landmarks use the full resolution).
    """

    def __init__(self, upsample: int = 1, min_score: float = 0.5, detect_side: int = 1024):
        if upsample < 0 or detect_side < 64:
            raise ValueError(f"need upsample >= 0 and detect_side >= 64, got {upsample}, {detect_side}")
        dlib = require("dlib")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(landmark_model_path()))
        self.upsample, self.min_score, self.detect_side = upsample, min_score, detect_side

    def __call__(self, image: np.ndarray) -> list[Face]:
        """Faces of an (H, W, 3) uint8 RGB image, left to right."""
        image = as_rgb_array(image)
        scale = min(1.0, self.detect_side / max(image.shape[:2]))
        small = image if scale == 1.0 else _resize(image, scale)
        boxes, scores, _ = self._detector.run(small, self.upsample, 0.0)
        found = [(tuple(round(v / scale) for v in (b.left(), b.top(), b.right() + 1, b.bottom() + 1)), score)
                 for b, score in zip(boxes, scores) if score >= self.min_score]
        return sorted((self._fit(image, box, score) for box, score in found), key=lambda f: f.box)

    def refit(self, image: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> list[Face]:
        """Landmarks in given boxes (x0, y0, x1, y1), without running the detector: for
        following faces from frame to frame. Their score is NaN."""
        image = as_rgb_array(image)
        return [self._fit(image, box, math.nan) for box in boxes]

    def _fit(self, image: np.ndarray, box: tuple[int, int, int, int], score: float) -> Face:
        x0, y0, x1, y1 = box
        shape = self._predictor(image, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64) + 0.5
        return Face(box, float(score), landmarks, ffhq_quad(landmarks))


def as_rgb_array(image, max_pixels: int | None = None) -> np.ndarray:
    """A path, PIL image or array → contiguous (H, W, 3) uint8 RGB (EXIF orientation applied);
    larger than ``max_pixels`` (see mmfs_fast.io) is an ImageError."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        from mmfs_fast import io

        image = np.asarray(io.open_rgb(image, max_pixels))
    return np.ascontiguousarray(image)


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                    Image.BILINEAR))


# -- warping ----------------------------------------------------------------------------
def _window(quad: np.ndarray, margin: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The quad's bounding box grown by ``margin`` pixels, clipped to the image: x0, y0, x1, y1."""
    x0, y0 = (np.floor(quad.min(0)) - margin).clip(0, [width, height]).astype(int)
    x1, y1 = (np.ceil(quad.max(0)) + margin).clip(0, [width, height]).astype(int)
    return x0, y0, x1, y1


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 → (1, 3, h, w) float in [0, 255]."""
    return torch.tensor(pixels).permute(2, 0, 1)[None].float()


def align(image: np.ndarray, quads, size: int = 512) -> torch.Tensor:
    """Resample each quad of an (H, W, 3) uint8 image to a ``size``² crop:
    (N, 3, size, size) float in [-1, 1]. Parts of a quad outside the photo are mirrored
    (FFHQ also blurs them; the paste-back mask hides them anyway)."""
    image = as_rgb_array(image)
    height, width = image.shape[:2]
    crops = []
    for quad in np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2):
        # average-pool by an integer factor first (FFHQ's "shrink") so that bicubic
        # sampling never minifies by 2× or more and does not alias
        shrink = max(1, int(quad_side(quad) / size))
        # only the quad's window is converted; the margin covers the bicubic taps, so the
        # window's edges matter only where they are the photo's (and mirror there)
        x0, y0, x1, y1 = _window(quad, 3 * shrink, width, height)
        src = _to_tensor(image[y0:y1, x0:x1]) / 127.5 - 1
        pooled = F.avg_pool2d(src, shrink) if shrink > 1 else src
        t = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        q = torch.from_numpy((quad - [x0, y0]) / shrink)
        points = q[0] + t[None, :, None] * (q[3] - q[0]) + t[:, None, None] * (q[1] - q[0])  # (size, size, 2)
        pooled_height, pooled_width = pooled.shape[-2:]
        grid = points / torch.tensor([pooled_width, pooled_height], dtype=torch.float64) * 2 - 1
        crops.append(F.grid_sample(pooled, grid[None].float(), mode="bicubic", padding_mode="reflection",
                                   align_corners=False))
    if not crops:
        return torch.zeros(0, 3, size, size)
    return torch.cat(crops).clamp(-1, 1)


def paste_back(image: np.ndarray, crops: torch.Tensor, quads, feather: float = 0.1) -> np.ndarray:
    """Warp each (3, S, S) crop in [-1, 1] back onto its quad of the (H, W, 3) uint8 image.

    The mask is 1 inside the crop square and falls smoothly to 0 over its outer
    ``feather`` fraction, so there is no seam; pixels outside every quad are returned
    unchanged, bit for bit.
    """
    image = as_rgb_array(image)
    quads = np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2)
    if len(crops) != len(quads):
        raise ValueError(f"{len(crops)} crops for {len(quads)} quads")
    if not 0 < feather <= 0.5:
        raise ValueError(f"feather must be in (0, 0.5], got {feather}")
    out = image.copy()
    height, width = image.shape[:2]
    for crop, quad in zip(crops, quads):
        x0, y0, x1, y1 = _window(quad, 0, width, height)
        if x0 >= x1 or y0 >= y1:
            continue
        crop = crop.detach().float().cpu()[None]
        side = quad_side(quad)
        if side < crop.shape[-1]:  # minify with a proper low-pass before sampling
            crop = F.interpolate(crop, size=max(1, math.ceil(side)), mode="bilinear", antialias=True,
                                 align_corners=False)
        xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
        uv = torch.from_numpy(crop_coordinates(quad, np.stack([xs.ravel(), ys.ravel()], 1), 1)).float()
        uv = uv.reshape(y1 - y0, x1 - x0, 2)
        warped = F.grid_sample(crop, uv[None] * 2 - 1, mode="bicubic", padding_mode="border",
                               align_corners=False)[0]
        edge = torch.minimum(uv, 1 - uv).amin(-1)  # distance to the square's border, in crop sides
        ramp = (edge / feather).clamp(0, 1)
        mask = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no kink where the ramp starts
        region = _to_tensor(out[y0:y1, x0:x1])[0]
        region += mask * ((warped * 127.5 + 127.5) - region)
        out[y0:y1, x0:x1] = region.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out


# -- stylizing ---------------------------------------------------------------------------------
def stylize_in_batches(stylize_batch: StylizeBatch, faces: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Run (N, 3, S, S) faces through ``stylize_batch`` at most ``batch_size`` at a time;
    the result is a float CPU tensor."""
    if len(faces) == 0:
        return faces
    return torch.cat([stylize_batch(faces[i:i + batch_size]).float().cpu() for i in range(0, len(faces), batch_size)])


def mmfs_stylize_batch(mmfs, w_plus: torch.Tensor, noise: str = "fixed", seed: int = 0) -> StylizeBatch:
    """A ``stylize_batch`` that renders every face with :class:`mmfs_fast.MMFS` in one style.
    ``noise`` (one of :data:`~mmfs_fast.models.noise.NOISE_MODES`), drawn from ``seed`` so a
    run repeats exactly: "fixed" draws one set of maps and reuses it for every face of every
    call, so a video does not flicker; "random" draws new maps per face; "zero" uses none."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    generator = torch.Generator().manual_seed(seed)
    if noise == "random":
        return lambda faces: mmfs.render(faces, w_plus, mmfs.random_noise(len(faces), generator))
    maps = mmfs.random_noise(1, generator) if noise == "fixed" else noise
    return lambda faces: mmfs.render(faces, w_plus, maps)


# -- photos ----------------------------------------------------------------------------------
@dataclass
class PhotoResult:
    """Faces found in one photo, their stylized crops (N, 3, S, S) in [-1, 1] and, with
    paste-back, the photo with the crops pasted in (H, W, 3) uint8."""
    faces: list[Face]
    crops: torch.Tensor
    composite: np.ndarray | None


def stylize_photo(image, stylize_batch: StylizeBatch, detector: FaceDetector, size: int = 512,
                  batch_size: int = 8, paste: bool = True) -> PhotoResult:
    """Detect, align, stylize (``stylize_batch``: (B, 3, size, size) → same, in [-1, 1])
    and optionally paste back every face of one photo. No face → empty crops and the
    photo itself as the composite."""
    image = as_rgb_array(image)
    faces = detector(image)
    crops = stylize_in_batches(stylize_batch, align(image, [f.quad for f in faces], size), batch_size)
    composite = paste_back(image, crops, [f.quad for f in faces]) if paste else None
    return PhotoResult(faces, crops, composite)


def stylize_photo_files(files: list[tuple[Path, str]], stylize_batch: StylizeBatch, out_dir: Path,
                        size: int = 512, batch_size: int = 8, paste: bool = False,
                        detector: FaceDetector | None = None,
                        max_pixels: int | None = None) -> Iterator[tuple[Path, PhotoResult | Exception]]:
    """Stylize every face of each (input path, output stem) and write
    ``<stem>_face<i>.png`` (and ``<stem>.png``, the pasted photo, with ``paste``).
    Yields (path, result), or (path, ImageError) for an unreadable file (or one above
    ``max_pixels``)."""
    from PIL import Image

    from mmfs_fast import atomic, io

    detector = detector or FaceDetector()
    out_dir = Path(out_dir)
    for path, stem in files:
        try:
            image = as_rgb_array(path, max_pixels)
        except io.ImageError as e:
            yield path, e
            continue
        result = stylize_photo(image, stylize_batch, detector, size, batch_size, paste)
        for i, crop in enumerate(result.crops):
            io.save_image(crop, out_dir / f"{stem}_face{i}.png")
        if paste and result.faces:
            atomic.save_pil(Image.fromarray(result.composite), out_dir / f"{stem}.png")
        yield path, result


def add_detector_options(parser) -> None:
    """Face detector options, shared by ``stylize --align`` and ``video``."""
    parser.add_argument("--upsample", type=int, default=1,
                        help="face detector upsampling: 1 finds faces down to ~40 px, 0 is faster (default 1)")
    parser.add_argument("--min-face-score", type=float, default=0.5,
                        help="drop detections below this detector score (default 0.5)")


def add_align_options(parser) -> None:
    """``stylize --align [--paste-back]`` options, for the CLI's stylize parser."""
    group = parser.add_argument_group("faces in photos (needs the 'faces' extra)")
    group.add_argument("--align", action="store_true",
                       help="find every face (dlib), FFHQ-align it and stylize the crops: <name>_face<i>.png")
    group.add_argument("--paste-back", action="store_true",
                       help="with --align, also write <name>.png: the photo with the stylized faces pasted in")
    add_detector_options(group)


def cli_setup(args) -> tuple[FaceDetector, object, StylizeBatch]:
    """The face detector, the model and a one-style ``stylize_batch`` (noise ``args.noise``) of a
    CLI run (``mmfs-fast stylize --align`` or ``video``); problems become usage errors."""
    from mmfs_fast import io
    from mmfs_fast.commands import common

    try:
        detector = FaceDetector(upsample=args.upsample, min_score=args.min_face_score)
    except (FacesUnavailable, ValueError) as e:
        raise common.as_usage_error(e) from e
    mmfs = common.load_mmfs(args)
    style = common.style_args(args)
    try:
        w_plus = mmfs.style(**style)
    except io.ImageError as e:  # the --ref image
        raise common.as_usage_error(e) from e
    return detector, mmfs, mmfs_stylize_batch(mmfs, w_plus, args.noise, seed=style["seed"] or 0)


def run_stylize_align(args, files: list[tuple[Path, str]]) -> int:
    """``mmfs-fast stylize --align``: the CLI's stylize calls this when --align is given."""
    from mmfs_fast import io
    from mmfs_fast.commands import common

    detector, mmfs, stylize_batch = cli_setup(args)
    failed = no_face = written = 0
    for path, result in stylize_photo_files(files, stylize_batch, Path(args.out), mmfs.size, args.batch_size,
                                            args.paste_back, detector, getattr(args, "max_pixels", None)):
        if isinstance(result, io.ImageError):
            failed += 1
            common.err(f"error: {result.cli_message()}")
        elif not result.faces:
            no_face += 1
            common.err(f"no face found in {path}")
        else:
            written += len(result.faces)
    common.err(f"wrote {written} face(s) from {len(files) - failed - no_face} photo(s) to {args.out}"
            + (f"; no face in {no_face}" if no_face else "") + (f"; {failed} failed" if failed else ""))
    if failed or not written:  # no face in any photo is a failure too: scripts can tell it from success
        return common.EXIT_SOME_FAILED
    return common.EXIT_OK
