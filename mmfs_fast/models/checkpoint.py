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

import torch
from torch import nn

from mmfs_fast import atomic
from mmfs_fast.errors import CheckpointError, one_line, option

SAFETENSORS_FORMAT = "mmfs_fast"


def _is_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    return len(head) == 9 and head[8:9] == b"{"


def source_name(src) -> str:
    """How messages name a checkpoint source."""
    return str(src) if isinstance(src, (str, os.PathLike)) else "the checkpoint dict"


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
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({one_line(e)})") from None
    try:
        # rosinality's train.py also saves its argparse.Namespace ("args"): safe to unpickle
        with torch.serialization.safe_globals([argparse.Namespace]):
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for foreign or truncated files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({one_line(e)})") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(contents).__name__}")
    return contents, None


def save_safetensors(state: dict[str, torch.Tensor], config: dict, path) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()},
                metadata={"format": SAFETENSORS_FORMAT, "config": json.dumps(config)})
    atomic.write_bytes(path, data)


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
    """Architecture hyper-parameters that a Stylizer state dict implies (all but the size,
    which no Stylizer weight depends on)."""
    try:
        ngf = state["to_rgb4.conv.weight"].shape[2]
        style_dim = state["mapping_z.1.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"not a Stylizer state dict: key {e.args[0]!r} is missing") from None
    except (AttributeError, IndexError):
        raise CheckpointError("not a Stylizer state dict: to_rgb4.conv.weight or mapping_z.1.weight has the "
                              "wrong shape") from None
    n_mlp = sum(1 for k in state if re.fullmatch(r"mapping_z\.\d+\.weight", k))
    return {"size": size, "ngf": ngf, "style_dim": style_dim, "n_mlp": n_mlp,
            "clip_mapper": any(k.startswith("clip_mapper.") for k in state)}


_RESBLOCK = re.compile(r"convs\.(\d+)\.conv1\.0\.weight")


def size_from_discriminator(d_state, name: str) -> int | None:
    """The image size of an official checkpoint's ``D_model``: its ResBlocks halve the size
    down to 4 px, so there are log2(size) - 2 of them. None without ResBlock keys."""
    if not isinstance(d_state, dict):
        raise CheckpointError(f"{name}: D_model is a {type(d_state).__name__}, not a state dict")
    blocks = {int(m[1]) for k in d_state if isinstance(k, str) and (m := _RESBLOCK.fullmatch(k))}
    if not blocks:
        return None
    if blocks != set(range(1, len(blocks) + 1)) or len(blocks) > 12:
        raise CheckpointError(f"{name}: D_model's blocks are not numbered 1…n ({sorted(blocks)[:12]})")
    return 2 ** (len(blocks) + 2)


def _state_dict(value, name: str, what: str) -> dict[str, torch.Tensor]:
    """``value`` if it is a dict of tensors keyed by strings."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{name}: {what} is a {type(value).__name__}, not a state dict of tensors")
    for key, tensor in value.items():
        if not isinstance(key, str) or not torch.is_tensor(tensor):
            raise CheckpointError(f"{name}: {what} entry {key!r} is a {type(tensor).__name__}, not a tensor")
    return value


def _config_from_metadata(metadata: dict, name: str) -> dict:
    if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{name}: a safetensors file, but not one saved by mmfs_fast (no config metadata)")
    try:
        config = json.loads(metadata["config"])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: its config metadata is not valid JSON ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: its config metadata is a JSON {type(config).__name__}, not an object")
    return config


def check_weights(state: dict[str, torch.Tensor], name: str, allow_cast: bool = False) -> dict[str, torch.Tensor]:
    """Weights fit to compute with: floating point (integer and bool tensors are refused, or cast
    to float32 with ``allow_cast``) and finite. Returns the state, cast where allowed."""
    cast = {}
    for key, t in state.items():
        if not t.is_floating_point():
            if not allow_cast:
                raise CheckpointError(
                    f"{name}: {key} holds {t.dtype} values; weights are floating point, and casting would "
                    f"change what the model computes (outputs saturate). Pass {option('allow_cast')} to cast "
                    f"them to float32 anyway")
            cast[key] = t.float()
    state = {**state, **cast}
    for key, t in state.items():
        if t.is_complex() or not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name}: {key} holds NaN or Inf values: the file is damaged or the training "
                                  "diverged; use another checkpoint")
    return state


def stylizer_state(src, allow_cast: bool = False) -> tuple[dict[str, torch.Tensor], dict, tuple[str, ...]]:
    """(state dict, config, key prefixes left at random init) of any supported Stylizer source,
    every value checked (:func:`check_weights`). The config is unchecked: see
    ``StylizerConfig.from_dict``."""
    contents, metadata = read_checkpoint(src)
    name = source_name(src)
    if metadata is not None:
        state = _state_dict(contents, name, "the file")
        return check_weights(state, name, allow_cast), _config_from_metadata(metadata, name), ()
    uncovered: tuple[str, ...] = ()
    size = 512
    if "G_ema_model" in contents:
        state = _state_dict(contents["G_ema_model"], name, "G_ema_model")
        if "D_model" in contents:
            size = size_from_discriminator(contents["D_model"], name) or size
    elif "g_ema" in contents or "g" in contents:
        key = "g_ema" if "g_ema" in contents else "g"
        state, _ = stylegan2_to_stylizer(_state_dict(contents[key], name, key), name=name)
        uncovered = STYLEGAN2_UNCOVERED
    elif "encoder.0.0.weight" in contents:
        state = _state_dict(contents, name, "the file")
    else:
        keys = ", ".join(map(repr, list(contents)[:5]))
        raise CheckpointError(f"{name}: not an MMFS or StyleGAN2 checkpoint (expected 'G_ema_model', 'g_ema' or "
                              f"Stylizer keys; found {keys})")
    try:
        config = stylizer_config_from_state(state, size)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if uncovered:
        config["clip_mapper"] = False
    return check_weights(state, name, allow_cast), config, uncovered


def state_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   uncovered: tuple[str, ...] = ()) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``expected`` (which
    may live on the meta device): non-tensors, missing, unexpected and wrongly shaped keys."""
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not torch.is_tensor(v)]
    missing = [k for k in expected if k not in state and not k.startswith(uncovered)]
    unexpected = [str(k) for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if torch.is_tensor(state.get(k)) and state[k].shape != v.shape]
    return [f"{name} ({len(items)}): {', '.join(items[:20])}{' …' if len(items) > 20 else ''}"
            for name, items in (("not tensors", not_tensors), ("missing keys", missing),
                                ("unexpected keys", unexpected), ("wrong shapes", mismatched)) if items]


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], uncovered: tuple[str, ...] = (),
               name: str = "checkpoint") -> None:
    """Raise one CheckpointError listing everything that keeps ``state`` from loading into
    ``model`` (built on the meta device, it costs no memory)."""
    problems = state_problems(model.state_dict(), state, uncovered)
    if problems:
        raise CheckpointError(f"{name} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], uncovered: tuple[str, ...] = (),
               name: str = "checkpoint") -> None:
    """Strictly load ``state`` into ``model``: every key present with its exact shape, except
    keys under ``uncovered`` prefixes, which keep their initialisation. Raises one
    CheckpointError listing everything that is wrong."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: a {type(state).__name__} where a state dict was expected")
    check_fits(model, state, uncovered, name)
    expected = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)
