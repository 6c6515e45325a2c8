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
# rosinality's channel table stops at 1024 px: no generator of theirs is larger
STYLEGAN2_MAX_SIZE = 1024

# what a StyleGAN2 generator cannot provide: trained in MMFS Stage I (and III)
STYLEGAN2_UNCOVERED = ("encoder.", "decoder0.", "to_rgb0.", "clip_mapper.")


def stylegan2_size(g: dict, name: str = "checkpoint") -> int:
    """Image size of a rosinality generator state dict: 4 px doubled once per ``to_rgbs`` entry."""
    rgbs = {int(m[1]) for k in g if (m := _STYLEGAN2_RGB.fullmatch(k))}
    if not rgbs or "input.input" not in g:
        raise CheckpointError(f"{name}: not a rosinality StyleGAN2 generator (no 'input.input' and 'to_rgbs.*' keys)")
    size = 2 ** (max(rgbs) + 3)
    if size > STYLEGAN2_MAX_SIZE:
        raise CheckpointError(f"{name}: its generator has {max(rgbs) + 1} to_rgbs, a {size}-px model; "
                              f"rosinality StyleGAN2 generators are at most {STYLEGAN2_MAX_SIZE} px")
    return size


def stylegan2_generator_config(g: dict, name: str = "checkpoint") -> dict:
    """Keyword arguments of the :class:`~mmfs_fast.models.Generator` that state dict ``g`` is."""
    size = stylegan2_size(g, name)
    try:
        channel_max = g["input.input"].shape[1]
        # channels at full size; when capped there too, channel_max · size gives the same table
        channel_base = g[f"to_rgbs.{size.bit_length() - 4}.conv.weight"].shape[2] * size
        style_dim = g["style.1.weight"].shape[1]
    except (KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{name}: not a rosinality StyleGAN2 generator ({type(e).__name__}: {e})") from e
    n_mlp = sum(1 for k in g if re.fullmatch(r"style\.\d+\.weight", k))
    return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channel_base": channel_base,
            "channel_max": channel_max}


def _px_range(lo: int, hi: int) -> str:
    return f"{lo}–{hi} px" if hi > lo else f"{lo} px"


def _span(prefix: str, indices: list[int]) -> str:
    return f"{prefix}{indices[0]}–{indices[-1]}" if len(indices) > 1 else f"{prefix}{indices[0]}"


def stylegan2_to_stylizer(g: dict[str, torch.Tensor], size: int = 512,
                          name: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """(Stylizer keys, a line saying which layers were taken) from a rosinality generator of
    ``size`` px or more: its mapping and its size/8 … size px layers (64–512 px at 512²); the
    smaller and larger layers are dropped. A generator smaller than ``size`` is refused."""
    first_rgb = size.bit_length() - 7  # to_rgbs[first_rgb] renders size/8 px: 3 at 512²
    if first_rgb < 0:
        raise ValueError(f"a StyleGAN2 generator seeds Stylizers of size >= 64, got {size}")
    g_size = stylegan2_size(g, name)
    if g_size < size:
        raise CheckpointError(f"{name}: a {g_size}-px StyleGAN2 generator cannot seed a {size}-px Stylizer (it has "
                              f"no {size} px layers); use one of {size} px or more, e.g. the 1024-px FFHQ model")
    last_rgb = first_rgb + 3
    out, convs, rgbs = {}, set(), set()
    for key, value in g.items():
        if key.startswith("style."):
            out["mapping_z." + key[len("style."):]] = value
        elif m := _STYLEGAN2_CONV.fullmatch(key):
            j = int(m[1]) - 2 * first_rgb
            if 0 <= j < 8:
                out[f"decoder{j // 2 + 1}{'a' if j % 2 == 0 else 'b'}.{m[2]}"] = value
                convs.add(int(m[1]))
        elif m := _STYLEGAN2_RGB.fullmatch(key):
            j = int(m[1]) - first_rgb
            if 0 <= j < 4:
                out[f"to_rgb{j + 1}.{m[2]}"] = value
                rgbs.add(int(m[1]))
    n_mlp = sum(1 for k in g if re.fullmatch(r"style\.\d+\.weight", k))
    dropped = _px_range(4, size // 16) + (f" and {_px_range(2 * size, g_size)}" if g_size > size else "")
    line = (f"{name}: seeding the {size}-px Stylizer from a {g_size}-px StyleGAN2 generator: "
            f"style.1–{n_mlp} → mapping_z, {_span('convs.', sorted(convs))} → decoder1a–decoder4b, "
            f"{_span('to_rgbs.', sorted(rgbs))} → to_rgb1–4 ({size // 8}–{size} px); its {dropped} layers "
            f"are not used")
    return out, line


def stylegan2_discriminator_to(d: dict[str, torch.Tensor], size: int, name: str = "checkpoint"
                               ) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """(Discriminator keys, prefixes left at random init) for a ``size``-px Discriminator from
    rosinality's ``d`` of that size or larger. A larger D's ResBlocks below ``size`` px carry
    over (same channels at each resolution); its input layer ``convs.0`` reads another size
    and stays random."""
    blocks = {int(m[1]) for k in d if (m := _STYLEGAN2_CONV.fullmatch(k))}
    d_size = 2 ** (max(blocks, default=0) + 2)
    if d_size == size:
        return d, ()
    if d_size < size:
        raise CheckpointError(f"{name}: its discriminator 'd' is {d_size} px, smaller than the {size}-px Stylizer")
    shift = d_size.bit_length() - size.bit_length()
    out = {}
    for key, value in d.items():
        if m := _STYLEGAN2_CONV.fullmatch(key):
            j = int(m[1]) - shift
            if j >= 1:
                out[f"convs.{j}.{m[2]}"] = value
        else:
            out[key] = value
    return out, ("convs.0.",)


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
        state, _ = stylegan2_to_stylizer(contents.get("g_ema", contents.get("g")),
                                         name=str(src) if not isinstance(src, dict) else "dict")
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
