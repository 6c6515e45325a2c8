"""One-shot (reference image) and zero-shot (text) fine-tuning of the decoder (SPEC §5–6, stage IV).

Only the decoder (decoder*, to_rgb*) learns, from λ_st·L_structure + λ_clip·L_directional
(+ λ_proj·L_projection for image prompts), with Adam and an exponential moving average of the
decoder that becomes the result. By default a run does what the official fine-tune does:

- DINO sees the images resized without antialiasing (:class:`~mmfs_fast.encoders.DINOEncoder`'s
  ``antialias=False``, the official pinned torchvision's tensor ``Resize``);
- the style w+ comes from the clip_mapper in training mode at every step: its dropout (0.1)
  gives each sample and step a slightly different style (``fixed_style=True``: once, in eval mode);
- the official schedule: ``steps`` (200) at full lr, then ``decay_steps`` (9) with the lr falling
  linearly, 10/11 → 2/11 of it (``decay_steps=0``: constant lr).

The fast path (``fast=True``) does once what is constant over the run: the prompt's embedding
and token basis, the faces' encoder features, CLIP embeddings and DINO self-similarities. A
step is then batch draw → clip_mapper → decoder → CLIP and DINO of the fakes → losses →
backward → Adam → EMA, without a host sync; on CUDA in bf16 autocast (statistics, losses and
the optimizer in fp32), channels-last, and captured into one CUDA graph. ``fast=False`` is the
reference: the official computation in eager fp32 (per-sample modulated convolution, the faces
re-encoded every step).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from mmfs_fast.atomic import make_dirs, remove_stale_temps, save_torch
from mmfs_fast.errors import CheckpointError, UsageError, one_line, option
from mmfs_fast.losses import directional_clip_loss, projection_loss, structure_loss, token_basis
from mmfs_fast.models import set_fused_modconv
from mmfs_fast.models.checkpoint import state_problems
from mmfs_fast.validation import check_seed

STATE_FILE = "finetune_state.pt"
RESUME_KEYS = ("step", "history", "settings", "prompt", "decoder", "ema", "optimizer", "rng", "cuda_rng")
# Loss values come back from the device every LOSS_READBACK steps, in one copy: reading them
# each step (.item()) would make the host wait for every step before queueing the next.
LOSS_READBACK = 10
FROZEN_PARTS = ("encoder", "mapping_z", "clip_mapper")
# Eager steps before a CUDA graph is captured: Adam creates its state, cuBLAS/cuDNN their
# handles and workspaces, none of which may happen during capture. They are steps of the run.
CAPTURE_AFTER = 3


@dataclasses.dataclass
class Prompt:
    """What the losses need of a text or reference-image prompt."""
    embedding: torch.Tensor  # (1, 512) n(CLIP(prompt))
    source: torch.Tensor | None  # (1, 512) n(CLIP_text(source_text)); None: the batch mean of the faces
    basis: torch.Tensor | None  # (768, K) token basis of a reference image, for the projection loss


@dataclasses.dataclass
class FinetuneResult:
    stylizer: nn.Module  # the EMA Stylizer
    history: list[dict[str, float]]  # loss terms and lr per step
    w_plus: torch.Tensor  # (1, 10, style_dim) the prompt's style (the clip_mapper in eval mode)
    steps_per_s: float  # of the steps this call ran, wall clock

    def save(self, path) -> Path:
        """``.safetensors``: our format; anything else: the official layout (``G_ema_model``)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            self.stylizer.save(path)
        else:
            save_torch({"G_ema_model": self.stylizer.official_state_dict()}, path)
        return path


