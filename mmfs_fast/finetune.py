"""One-shot (reference image) and zero-shot (text) fine-tuning of the decoder (SPEC §5–6, stage IV).

The prompt's CLIP embedding goes through the clip_mapper once to give the style w+, which
stays fixed; only the decoder (decoder*, to_rgb*) learns, from
λ_st·L_structure + λ_clip·L_directional (+ λ_proj·L_projection for image prompts), with
Adam and an exponential moving average of the decoder that becomes the result.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from mmfs_fast.losses import directional_clip_loss, projection_loss, structure_loss, token_basis
from mmfs_fast.models import set_fused_modconv
from mmfs_fast.models.checkpoint import atomic_save

STATE_FILE = "finetune_state.pt"
# Loss values come back from the device every LOSS_READBACK steps, in one copy: reading them
# each step (.item()) would make the host wait for every step before queueing the next.
LOSS_READBACK = 10
FROZEN_PARTS = ("encoder", "mapping_z", "clip_mapper")


@dataclasses.dataclass
class Prompt:
    """What the losses need of a text or reference-image prompt."""
    embedding: torch.Tensor  # (1, 512) n(CLIP(prompt))
    source: torch.Tensor | None  # (1, 512) n(CLIP_text(source_text)); None: the batch mean of the faces
    basis: torch.Tensor | None  # (768, K) token basis of a reference image, for the projection loss

    def direction(self, face_emb: torch.Tensor) -> torch.Tensor:
        source = self.source if self.source is not None else face_emb.mean(0, keepdim=True)
        return self.embedding - source


@dataclasses.dataclass
class FinetuneResult:
    stylizer: nn.Module  # the EMA Stylizer
    history: list[dict[str, float]]  # loss terms per step
    w_plus: torch.Tensor  # (1, 10, style_dim) the prompt's style

    def save(self, path) -> Path:
        """``.safetensors``: our format; anything else: the official layout (``G_ema_model``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            self.stylizer.save(path)
        else:
            atomic_save({"G_ema_model": self.stylizer.official_state_dict()}, path)
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


def batch_indices(n_faces: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch without repeats, unless there are fewer faces than the batch."""
    perms = [torch.randperm(n_faces, generator=generator) for _ in range(math.ceil(batch_size / n_faces))]
    return torch.cat(perms)[:batch_size]


def decoder_parameters(stylizer: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in stylizer.named_parameters() if name.split(".")[0] not in FROZEN_PARTS}


def _check_settings(steps, batch_size, lr, ema, checkpoint_every) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")


# -- the loop ---------------------------------------------------------------------------
class _Run:
    """Everything one fine-tuning run updates, and how it is saved and restored."""

    def __init__(self, stylizer, device, prompt, settings, lr, betas, seed, fused_modconv):
        self.model = copy.deepcopy(stylizer).eval()
        self.model.requires_grad_(False)
        set_fused_modconv(self.model, fused_modconv)
        self.params = decoder_parameters(self.model)
        for p in self.params.values():
            p.requires_grad_(True)
        self.ema_model = copy.deepcopy(self.model)
        self.ema_model.requires_grad_(False)
        set_fused_modconv(self.ema_model, None)  # the result: the default inference path
        self.ema_params = list(decoder_parameters(self.ema_model).values())
        self.optimizer = torch.optim.Adam(self.params.values(), lr=lr, betas=betas)
        self.noise_rng = torch.Generator(device).manual_seed(seed)
        self.batch_rng = torch.Generator().manual_seed(seed)
        self.settings = settings
        self.prompt = prompt
        self.step, self.history = 0, []

    def update_ema(self, decay: float) -> None:
        params = [p.detach() for p in self.params.values()]
        torch._foreach_mul_(self.ema_params, decay)
        torch._foreach_add_(self.ema_params, params, alpha=1 - decay)

    def state(self) -> dict:
        return {"step": self.step, "history": self.history, "settings": self.settings,
                "prompt": self.prompt.embedding.cpu(),
                "decoder": {k: p.detach().cpu() for k, p in self.params.items()},
                "ema": [p.cpu() for p in self.ema_params],
                "optimizer": self.optimizer.state_dict(),
                "noise_rng": self.noise_rng.get_state(), "batch_rng": self.batch_rng.get_state()}

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["settings"] != self.settings or not torch.equal(state["prompt"], self.prompt.embedding.cpu()):
            raise ValueError(f"{path} belongs to a run with another prompt or settings ({state['settings']}); "
                             f"resume with the same ones, or use a fresh checkpoint_dir")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["decoder"][name])
            for p, saved in zip(self.ema_params, state["ema"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_rng.set_state(state["noise_rng"])
        self.batch_rng.set_state(state["batch_rng"])
        self.step, self.history = state["step"], state["history"]


def finetune(stylizer, clip, dino, faces, text: str | None = None, ref_image=None, *, steps: int = 200,
             batch_size: int = 8, lr: float = 2e-4, betas=(0.9, 0.999), ema: float = 0.99,
             lambda_st: float = 0.5, lambda_clip: float = 1.0, lambda_proj: float = 100.0,
             source_text: str = "photo", seed: int = 0, checkpoint_dir=None, checkpoint_every: int = 50,
             progress: bool = True, preview=None, mixed_precision: bool | None = None,
             fused_modconv: bool = False) -> FinetuneResult:
    """Adapt ``stylizer``'s decoder to a text prompt or a reference image; ``stylizer`` itself
    is not modified. ``clip`` and ``dino`` are the frozen encoders (normally
    :class:`~mmfs_fast.encoders.CLIPEncoder` and :class:`~mmfs_fast.encoders.DINOEncoder`).

    With ``checkpoint_dir`` the run state is saved every ``checkpoint_every`` steps and a
    later call with the same arguments resumes from it (on the CPU bit-exactly).
    ``preview``: a PNG path for a grid of input faces over their stylizations.
    ``mixed_precision`` (default: on for CUDA) runs the decoder under bf16 autocast.
    ``fused_modconv``: train through the modulated_conv2d op (per-sample weights) instead of
    the unfused form StyleGAN2 trains with (:func:`~mmfs_fast.models.set_fused_modconv`).
    """
    _check_settings(steps, batch_size, lr, ema, checkpoint_every)
    if stylizer.clip_mapper is None:
        raise ValueError("this Stylizer has no clip_mapper (phase 1/2 checkpoint); fine-tuning starts from the "
                         "prompt's style, which needs a phase 3/4 checkpoint")
    if stylizer.decoder0.conv.weight.dtype != torch.float32:
        raise TypeError("fine-tune a float32 Stylizer (Adam needs full-precision weights); "
                        "mixed_precision=True runs it in bf16 where that is safe")
    prompt = encode_prompt(clip, text, ref_image, source_text)
    faces = load_faces(faces, stylizer, batch_size)
    device = faces.device
    settings = {"batch_size": batch_size, "lr": lr, "betas": list(betas), "ema": ema, "lambda_st": lambda_st,
                "lambda_clip": lambda_clip, "lambda_proj": lambda_proj, "seed": seed, "n_faces": len(faces),
                "source_text": source_text if text is not None else None}
    run = _Run(stylizer, device, prompt, settings, lr, betas, seed, fused_modconv)
    with torch.no_grad():
        w_plus = run.model.map_clip(prompt.embedding.to(device=device, dtype=faces.dtype))
        feats, face_emb, face_sim = _face_features(run.model, clip, dino, faces, batch_size)

    state_path = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        state_path = Path(checkpoint_dir) / STATE_FILE
        if state_path.is_file():
            run.restore(state_path)

    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    weights = {"structure": lambda_st, "clip": lambda_clip, "projection": lambda_proj}
    pending: list[torch.Tensor] = []  # loss terms of the steps not yet read back
    with _progress_bar(run.step, steps, progress) as bar:
        while run.step < steps:
            idx = batch_indices(len(faces), batch_size, run.batch_rng)
            # from pinned memory the copy is queued, not waited for (the step stays free of host syncs)
            idx = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
                fake = run.model.decode(feats[idx], w_plus.expand(batch_size, -1, -1), generator=run.noise_rng)
            terms = _loss_terms(fake.float(), clip, dino, prompt, face_emb[idx], face_sim[idx])
            total = sum(weights[name] * value for name, value in terms.items())
            run.optimizer.zero_grad(set_to_none=True)
            total.backward()
            run.optimizer.step()
            run.update_ema(ema)
            run.step += 1
            names = ["total", *terms]
            pending.append(torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values())]))
            checkpoint_due = state_path is not None and (run.step % checkpoint_every == 0 or run.step == steps)
            if len(pending) == LOSS_READBACK or checkpoint_due or run.step == steps:
                _record_losses(run.history, names, pending, bar)
            if checkpoint_due:
                atomic_save(run.state(), state_path)

    result = FinetuneResult(run.ema_model.eval(), run.history, w_plus)
    if preview is not None:
        save_preview(result, faces, preview)
    return result


def _record_losses(history: list, names: list[str], pending: list[torch.Tensor], bar) -> None:
    """The pending steps' loss terms into ``history`` with one device→host copy."""
    for row in torch.stack(pending).tolist():
        history.append(dict(zip(names, row)))
    bar.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items()}, refresh=False)
    bar.update(len(pending))
    pending.clear()


