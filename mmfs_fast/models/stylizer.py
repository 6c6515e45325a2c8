"""The MMFS Stylizer (SPEC §3): a convolutional encoder (512² face → 32²×512
features) and a StyleGAN2 decoder rendering them in a style given by w+."""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from mmfs_fast.models import checkpoint
from mmfs_fast.models.clip_mapper import CLIPMapper
from mmfs_fast.models.layers import (ConvLayer, EqualLinear, PixelNorm, ResBlock, StyledConv, ToRGB,
                                     channel_count, set_impl, synthesize)
from mmfs_fast.models.noise import NoiseSpec, make_noises

N_LATENT = 10
N_UPSAMPLINGS = 4  # decoder: size/16 → size
N_CONVS = 1 + 2 * N_UPSAMPLINGS


def z_from_seeds(seeds: list[int], style_dim: int) -> torch.Tensor:
    """(B, style_dim) latents z ~ N(0, I), each drawn on the CPU from its own seed: the same
    on every device and however the seeds are batched."""
    return torch.stack([torch.randn(style_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# What a config may ask for: far beyond the official model (512², ngf 64, style_dim 512,
# n_mlp 8) but bounded, so that a crafted file cannot make the loader build a huge model.
CONFIG_BOUNDS = {"size": (16, 1024), "ngf": (1, 128), "style_dim": (1, 1024), "n_mlp": (0, 16)}


@dataclasses.dataclass(frozen=True)
class StylizerConfig:
    size: int = 512
    ngf: int = 64
    style_dim: int = 512
    n_mlp: int = 8
    clip_mapper: bool = True

    def __post_init__(self):
        for field, (low, high) in CONFIG_BOUNDS.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{field} must be an int in [{low}, {high}], got {value!r}")
        if self.size % 16 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 16, got {self.size}")
        if not isinstance(self.clip_mapper, bool):
            raise ValueError(f"clip_mapper must be true or false, got {self.clip_mapper!r}")

    @classmethod
    def from_dict(cls, config, name: str) -> "StylizerConfig":
        """The config of a checkpoint's metadata; a CheckpointError naming ``name`` for unknown
        keys, wrong types or values outside :data:`CONFIG_BOUNDS`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(config, dict) or set(config) - fields:
            unknown = sorted(map(str, set(config) - fields)) if isinstance(config, dict) else config
            raise checkpoint.CheckpointError(f"{name}: its config has unknown entries {unknown}; expected some of "
                                             f"{sorted(fields)}")
        try:
            return cls(**config)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"{name}: its config is not a Stylizer's: {e}") from None


class Stylizer(nn.Module):
    def __init__(self, config: StylizerConfig | None = None, impl: str = "auto", **overrides):
        super().__init__()
        config = dataclasses.replace(config or StylizerConfig(), **overrides)
        self.config = config
        size, ngf, dim = config.size, config.ngf, config.style_dim
        self.encoder = nn.Sequential(
            ConvLayer(3, ngf, 3), ResBlock(ngf, ngf), ResBlock(ngf, 2 * ngf), ResBlock(2 * ngf, 4 * ngf),
            ResBlock(4 * ngf, 8 * ngf), ConvLayer(8 * ngf, 8 * ngf, 3))
        self.mapping_z = nn.Sequential(
            PixelNorm(), *[EqualLinear(dim, dim, lr_mul=0.01, activation="lrelu") for _ in range(config.n_mlp)])
        res = self.feature_size
        self.decoder0 = StyledConv(8 * ngf, channel_count(res, size, ngf), 3, dim)
        self.to_rgb0 = ToRGB(channel_count(res, size, ngf), dim, upsample=False)
        for i in range(1, N_UPSAMPLINGS + 1):
            c_in, c_out = channel_count(res, size, ngf), channel_count(2 * res, size, ngf)
            setattr(self, f"decoder{i}a", StyledConv(c_in, c_out, 3, dim, upsample=True))
            setattr(self, f"decoder{i}b", StyledConv(c_out, c_out, 3, dim))
            setattr(self, f"to_rgb{i}", ToRGB(c_out, dim))
            res *= 2
        self.clip_mapper = CLIPMapper(dim, N_LATENT) if config.clip_mapper else None
        set_impl(self, impl)

    # -- shapes ---------------------------------------------------------------
    @property
    def feature_size(self) -> int:
        return self.config.size // 2 ** N_UPSAMPLINGS

    @property
    def noise_resolutions(self) -> list[int]:
        """Resolution of each conv's noise, in layer order decoder0, decoder1a, decoder1b, …, decoder4b."""
        r = self.feature_size
        return [r] + [r * 2 ** (i // 2 + 1) for i in range(2 * N_UPSAMPLINGS)]

    @property
    def feature_channels(self) -> int:
        return 8 * self.config.ngf

    def _param(self) -> torch.Tensor:
        return self.decoder0.conv.weight

    def _check_input(self, name: str, t: torch.Tensor, shape: tuple) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ref = self._param()
        if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} is {t.dtype} but the model is {ref.dtype}; convert one of them")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the model is on {ref.device}")

    # -- the pieces -----------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, size, size) face in [-1, 1] → (B, 8·ngf, size/16, size/16) features."""
        self._check_input("x", x, (None, 3, self.config.size, self.config.size))
        return self.encoder(x)

    def map_z(self, z: torch.Tensor) -> torch.Tensor:
        """(B, style_dim) z → (B, style_dim) w."""
        self._check_input("z", z, (None, self.config.style_dim))
        return self.mapping_z(z)

    def map_clip(self, clip_feats: torch.Tensor) -> torch.Tensor:
        """(B, style_dim) CLIP embeddings → (B, 10, style_dim) w+."""
        if self.clip_mapper is None:
            raise RuntimeError("this Stylizer has no clip_mapper (phase 1/2 checkpoint): text and reference "
                               "styles need a phase 3/4 checkpoint")
        self._check_input("clip_feats", clip_feats, (None, self.config.style_dim))
        return self.clip_mapper(clip_feats)

    def decode(self, feat: torch.Tensor, w_plus: torch.Tensor, noise: NoiseSpec = "random",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Encoder features + (B, 10, style_dim) w+ → image in [-1, 1]."""
        r = self.feature_size
        self._check_input("feat", feat, (None, self.feature_channels, r, r))
        self._check_input("w_plus", w_plus, (feat.shape[0], N_LATENT, self.config.style_dim))
        noises = make_noises(noise, feat.shape[0], self.noise_resolutions, feat.device, feat.dtype, generator)
        return self.synthesize(feat, w_plus, noises).clamp(-1, 1)

    def synthesize(self, feat: torch.Tensor, w_plus: torch.Tensor,
                   noises: list[torch.Tensor | None] | None) -> torch.Tensor:
        """The decoder on checked inputs, unclamped: one noise map (or None) per conv, or None
        for no noise at all."""
        first_conv, first_rgb, *rest = (getattr(self, name) for name in self.decoder_layer_names())
        blocks = [rest[i:i + 3] for i in range(0, len(rest), 3)]
        return synthesize(first_conv, first_rgb, blocks, feat, w_plus, noises or [None] * N_CONVS)

    @staticmethod
    def decoder_layer_names() -> list[str]:
        """The decoder's layers in synthesis order: decoder0 and to_rgb0, then per upsampling
        decoder{i}a (upsampling), decoder{i}b and to_rgb{i}."""
        return ["decoder0", "to_rgb0"] + [name for i in range(1, N_UPSAMPLINGS + 1)
                                          for name in (f"decoder{i}a", f"decoder{i}b", f"to_rgb{i}")]

    def style_from_z(self, z: torch.Tensor, mixing: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """w+ of z: w repeated over the 10 slots; with ``mixing`` a second random w
        takes over from a crossover slot drawn uniformly in [1, 9]."""
        w = self.map_z(z)[:, None].expand(-1, N_LATENT, -1)
        if not mixing:
            return w
        z2 = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        w2 = self.map_z(z2)[:, None].expand(-1, N_LATENT, -1)
        crossover = int(torch.randint(1, N_LATENT, (), generator=generator, device=z.device))
        return torch.cat([w[:, :crossover], w2[:, crossover:]], dim=1)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None, w_plus: torch.Tensor | None = None,
                clip_feats: torch.Tensor | None = None, mixing: bool = False, noise: NoiseSpec = "random",
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Stylize faces x (B, 3, size, size) in [-1, 1].

        The style is one of: z (B, style_dim), w_plus (B, 10, style_dim) or
        clip_feats (B, style_dim); with none of them a random z is drawn from
        ``generator``. ``mixing`` mixes a second random style into z styles.
        """
        given = [name for name, v in (("z", z), ("w_plus", w_plus), ("clip_feats", clip_feats)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one style source, got {', '.join(given)}")
        if mixing and (w_plus is not None or clip_feats is not None):
            raise ValueError("mixing applies to z styles only")
        feat = self.encode(x)
        if w_plus is None:
            if clip_feats is not None:
                w_plus = self.map_clip(clip_feats)
            else:
                if z is None:
                    z = torch.randn(x.shape[0], self.config.style_dim, device=x.device, dtype=x.dtype,
                                    generator=generator)
                w_plus = self.style_from_z(z, mixing, generator)
        if w_plus.shape[0] != x.shape[0]:
            raise ValueError(f"the style has batch {w_plus.shape[0]} but x has batch {x.shape[0]}")
        return self.decode(feat, w_plus, noise, generator)

    def set_impl(self, impl: str) -> "Stylizer":
        set_impl(self, impl)
        return self

    # -- checkpoints ----------------------------------------------------------
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the official MMFS key layout (the ``G_ema_model`` of a checkpoint)."""
        return {k: v.detach().float().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def from_checkpoint(cls, src, device="cpu", dtype=torch.float32, impl: str = "auto",
                        allow_cast: bool = False) -> "Stylizer":
        """Load an official MMFS checkpoint (``G_ema_model``), a bare official Stylizer state
        dict, a rosinality StyleGAN2 checkpoint (the encoder then stays random) or a file
        saved by :meth:`save`. ``src`` is a path or an already loaded dict.

        Everything is checked before the model is built: the config against
        :data:`CONFIG_BOUNDS`, then every key and shape (so the parameter bytes) against a
        model built on the meta device, which allocates nothing; weights must be finite and
        floating point (``allow_cast``: integer/bool ones are cast to float32)."""
        state, config, uncovered = checkpoint.stylizer_state(src, allow_cast)
        name = checkpoint.source_name(src)
        config = StylizerConfig.from_dict(config, name)
        with torch.device("meta"):
            skeleton = cls(config, impl=impl)
        problems = checkpoint.state_problems(skeleton.state_dict(), state, uncovered)
        if problems:
            covered = lambda d: sum(t.numel() for k, t in d.items() if not k.startswith(uncovered))  # noqa: E731
            raise checkpoint.CheckpointError(
                f"{name} does not fit its config {config}: that model has {covered(skeleton.state_dict()):,} "
                f"parameters, the file {covered(state):,}:\n  " + "\n  ".join(problems))
        del skeleton
        if uncovered:
            warnings.warn("loading a StyleGAN2 generator: encoder, decoder0 and to_rgb0 keep their random "
                          "initialisation until MMFS Stage I trains them", stacklevel=2)
        model = cls(config, impl=impl)
        checkpoint.load_state(model, state, uncovered, name)
        return model.to(device=device, dtype=dtype).eval()

    def save(self, path) -> None:
        """One safetensors file: the official keys, and the config as JSON metadata."""
        checkpoint.save_safetensors(self.official_state_dict(), dataclasses.asdict(self.config), path)