# -- inputs ---------------------------------------------------------------------------
def encode_prompt(clip, text=None, ref_image=None, source_text: str = "photo") -> Prompt:
    """Exactly one of ``text`` and ``ref_image`` (a path, PIL image or (1, 3, H, W) tensor in [-1, 1])."""
    if (text is None) == (ref_image is None):
        raise ValueError("give exactly one prompt: text=... or ref_image=...")
    with torch.no_grad():
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"the text prompt must be a non-empty string, got {text!r}")
            if not isinstance(source_text, str) or not source_text.strip():
                raise ValueError(f"source_text must be a non-empty string, got {source_text!r}")
            return Prompt(clip.encode_text([text]), clip.encode_text([source_text]), None)
        if isinstance(ref_image, torch.Tensor):
            if ref_image.ndim == 3:
                ref_image = ref_image[None]
            if ref_image.ndim != 4 or ref_image.shape[0] != 1:
                raise ValueError(f"a reference tensor must be (3, H, W) or (1, 3, H, W), got {tuple(ref_image.shape)}")
            embedding, tokens = clip.encode_image_and_tokens(ref_image)
        else:
            from mmfs_fast.io import open_rgb

            image = open_rgb(ref_image)  # a clear error for unreadable files
            embedding, tokens = clip.encode_pil_and_tokens([image])
        return Prompt(embedding, None, token_basis(tokens))


