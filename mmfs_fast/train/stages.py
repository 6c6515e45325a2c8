"""The three MMFS training stages (SPEC §6): what each builds, trains and logs.

A stage owns the training generator ``G``, its EMA copy ``G_ema`` (the exported
model), the discriminator ``D``, one Adam optimiser per trained network and the
parameters each optimiser updates. ``train_step`` runs one iteration and returns
its loss terms; ``sample_rows`` renders fixed inputs without touching the global RNG.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from mmfs_fast.losses import dino_structure_loss
from mmfs_fast.models import Discriminator, Generator, Stylizer, StylizerConfig
from mmfs_fast.models.checkpoint import (STYLEGAN2_UNCOVERED, CheckpointError, load_state, read_checkpoint,
                                         stylegan2_discriminator_to, stylegan2_to_stylizer)
from mmfs_fast.train.config import TrainConfig
from mmfs_fast.train.distributed import World, average_gradients
from mmfs_fast.train.losses import (augment, discriminator_gan_loss, feature_l1, generator_gan_loss,
                                    r1_penalty)
from mmfs_fast.train.state import read_stage_checkpoint

N_SAMPLES = 8


class Stage:
    datasets: tuple[str, ...] = ()  # TrainConfig fields naming the image folders each step needs

    def __init__(self, cfg: TrainConfig, world: World, encoders: dict):
        self.cfg, self.world, self.encoders = cfg, world, encoders
        self.device = world.device
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                          enabled=cfg.amp and self.device.type == "cuda")
        self.sample_generator = torch.Generator().manual_seed(cfg.seed)
        self.G, self.D = self.build()
        self.G.to(self.device).requires_grad_(False)
        self.D.to(self.device).requires_grad_(False)
        self.params = {name: list(params) for name, params in self.trainable().items()}
        for params in self.params.values():
            for p in params:
                p.requires_grad_(True)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.optimizers = self.make_optimizers()

    # -- what a stage defines ------------------------------------------------------
    def build(self) -> tuple[Stylizer, Discriminator]:
        raise NotImplementedError

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        raise NotImplementedError

    def sample_rows(self, faces: torch.Tensor | None) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------
    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: torch.optim.Adam(params, lr=self.cfg.learning_rate, betas=self.cfg.betas)
                for name, params in self.params.items()}

    def stylizer(self, clip_mapper: bool) -> Stylizer:
        cfg = self.cfg
        return Stylizer(StylizerConfig(cfg.size, cfg.ngf, cfg.style_dim, cfg.n_mlp, clip_mapper), impl=cfg.impl)

    def discriminator(self) -> Discriminator:
        return Discriminator(self.cfg.size, base=self.cfg.d_base, impl=self.cfg.impl)

    def optimizer_step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.world, self.params[name])
        optimizer.step()

    def reconstruction_step(self, render, target: torch.Tensor) -> dict[str, float]:
        """One G step on L1(render(), target) + feature_weight · D-feature L1 (Stages I and III)."""
        with self.autocast():
            out = render()
            l1 = F.l1_loss(out, target)
            features = feature_l1(self.D, out, target)
            loss = l1 + self.cfg.feature_weight * features
        self.optimizer_step("G", loss)
        return {"l1": l1.item(), "d_feature": features.item(), "total": loss.item()}

    @torch.no_grad()
    def update_ema(self) -> None:
        ema = dict(self.G_ema.named_parameters())
        for name, p in self.G.named_parameters():
            if p.requires_grad:
                ema[name].lerp_(p, 1 - self.cfg.ema_decay)

    def random_mixing(self) -> bool:
        return bool(torch.rand(()) < self.cfg.mixing)

    def sample_z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.style_dim, generator=self.sample_generator).to(self.device)


def _load_previous_stage(cfg: TrainConfig, G: Stylizer, D: Discriminator, uncovered: tuple[str, ...] = ()) -> None:
    if cfg.init is not None:
        contents = read_stage_checkpoint(cfg.init)
        load_state(G, contents["G_ema_model"], uncovered)
        load_state(D, contents["D_model"])


class EncoderStage(Stage):
    """Stage I: the frozen StyleGAN2 teacher renders x = hardtanh(G_t(z)); the Stylizer learns
    to reproduce x from (x, z) with its mapping and 64–512 px decoder taken from the teacher."""

    def build(self):
        cfg = self.cfg
        if cfg.init is None:  # a random teacher with the Stylizer's channel table (layers.channel_count)
            self.teacher = Generator(cfg.size, cfg.style_dim, cfg.n_mlp, channel_base=cfg.ngf * cfg.size,
                                     channel_max=8 * cfg.ngf, impl=cfg.impl)
            name = "random teacher"
        else:
            contents, _ = read_checkpoint(cfg.init)
            g = contents.get("g_ema", contents.get("g"))
            if g is None or "d" not in contents:
                raise CheckpointError(f"{cfg.init}: Stage I needs a rosinality StyleGAN2 checkpoint with "
                                      f"'g_ema' (or 'g') and 'd'; found {', '.join(list(contents)[:5])}")
            name = str(cfg.init)
            self.teacher = Generator.from_state(g, name, impl=cfg.impl)
        seed_state, seeding = stylegan2_to_stylizer(self.teacher.state_dict(), cfg.size, name)
        D = self.discriminator()
        if cfg.init is not None:
            d, d_uncovered = stylegan2_discriminator_to(contents["d"], cfg.size, name)
            self._load(D, d, d_uncovered, name)
            if d_uncovered:
                seeding += f"; D: its input layer {', '.join(p.rstrip('.') for p in d_uncovered)} starts random"
        self.teacher.to(self.device).eval().requires_grad_(False)
        G = self.stylizer(clip_mapper=False)
        self._load(G, seed_state, STYLEGAN2_UNCOVERED, name)
        if self.world.is_main:
            print(seeding, flush=True)
        return G, D

    @staticmethod
    def _load(model: nn.Module, state: dict, uncovered: tuple[str, ...], name: str) -> None:
        try:
            load_state(model, state, uncovered)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from e

    def teacher_images(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        """x = hardtanh(G_t(z)) at the Stylizer's size: a larger teacher's image is box-downsampled,
        which is what its own size-px RGB branch approximates."""
        x = self.teacher(z=z, **kwargs).clamp(-1, 1)
        if self.teacher.size > self.cfg.size:
            x = F.avg_pool2d(x, self.teacher.size // self.cfg.size)
        return x

    def trainable(self):
        return {"G": [p for part in (self.G.encoder, self.G.decoder0, self.G.to_rgb0) for p in part.parameters()]}

    def train_step(self, batch, step):
        z = torch.randn(self.cfg.batch_size, self.cfg.style_dim, device=self.device)
        with torch.no_grad(), self.autocast():
            x = self.teacher_images(z).float()
        return self.reconstruction_step(lambda: self.G(x, z=z), x)

    @torch.no_grad()
    def sample_rows(self, faces):
        z = self.sample_z(N_SAMPLES)
        x = self.teacher_images(z, noise="zero")
        return [x, self.G_ema(x, z=z, noise="zero")]


class StylizationStage(Stage):
    """Stage II: adversarial training of the whole Stylizer towards the art images, with the
    DINO structure loss keeping the source face's layout."""

    datasets = ("face_dir", "art_dir")

    def build(self):
        G, D = self.stylizer(clip_mapper=False), self.discriminator()
        _load_previous_stage(self.cfg, G, D)
        self.dino = self.encoders.get("dino")
        if self.dino is None:
            from mmfs_fast.encoders import DINOEncoder

            self.dino = DINOEncoder(self.cfg.dino_weights, random_init=self.cfg.random_init, device=self.device)
        return G, D

    def trainable(self):
        return {"G": list(self.G.parameters()), "D": list(self.D.parameters())}

    def make_optimizers(self):
        # lazy R1 (SPEC §6): D's lr and betas are rescaled by r1_every / (r1_every + 1)
        ratio = self.cfg.r1_every / (self.cfg.r1_every + 1)
        betas = tuple(b ** ratio for b in self.cfg.betas)
        return {"G": torch.optim.Adam(self.params["G"], lr=self.cfg.learning_rate, betas=self.cfg.betas),
                "D": torch.optim.Adam(self.params["D"], lr=self.cfg.learning_rate * ratio, betas=betas)}

    def train_step(self, batch, step):
        cfg, faces, art = self.cfg, batch["face_dir"], batch["art_dir"]
        terms = {}
        self.D.requires_grad_(True)
        with torch.no_grad(), self.autocast():
            fake = self.G(faces, mixing=self.random_mixing()).float()
        with self.autocast():
            d_loss = discriminator_gan_loss(self.D(augment(art, cfg.augment)), self.D(augment(fake, cfg.augment)))
        self.optimizer_step("D", d_loss)
        terms["d_gan"] = d_loss.item()
        if step % cfg.r1_every == 0:
            # in fp32: the double backward of a bf16 penalty is too coarse
            r1 = r1_penalty(self.D, augment(art, cfg.augment))
            self.optimizer_step("D", cfg.r1_gamma / 2 * r1 * cfg.r1_every)
            terms["r1"] = r1.item()
        self.D.requires_grad_(False)
        with self.autocast():
            fake = self.G(faces, mixing=self.random_mixing())
            g_gan = generator_gan_loss(self.D(augment(fake, cfg.augment)))
            structure = dino_structure_loss(self.dino, fake, faces)
            g_loss = g_gan + cfg.structure_weight * structure
        self.optimizer_step("G", g_loss)
        return {**terms, "g_gan": g_gan.item(), "structure": structure.item(), "g_total": g_loss.item()}

    @torch.no_grad()
    def sample_rows(self, faces):
        return [faces, self.G_ema(faces, z=self.sample_z(len(faces)), noise="zero")]