def _face_features(model, clip, dino, faces, chunk: int):
    """What the frozen networks make of the input faces, computed once: encoder features,
    n(CLIP(x)) and DINO self-similarities."""
    parts = [(model.encode(x), clip.encode_image(x), dino.self_similarity(x)) for x in faces.split(chunk)]
    return [torch.cat(p) for p in zip(*parts)]


def _loss_terms(fake, clip, dino, prompt: Prompt, face_emb, face_sim) -> dict[str, torch.Tensor]:
    if prompt.basis is None:
        fake_emb, fake_tokens = clip.encode_image(fake), None
    else:
        fake_emb, fake_tokens = clip.encode_image_and_tokens(fake)
    terms = {"structure": structure_loss(dino.self_similarity(fake), face_sim),
             "clip": directional_clip_loss(fake_emb, face_emb, prompt.direction(face_emb))}
    if fake_tokens is not None:
        terms["projection"] = projection_loss(fake_tokens, prompt.basis)
    return terms


def _progress_bar(start: int, steps: int, enabled: bool):
    from tqdm import tqdm

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
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--lambda-st", type=float, default=0.5, help="weight of the DINO structure loss")
    p.add_argument("--lambda-clip", type=float, default=1.0, help="weight of the directional CLIP loss")
    p.add_argument("--lambda-proj", type=float, default=100.0, help="weight of the token projection loss (--ref)")
    p.add_argument("--source-text", default="photo", help="the source domain for --text prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="save the run state here and resume from it if present")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--preview", help="PNG grid of the first faces over their stylizations")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--impl", default="auto", choices=["auto", "ref", "cuda", "triton"], help="op backend")
    p.add_argument("--encoder-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of the frozen CLIP and DINO (half precision is faster on GPUs)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast for the decoder on GPUs")
    p.set_defaults(func=main)
    return p