def load_faces(faces, stylizer, batch_size: int) -> torch.Tensor:
    """A folder, a (N, 3, size, size) tensor, or a list of paths / PIL images / (3, size, size)
    tensors → (N, 3, size, size) on the stylizer's device; fewer than a batch are reused."""
    from mmfs_fast.api import MMFS
    from mmfs_fast.io import IMAGE_SUFFIXES

    if isinstance(faces, (str, os.PathLike)):
        folder = Path(faces)
        if not folder.is_dir():
            raise ValueError(f"faces: {folder} is not a folder; give a folder or a list of images")
        faces = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not faces:
            raise ValueError(f"faces: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    faces = list(faces)
    if not faces:
        raise ValueError("fine-tuning needs at least one face")
    loaded = MMFS(stylizer).load_faces(faces)
    if len(loaded) < batch_size:
        warnings.warn(f"only {len(loaded)} faces for batches of {batch_size}: faces are reused within a batch "
                      f"(a few dozen different faces work best)", stacklevel=3)
    return loaded


def batch_indices(n_faces: int, batch_size: int, device) -> torch.Tensor:
    """A random batch without repeats, unless there are fewer faces than the batch; drawn on
    ``device`` from its default generator (argsort of uniform noise: no host sync, capturable)."""
    rounds = math.ceil(batch_size / n_faces)
    return torch.rand(rounds, n_faces, device=device).argsort(dim=1).flatten()[:batch_size]


def decoder_parameters(stylizer: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in stylizer.named_parameters() if name.split(".")[0] not in FROZEN_PARTS}


def lr_factor(step: int, steps: int, decay_steps: int) -> float:
    """The lr of 0-based ``step`` as a fraction of the base lr: 1 for ``steps`` steps, then
    1 − k/(decay_steps + 2) at the k-th of the ``decay_steps`` after them.

    This is the official schedule (lr_policy linear, n_epochs = steps, n_epochs_decay =
    decay_steps + 1: after i scheduler steps the factor is 1 − max(0, i + 1 − n_epochs) /
    (n_epochs_decay + 1)), whose loop stops one step before n_epochs + n_epochs_decay: the
    defaults 200 and 9 are its 209 steps, the last at 2/11 of the lr."""
    return 1.0 - max(0, step + 1 - steps) / (decay_steps + 2)


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How a run trains; a resumed run must have the same settings.

    ``fast``: the fast path (constants once, capturable step); False: the eager fp32 reference.
    ``mixed_precision`` (default: on for the fast path on CUDA): decoder and loss encoders in
    bf16 autocast. ``fused_modconv`` (default: off for the fast path, on for the reference):
    train through the modulated_conv2d op (per-sample weights, the official computation)
    instead of StyleGAN2's unfused training form. ``capture`` (default: on for the fast path
    on CUDA): replay the step as one CUDA graph after :data:`CAPTURE_AFTER` eager steps.
    ``fixed_style``: w+ computed once in eval mode instead of the official per-step train-mode
    mapper: a deterministic target style, for studying the losses or when the dropout jitter
    is unwanted. ``decay_steps=0``: constant lr for ``steps`` steps, e.g. to compare runs of
    different lengths."""
    steps: int = 200
    decay_steps: int = 9
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    ema: float = 0.99
    lambda_st: float = 0.5
    lambda_clip: float = 1.0
    lambda_proj: float = 100.0
    source_text: str | None = "photo"  # None for image prompts
    fixed_style: bool = False
    seed: int = 0
    fast: bool = True
    mixed_precision: bool | None = None
    fused_modconv: bool | None = None
    capture: bool | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            raise ValueError(f"decay_steps must be an int >= 0, got {self.decay_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        check_seed(self.seed)

    @property
    def total_steps(self) -> int:
        return self.steps + self.decay_steps

    def lr_at(self, step: int) -> float:
        return self.lr * lr_factor(step, self.steps, self.decay_steps)

    def resolved(self, device: torch.device) -> "FinetuneSettings":
        """The defaults that depend on the path and the device, filled in."""
        cuda_fast = self.fast and device.type == "cuda"
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return dataclasses.replace(self, mixed_precision=pick(self.mixed_precision, cuda_fast),
                                   fused_modconv=pick(self.fused_modconv, not self.fast),
                                   capture=pick(self.capture, cuda_fast), betas=tuple(self.betas))


# -- one run -----------------------------------------------------------------------------
class FinetuneRun:
    """Everything one fine-tuning run updates, its constants, its step, and how it is saved and
    restored. Steps draw their randomness (batches, dropout, noise) from the default
    generators: seed them (``finetune`` does) for a reproducible run."""

    def __init__(self, stylizer, clip, dino, faces: torch.Tensor, prompt: Prompt, settings: FinetuneSettings):
        self.device = faces.device
        self.settings = settings = settings.resolved(self.device)
        self.clip, self.dino, self.prompt, self.faces = clip, dino, prompt, faces
        if settings.capture and self.device.type != "cuda":
            raise ValueError("capture=True needs a CUDA device (CUDA graphs)")
        self.model = copy.deepcopy(stylizer).eval()
        self.model.requires_grad_(False)
        set_fused_modconv(self.model, settings.fused_modconv)
        self.params = decoder_parameters(self.model)
        for p in self.params.values():
            p.requires_grad_(True)
        self.ema_model = copy.deepcopy(self.model)
        self.ema_model.requires_grad_(False)
        set_fused_modconv(self.ema_model, None)  # the result: the default inference path
        self.ema_params = list(decoder_parameters(self.ema_model).values())
        # fused: one kernel for all parameters, the step count on the device (capturable on CUDA);
        # the lr a device tensor, so that a captured step follows the schedule
        self.lr = torch.tensor(settings.lr, device=self.device)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=self.lr, betas=settings.betas, fused=True,
                                          capturable=self.device.type == "cuda")
        self.step_count, self.history = 0, []
        self.graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0

        with torch.no_grad():
            self.embedding = prompt.embedding.to(device=self.device, dtype=faces.dtype)  # (1, 512)
            self.model.clip_mapper.eval()
            self.w_plus = self.model.map_clip(self.embedding)  # the result's style
            self.model.clip_mapper.train(not settings.fixed_style)
            self.basis = None if prompt.basis is None else prompt.basis.to(self.device)
            self.source = None if prompt.source is None else prompt.source.to(self.device)
            # the reference re-encodes each batch, as the official loop does
            self.face_features = _face_features(self.model, clip, dino, faces, settings.batch_size) \
                if settings.fast else None
        # NHWC: what cuDNN's tensor-core convolutions read and write without transposing
        self.channels_last = settings.fast and self.device.type == "cuda"

    # -- the step ----------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """One optimisation step; returns its (total, *terms) losses as a tensor on the device."""
        self.lr.fill_(self.settings.lr_at(self.step_count))
        if self.graph is not None:
            self.graph.replay()
            losses = self._graph_losses.clone()  # the next replay overwrites them
        elif self.settings.capture and self._eager_steps >= CAPTURE_AFTER:
            self.graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # gradients come to live in the graph's pool
            with torch.cuda.graph(self.graph):
                self._graph_losses = self._step()
            self.graph.replay()  # capturing recorded the step without running it
            losses = self._graph_losses.clone()
        elif self.settings.capture:  # warm-up on a side stream, as capture will run
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                losses = self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            losses = self._step()
        self._eager_steps += self.graph is None
        self.step_count += 1
        return losses

    @property
    def term_names(self) -> list[str]:
        return ["total", "structure", "clip"] + (["projection"] if self.basis is not None else [])

    def _step(self) -> torch.Tensor:
        """The step itself: no host sync (capturable); returns (total, *terms) in fp32."""
        s = self.settings
        idx = batch_indices(len(self.faces), s.batch_size, self.device)
        with torch.no_grad():
            if self.face_features is not None:
                feat, face_emb, face_sim = (t[idx] for t in self.face_features)
            else:
                feat, face_emb, face_sim = _face_features(self.model, self.clip, self.dino, self.faces[idx],
                                                          s.batch_size)
            # one mapper row per sample: each its own dropout
            w_plus = self.w_plus.expand(s.batch_size, -1, -1) if s.fixed_style else \
                self.model.map_clip(self.embedding.expand(s.batch_size, -1))
        if self.channels_last:
            feat = feat.contiguous(memory_format=torch.channels_last)
        # no cast cache: a captured step must cast the weights Adam has just updated, every replay
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=s.mixed_precision, cache_enabled=False):
            fake = self.model.decode(feat, w_plus)
            if self.basis is None:
                fake_emb, fake_tokens = self.clip.encode_image(fake), None
            else:
                fake_emb, fake_tokens = self.clip.encode_image_and_tokens(fake)
            fake_sim = self.dino.self_similarity(fake)
        terms = loss_terms(fake_emb, fake_sim, fake_tokens, face_emb, face_sim, self.direction(face_emb), self.basis)
        total = weighted_total(terms, s)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.update_ema()
        return torch.stack([total.detach(), *(t.detach() for t in terms.values())]).float()

    def direction(self, face_emb: torch.Tensor) -> torch.Tensor:
        """d_prompt = n(CLIP(prompt)) − src: src the source text's embedding, or for an image
        prompt the mean of the batch's face embeddings (official: the batch, not the face set)."""
        source = self.source if self.source is not None else face_emb.mean(0, keepdim=True)
        return self.embedding - source

    def update_ema(self) -> None:
        params = [p.detach() for p in self.params.values()]
        torch._foreach_mul_(self.ema_params, self.settings.ema)
        torch._foreach_add_(self.ema_params, params, alpha=1 - self.settings.ema)

    # -- saving and restoring ------------------------------------------------------------
    def _settings_record(self) -> dict:
        return {**dataclasses.asdict(self.settings), "betas": list(self.settings.betas), "n_faces": len(self.faces)}

    def state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {"step": self.step_count, "history": self.history, "settings": self._settings_record(),
                "prompt": self.prompt.embedding.cpu(),
                "decoder": {k: p.detach().cpu() for k, p in self.params.items()},
                "ema": [p.cpu() for p in self.ema_params],
                "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None}

    def restore(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for truncated or foreign files
            raise CheckpointError(f"{path}: not a readable fine-tuning state ({one_line(e)}); delete it to start "
                                  "the run afresh, or use another checkpoint_dir") from None
        if not isinstance(state, dict) or not all(k in state for k in RESUME_KEYS):
            raise CheckpointError(f"{path}: not a fine-tuning state saved by mmfs_fast (needs "
                                  f"{', '.join(RESUME_KEYS)}); delete it to start the run afresh, or use another "
                                  "checkpoint_dir")
        settings = self._settings_record()
        prompt, mine = state["prompt"], self.prompt.embedding.cpu()
        same_prompt = torch.is_tensor(prompt) and prompt.shape == mine.shape and torch.equal(prompt, mine)
        if state.get("settings") != settings or not same_prompt:
            raise ValueError(f"{path} belongs to a run with another prompt or settings ({state.get('settings')}); "
                             f"resume with the same ones, or use a fresh checkpoint_dir")
        problems = state_problems({k: p.detach() for k, p in self.params.items()}, state["decoder"]) \
            if isinstance(state["decoder"], dict) else ["the decoder entry is not a state dict"]
        if problems or not isinstance(state["ema"], list) or len(state["ema"]) != len(self.ema_params):
            raise CheckpointError(f"{path}: its decoder does not fit this Stylizer ({'; '.join(problems) or 'ema'}); "
                                  "delete it to start the run afresh, or use another checkpoint_dir")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["decoder"][name])
            for p, saved in zip(self.ema_params, state["ema"]):
                p.copy_(saved)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            if state["cuda_rng"] is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its optimizer or random state is damaged ({one_line(e)}); delete it to "
                                  "start the run afresh, or use another checkpoint_dir") from None
        self.optimizer.param_groups[0]["lr"] = self.lr  # the loaded one is a copy on the host
        self.step_count, self.history = state["step"], state["history"]