class MapperStage(Stage):
    """Stage III: the CLIP mapper learns to reproduce G_ema's random styles from the CLIP
    embedding of the stylized image."""

    datasets = ("face_dir",)

    def build(self):
        G, D = self.stylizer(clip_mapper=True), self.discriminator()
        _load_previous_stage(self.cfg, G, D, uncovered=("clip_mapper.",))
        self.clip = self.encoders.get("clip")
        if self.clip is None:
            from mmfs_fast.encoders import CLIPEncoder

            self.clip = CLIPEncoder(self.cfg.clip_weights, random_init=self.cfg.random_init, device=self.device,
                                    trust_torchscript=self.cfg.trust_torchscript)
        return G, D

    def trainable(self):
        return {"G": list(self.G.clip_mapper.parameters())}

    def train_step(self, batch, step):
        faces = batch["face_dir"]
        with torch.no_grad(), self.autocast():
            reference = self.G_ema(faces, mixing=self.random_mixing()).float()
            embedding = self.clip.encode_image(reference).float()
        return self.reconstruction_step(lambda: self.G(faces, clip_feats=embedding), reference)

    @torch.no_grad()
    def sample_rows(self, faces):
        reference = self.G_ema(faces, z=self.sample_z(len(faces)), noise="zero")
        return [faces, reference, self.G_ema(faces, clip_feats=self.clip.encode_image(reference), noise="zero")]


STAGES = {1: EncoderStage, 2: StylizationStage, 3: MapperStage}
