"""Training configuration: one dataclass for all three stages (SPEC §6), read from a
YAML/JSON file and overridden by command-line flags."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mmfs_fast.train.losses import AUGMENTATIONS

STAGES = (1, 2, 3)
# stage → (paper iterations, Adam lr, Adam betas) per SPEC §6
STAGE_DEFAULTS = {1: (10_000, 1e-3, (0.1, 0.999)), 2: (90_000, 1e-3, (0.1, 0.999)), 3: (60_000, 2e-4, (0.9, 0.999))}


@dataclasses.dataclass
class TrainConfig:
    stage: int = 1
    out_dir: str = "runs/mmfs"
    # Stage I: a rosinality StyleGAN2 checkpoint (g_ema or g, and d); II/III: the previous stage's latest.pt
    init: str | None = None
    face_dir: str | None = None  # Stage II/III sources (FFHQ-like faces)
    art_dir: str | None = None  # Stage II real images of the target style
    dino_weights: str | None = None  # Stage II structure loss
    clip_weights: str | None = None  # Stage III
    random_init: bool = False  # random teacher / DINO / CLIP instead of weight files: tests and smoke runs only
    trust_torchscript: bool = False  # accept CLIP weights that are a TorchScript archive (its code runs)
    resume: bool = False
    # model (the official architecture is 512 / 64 / 512 / 8 / 64)
    size: int = 512
    ngf: int = 64
    style_dim: int = 512
    n_mlp: int = 8
    d_base: int = 64
    impl: str = "auto"
    # optimisation
    steps: int | None = None  # default: the paper's iterations for the stage
    batch_size: int = 8  # per process
    lr: float | None = None  # default: SPEC §6 for the stage
    ema_decay: float = 0.999
    mixing: float = 0.5
    feature_weight: float = 4.0
    structure_weight: float = 0.5
    r1_gamma: float = 10.0
    r1_every: int = 16
    augment: tuple[str, ...] = ()  # any of AUGMENTATIONS, for small art sets (Stage II discriminator inputs)
    amp: bool = True  # bf16 autocast on GPUs
    seed: int = 0
    # data and bookkeeping
    workers: int = 2
    min_image_size: int = 64  # smaller images are skipped
    sample_every: int = 500
    checkpoint_every: int = 1000
    device: str | None = None  # default: cuda when available

    def __post_init__(self):
        if isinstance(self.augment, str):
            self.augment = tuple(a for a in self.augment.split(",") if a)
        self.augment = tuple(self.augment)
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if unknown := [a for a in self.augment if a not in AUGMENTATIONS]:
            problems.append(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        for name in ("batch_size", "r1_every", "sample_every", "checkpoint_every", "size", "ngf", "style_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.mixing <= 1:
            problems.append(f"mixing must be a probability, got {self.mixing}")
        if self.stage in (2, 3) and self.face_dir is None:
            problems.append(f"stage {self.stage} needs face_dir (a folder of face images)")
        if self.stage == 2 and self.art_dir is None:
            problems.append("stage 2 needs art_dir (a folder of images in the target style)")
        if self.init is None and not self.random_init:
            what = "a StyleGAN2 checkpoint" if self.stage == 1 else f"the stage {self.stage - 1} checkpoint"
            problems.append(f"stage {self.stage} needs init ({what}); random_init=True only for tests")
        if problems:
            raise ValueError("bad training config:\n  " + "\n  ".join(problems))

    @property
    def total_steps(self) -> int:
        return STAGE_DEFAULTS[self.stage][0] if self.steps is None else self.steps

    @property
    def learning_rate(self) -> float:
        return STAGE_DEFAULTS[self.stage][1] if self.lr is None else self.lr

    @property
    def betas(self) -> tuple[float, float]:
        return STAGE_DEFAULTS[self.stage][2]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_config_file(path) -> dict:
    """The settings of a .yaml/.yml or .json file (a flat mapping of TrainConfig fields)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML config files need PyYAML (pip install pyyaml); "
                             "or write the settings as .json") from None
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: config files are .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    if unknown := sorted(set(data) - set(field_names())):
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(field_names())}")
    return data


def make_config(config_file=None, **overrides) -> TrainConfig:
    """Settings from ``config_file``, then ``overrides`` (None values are ignored)."""
    settings = read_config_file(config_file) if config_file else {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings)