def loss_terms(fake_emb, fake_sim, fake_tokens, face_emb, face_sim, prompt_dir, basis) -> dict[str, torch.Tensor]:
    """The fine-tuning loss terms from what CLIP and DINO made of the fakes and their faces."""
    terms = {"structure": structure_loss(fake_sim, face_sim),
             "clip": directional_clip_loss(fake_emb, face_emb, prompt_dir)}
    if basis is not None:
        terms["projection"] = projection_loss(fake_tokens, basis)
    return terms


def weighted_total(terms: dict[str, torch.Tensor], settings: FinetuneSettings) -> torch.Tensor:
    """λ_st·structure + λ_clip·clip (+ λ_proj·projection)."""
    weights = {"structure": settings.lambda_st, "clip": settings.lambda_clip, "projection": settings.lambda_proj}
    return sum(weights[name] * value for name, value in terms.items())


def _face_features(model, clip, dino, faces, chunk: int):
    """What the frozen networks make of faces: encoder features, n(CLIP(x)) and DINO
    self-similarities."""
    parts = [(model.encode(x), clip.encode_image(x), dino.self_similarity(x)) for x in faces.split(chunk)]
    return [torch.cat(p) for p in zip(*parts)]


# -- the loop ---------------------------------------------------------------------------
def finetune(stylizer, clip, dino, faces, text: str | None = None, ref_image=None, *, steps: int = 200,
             decay_steps: int = 9, batch_size: int = 8, lr: float = 2e-4, betas=(0.9, 0.999), ema: float = 0.99,
             lambda_st: float = 0.5, lambda_clip: float = 1.0, lambda_proj: float = 100.0,
             source_text: str = "photo", fixed_style: bool = False, seed: int = 0, fast: bool = True,
             mixed_precision: bool | None = None, fused_modconv: bool | None = None, capture: bool | None = None,
             checkpoint_dir=None, checkpoint_every: int = 50, progress: bool = True, preview=None) -> FinetuneResult:
    """Adapt ``stylizer``'s decoder to a text prompt or a reference image; ``stylizer`` itself
    is not modified. ``clip`` and ``dino`` are the frozen encoders (normally
    :class:`~mmfs_fast.encoders.CLIPEncoder` and :class:`~mmfs_fast.encoders.DINOEncoder`).
    The options are :class:`FinetuneSettings`'; the run is ``steps + decay_steps`` steps.

    With ``checkpoint_dir`` the run state is saved every ``checkpoint_every`` steps and a
    later call with the same arguments resumes from it (on the CPU bit-exactly).
    ``preview``: a PNG path for a grid of input faces over their stylizations.
    """
    settings = FinetuneSettings(
        steps=steps, decay_steps=decay_steps, batch_size=batch_size, lr=lr, betas=tuple(betas), ema=ema,
        lambda_st=lambda_st, lambda_clip=lambda_clip, lambda_proj=lambda_proj,
        source_text=source_text if text is not None else None, fixed_style=fixed_style, seed=seed, fast=fast,
        mixed_precision=mixed_precision, fused_modconv=fused_modconv, capture=capture)
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if stylizer.clip_mapper is None:
        raise ValueError("this Stylizer has no clip_mapper (phase 1/2 checkpoint); fine-tuning starts from the "
                         "prompt's style, which needs a phase 3/4 checkpoint")
    if stylizer.decoder0.conv.weight.dtype != torch.float32:
        raise TypeError("fine-tune a float32 Stylizer (Adam needs full-precision weights); "
                        "mixed_precision=True runs it in bf16 where that is safe")
    prompt = encode_prompt(clip, text, ref_image, source_text)
    faces = load_faces(faces, stylizer, batch_size)
    device = faces.device
    state_path = None
    if checkpoint_dir is not None:
        remove_stale_temps(make_dirs(checkpoint_dir))
        state_path = Path(checkpoint_dir) / STATE_FILE

    # the run's own random stream, seeded: the caller's generators are left as they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        run = FinetuneRun(stylizer, clip, dino, faces, prompt, settings)
        if state_path is not None and state_path.is_file():
            run.restore(state_path)
        seconds, steps_run = _loop(run, state_path, checkpoint_every, progress)

    result = FinetuneResult(run.ema_model.eval(), run.history, run.w_plus, steps_run / seconds if steps_run else 0.0)
    if preview is not None:
        save_preview(result, faces, preview)
    return result


