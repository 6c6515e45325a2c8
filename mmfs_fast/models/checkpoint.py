"""Reading, converting and checking checkpoints.

Formats: official MMFS (``torch.save`` dict with ``G_ema_model`` and ``D_model``),
a bare official Stylizer state dict, rosinality StyleGAN2 (``g_ema``/``g``/``d``),
and our safetensors files (official keys, config as JSON metadata).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from torch import nn

SAFETENSORS_FORMAT = "mmfs_fast"


class CheckpointError(ValueError):
    """A file or dict that is not the checkpoint it was loaded as."""


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(src) -> tuple[dict, dict | None]:
    """(contents, safetensors metadata or None) of a path or an already loaded dict."""
    if isinstance(src, dict):
        return src, None
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(src).__name__}")
    path = Path(src)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if _is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
    try:
        # rosinality's train.py also saves its argparse.Namespace ("args"): safe to unpickle
        with torch.serialization.safe_globals([argparse.Namespace]):
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for foreign or truncated files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(contents).__name__}")
    return contents, None


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, flushed to
    disk, then renamed over it: a crash mid-save leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path) -> None:
    """torch.save, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_safetensors(state: dict[str, torch.Tensor], config: dict, path) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()},
                metadata={"format": SAFETENSORS_FORMAT, "config": json.dumps(config)})
    atomic_write(path, lambda f: f.write(data))


# -- rosinality StyleGAN2 → Stylizer (SPEC §3) ---------------------------------
_STYLEGAN2_CONV = re.compile(r"convs\.(\d+)\.(.*)")
_STYLEGAN2_RGB = re.compile(r"to_rgbs\.(\d+)\.(.*)")

# what a StyleGAN2 generator cannot provide: trained in MMFS Stage I (and III)
STYLEGAN2_UNCOVERED = ("encoder.", "decoder0.", "to_rgb0.", "clip_mapper.")


def stylegan2_to_stylizer(g: dict[str, torch.Tensor], size: int = 512) -> dict[str, torch.Tensor]:
    """Rename the mapping and the size/8 … size px layers (64–512 px at 512²) of a rosinality
    generator; drop the rest."""
    first_rgb = size.bit_length() - 7  # to_rgbs[first_rgb] renders size/8 px: 3 at 512²
    if first_rgb < 0:
        raise ValueError(f"a StyleGAN2 generator seeds Stylizers of size >= 64, got {size}")
    out = {}
    for key, value in g.items():
        if key.startswith("style."):
            out["mapping_z." + key[len("style."):]] = value
        elif m := _STYLEGAN2_CONV.fullmatch(key):
            j = int(m[1]) - 2 * first_rgb
            if j >= 0:
                out[f"decoder{j // 2 + 1}{'a' if j % 2 == 0 else 'b'}.{m[2]}"] = value
        elif m := _STYLEGAN2_RGB.fullmatch(key):
            j = int(m[1]) - first_rgb
            if j >= 0:
                out[f"to_rgb{j + 1}.{m[2]}"] = value
    return out


def stylizer_config_from_state(state: dict[str, torch.Tensor], size: int = 512) -> dict:
    """Architecture hyper-parameters that a Stylizer state dict implies."""
    try:
        ngf = state["to_rgb4.conv.weight"].shape[2]
        style_dim = state["mapping_z.1.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"not a Stylizer state dict: key {e.args[0]!r} is missing") from e
    n_mlp = sum(1 for k in state if re.fullmatch(r"mapping_z\.\d+\.weight", k))
    return {"size": size, "ngf": ngf, "style_dim": style_dim, "n_mlp": n_mlp,
            "clip_mapper": any(k.startswith("clip_mapper.") for k in state)}


def stylizer_state(src) -> tuple[dict[str, torch.Tensor], dict, tuple[str, ...]]:
    """(state dict, config, key prefixes left at random init) of any supported Stylizer source."""
    contents, metadata = read_checkpoint(src)
    if metadata is not None:
        if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
            raise CheckpointError(f"{src}: a safetensors file, but not one saved by mmfs_fast (no config metadata)")
        return contents, json.loads(metadata["config"]), ()
    if "G_ema_model" in contents:
        state = contents["G_ema_model"]
    elif "g_ema" in contents or "g" in contents:
        state = stylegan2_to_stylizer(contents.get("g_ema", contents.get("g")))
        config = stylizer_config_from_state(state)
        config["clip_mapper"] = False
        return state, config, STYLEGAN2_UNCOVERED
    elif "encoder.0.0.weight" in contents:
        state = contents
    else:
        keys = ", ".join(list(contents)[:5])
        raise CheckpointError(f"{src if not isinstance(src, dict) else 'dict'}: not an MMFS or StyleGAN2 "
                              f"checkpoint (expected 'G_ema_model', 'g_ema' or Stylizer keys; found {keys})")
    return state, stylizer_config_from_state(state), ()


def load_state(model: nn.Module, state: dict[str, torch.Tensor], uncovered: tuple[str, ...] = ()) -> None:
    """Strictly load ``state`` into ``model``: every key present with its exact shape, except
    keys under ``uncovered`` prefixes, which keep their initialisation. Raises one
    CheckpointError listing everything that is wrong."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(uncovered)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{name} ({len(items)}): {', '.join(items[:20])}{' …' if len(items) > 20 else ''}"
                for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", mismatched)) if items]
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            if not torch.is_tensor(v):
                raise CheckpointError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
            expected[k].copy_(v)