def _load_models(args, device):
    from mmfs_fast.encoders import CLIPEncoder, DINOEncoder
    from mmfs_fast.models import Stylizer

    dtype = getattr(torch, args.encoder_dtype)
    if args.ckpt is not None:
        stylizer = Stylizer.from_checkpoint(args.ckpt, device=device, impl=args.impl)
    elif args.random_init:
        stylizer = Stylizer(impl=args.impl).to(device)
    else:
        raise ValueError("no weights: pass --ckpt <MMFS checkpoint>, or --random-init to try the pipeline")
    clip = CLIPEncoder(args.clip_weights, random_init=args.random_init and args.clip_weights is None,
                       device=device, dtype=dtype)
    dino = DINOEncoder(args.dino_weights, random_init=args.random_init and args.dino_weights is None,
                       device=device, dtype=dtype)
    return stylizer, clip, dino


def main(args) -> int:
    """Run ``mmfs-fast finetune``; bad options or inputs raise the CLI's UsageError (exit 2)."""
    from mmfs_fast.commands.common import EXIT_OK, RANDOM_INIT_BANNER, UsageError, err, expand_inputs

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.random_init:
        err(RANDOM_INIT_BANNER)
    try:
        stylizer, clip, dino = _load_models(args, device)
        result = finetune(
            stylizer, clip, dino, [file for file, _ in expand_inputs(args.faces)], text=args.text,
            ref_image=args.ref, steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema=args.ema,
            lambda_st=args.lambda_st, lambda_clip=args.lambda_clip, lambda_proj=args.lambda_proj,
            source_text=args.source_text, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every, preview=args.preview,
            mixed_precision=False if args.no_amp else None)
    except (ValueError, TypeError, OSError) as e:  # checkpoint, weights and image errors are ValueErrors
        raise UsageError(str(e)) from e
    err(f"saved {result.save(args.out)}")
    return EXIT_OK