def _loop(run: FinetuneRun, state_path: Path | None, checkpoint_every: int, progress: bool) -> tuple[float, int]:
    """Step ``run`` to its end; returns (seconds, steps run)."""
    total_steps, first = run.settings.total_steps, run.step_count
    pending: list[torch.Tensor] = []  # loss terms of the steps not yet read back
    start = time.perf_counter()
    with _progress_bar(first, total_steps, progress) as bar:
        while run.step_count < total_steps:
            pending.append(run.step())
            checkpoint_due = state_path is not None and (run.step_count % checkpoint_every == 0
                                                         or run.step_count == total_steps)
            if len(pending) == LOSS_READBACK or checkpoint_due or run.step_count == total_steps:
                _record_losses(run, pending, bar)
            if checkpoint_due:
                save_torch(run.state(), state_path)
    return time.perf_counter() - start, total_steps - first


def _record_losses(run: FinetuneRun, pending: list[torch.Tensor], bar) -> None:
    """The pending steps' loss terms into the run's history with one device→host copy (which
    waits for them: the only host sync of the loop)."""
    first = run.step_count - len(pending)
    for i, row in enumerate(torch.stack(pending).tolist()):
        run.history.append({**dict(zip(run.term_names, row)), "lr": run.settings.lr_at(first + i)})
    bar.set_postfix({k: f"{v:.4g}" for k, v in run.history[-1].items()}, refresh=False)
    bar.update(len(pending))
    pending.clear()


def _progress_bar(start: int, steps: int, enabled: bool):
    from tqdm import tqdm

    # tqdm's rate and remaining time are the steps/s and the ETA
    return tqdm(total=steps, initial=start, desc="finetune", unit="step", disable=not enabled, dynamic_ncols=True)


@torch.no_grad()
def save_preview(result: FinetuneResult, faces: torch.Tensor, path, count: int = 8) -> Path:
    """Input faces (top row) over their stylizations with zero noise (bottom row)."""
    from mmfs_fast.io import image_grid, save_image

    faces = faces[:count]
    fakes = result.stylizer(faces, w_plus=result.w_plus.expand(len(faces), -1, -1), noise="zero")
    return save_image(image_grid([*faces, *fakes], columns=len(faces)), path)


# -- command line -------------------------------------------------------------------------
def add_cli_parser(subparsers):
    """The ``mmfs-fast finetune`` subcommand (hooked in by :mod:`mmfs_fast.cli`)."""
    from mmfs_fast.commands.common import add_trust_options

    p = subparsers.add_parser(
        "finetune", help="adapt a checkpoint's decoder to a text prompt or a reference image",
        description="One-shot (--ref) or zero-shot (--text) fine-tuning of the decoder (MMFS stage IV). "
                    "The result loads wherever a checkpoint does; stylize with the same prompt.")
    p.add_argument("--ckpt", help="MMFS checkpoint with a clip_mapper (official phase 3/4 or mmfs_fast .safetensors)")
    p.add_argument("--faces", nargs="+", required=True, help="aligned face images: files, folders or globs")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text", help="zero-shot: the style as a text prompt, e.g. 'pop art'")
    prompt.add_argument("--ref", help="one-shot: a reference style image")
    p.add_argument("--out", required=True, help="result: .safetensors, or .pt/.pth for the official layout")
    p.add_argument("--clip-weights", help="CLIP ViT-B/32 weights (OpenAI ViT-B-32.pt)")
    p.add_argument("--dino-weights", help="DINO ViT-B/8 weights (dino_vitbase8_pretrain.pth)")
    p.add_argument("--random-init", action="store_true",
                   help="random models for whatever has no weights (meaningless results): demos and tests only")
    p.add_argument("--steps", type=int, default=200, help="steps at the full learning rate")
    p.add_argument("--decay-steps", type=int, default=9,
                   help="then steps with the lr falling linearly to 2/11 of it (the official 209-step schedule); "
                        "0: constant lr")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--lambda-st", type=float, default=0.5, help="weight of the DINO structure loss")
    p.add_argument("--lambda-clip", type=float, default=1.0, help="weight of the directional CLIP loss")
    p.add_argument("--lambda-proj", type=float, default=100.0, help="weight of the token projection loss (--ref)")
    p.add_argument("--source-text", default="photo", help="the source domain for --text prompts")
    p.add_argument("--fixed-style", action="store_true",
                   help="the prompt's w+ once, in eval mode (official: the clip_mapper in training mode every step, "
                        "its dropout varying the style a little per sample and step)")
    p.add_argument("--dino-antialias", action="store_true",
                   help="antialias the resize to DINO's input (official: plain bilinear, which aliases)")
    p.add_argument("--reference", action="store_true",
                   help="the eager fp32 reference path (the official computation, slower): for checking results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="save the run state here and resume from it if present")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--preview", help="PNG grid of the first faces over their stylizations")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--impl", default="auto", choices=["auto", "ref", "cuda", "triton"], help="op backend")
    p.add_argument("--encoder-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of the frozen CLIP and DINO (half precision is faster on GPUs)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast for the decoder on GPUs")
    add_trust_options(p)
    p.set_defaults(func=main)
    return p


def _load_models(args, device):
    from mmfs_fast.encoders import CLIPEncoder, DINOEncoder
    from mmfs_fast.models import Stylizer

    dtype = getattr(torch, args.encoder_dtype)
    if args.ckpt is not None:
        stylizer = Stylizer.from_checkpoint(args.ckpt, device=device, impl=args.impl, allow_cast=args.allow_cast)
    elif args.random_init:
        stylizer = Stylizer(impl=args.impl).to(device)
    else:
        raise UsageError(f"no weights: pass {option('ckpt')}, or {option('random_init')} to try the pipeline")
    clip = CLIPEncoder(args.clip_weights, random_init=args.random_init and args.clip_weights is None,
                       device=device, dtype=dtype, trust_torchscript=args.trust_torchscript)
    dino = DINOEncoder(args.dino_weights, random_init=args.random_init and args.dino_weights is None,
                       device=device, dtype=dtype, antialias=args.dino_antialias)
    return stylizer, clip, dino


def main(args) -> int:
    """Run ``mmfs-fast finetune``; bad options or inputs raise the CLI's UsageError (exit 2)."""
    from mmfs_fast.commands.common import EXIT_OK, RANDOM_INIT_BANNER, as_usage_error, err, expand_inputs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.random_init:
        err(RANDOM_INIT_BANNER)
    try:
        stylizer, clip, dino = _load_models(args, device)
        result = finetune(
            stylizer, clip, dino, [file for file, _ in expand_inputs(args.faces)], text=args.text,
            ref_image=args.ref, steps=args.steps, decay_steps=args.decay_steps, batch_size=args.batch_size,
            lr=args.lr, ema=args.ema, lambda_st=args.lambda_st, lambda_clip=args.lambda_clip,
            lambda_proj=args.lambda_proj, source_text=args.source_text, fixed_style=args.fixed_style,
            seed=args.seed, fast=not args.reference, checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every, preview=args.preview,
            mixed_precision=False if args.no_amp else None)
    except (ValueError, TypeError, OSError) as e:  # checkpoint, weights and image errors are ValueErrors
        raise as_usage_error(e) from e
    err(f"{len(result.history)} steps, {result.steps_per_s:.2f} steps/s; saved {result.save(args.out)}")
    return EXIT_OK
