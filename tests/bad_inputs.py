"""A corpus of bad (and awkward but valid) inputs, written on demand, and the seeded mutations
that the hardening tests feed to the image and checkpoint loaders.

Images: :func:`write_image_corpus` → {name: (path, readable)}, where ``readable`` says whether
the loader must accept the file (unusual modes are valid images) or reject it with an
ImageError naming it. Checkpoints: :func:`write_checkpoint_corpus` → {name: path}, each to be
refused with a CheckpointError naming it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# a tiny Stylizer: checkpoints of it are a few hundred KB
TINY = {"size": 16, "ngf": 1, "style_dim": 8, "n_mlp": 1, "clip_mapper": False}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_with_size(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A grayscale PNG header claiming ``width``×``height``; ``rows``: the raw scanlines (none:
    an empty data stream)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(rows, 9) if rows is not None else b""
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def short_ihdr_png() -> bytes:
    """22 bytes: an IHDR chunk of 2 bytes (PIL: "Truncated IHDR chunk")."""
    return PNG_SIGNATURE + png_chunk(b"IHDR", b"\x00\x01")


def decompression_bomb() -> bytes:
    """An 8000×8000 grayscale PNG of zeros: 64 MP (over the default limit of 50) from 60 KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * 8001
    data = b"".join(comp.compress(row) for _ in range(8000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def sample_rgb(size: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def jpeg_with_bad_exif() -> bytes:
    """A JPEG whose APP1 EXIF block is garbage after its header."""
    jpeg = encoded(sample_rgb(), "JPEG")
    exif = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\xfe\xfd\xfc" * 8
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:]


def image_corpus() -> dict[str, tuple[str, bytes, bool]]:
    """name → (file suffix, bytes, readable)."""
    rgb = sample_rgb()
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA")
    good_png = encoded(rgb, "PNG")
    frames = [sample_rgb(seed=s).convert("P") for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = Image.fromarray(np.random.default_rng(2).integers(0, 65536, (24, 24), dtype=np.uint16))
    return {
        "good": (".png", good_png, True),
        "rgba": (".png", encoded(rgba, "PNG"), True),
        "cmyk": (".jpg", encoded(rgb.convert("CMYK"), "JPEG"), True),
        "one_bit": (".png", encoded(rgb.convert("1"), "PNG"), True),
        "sixteen_bit": (".png", encoded(sixteen, "PNG"), True),
        "animated": (".gif", gif.getvalue(), True),
        "bad_exif": (".jpg", jpeg_with_bad_exif(), True),
        "float_tiff": (".tif", encoded(Image.fromarray(np.random.default_rng(3).random((24, 24), np.float32)),
                                       "TIFF"), False),
        "truncated": (".png", good_png[: len(good_png) // 2], False),
        "short_ihdr": (".png", short_ihdr_png(), False),
        "huge_header": (".png", png_with_size(2 ** 31 - 1, 2 ** 31 - 1), False),
        "zero_size": (".png", png_with_size(0, 0), False),
        "bomb": (".png", decompression_bomb(), False),
        "text": (".jpg", b"this is not an image\n" * 10, False),
        "zero_bytes": (".png", b"", False),
        "random_bytes": (".webp", random.Random(0).randbytes(300), False),
    }


def write_image_corpus(folder: Path) -> dict[str, tuple[Path, bool]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (suffix, data, readable) in image_corpus().items():
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        out[name] = (path, readable)
    return out


# -- checkpoints -------------------------------------------------------------------------
class Exploit:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_state() -> dict[str, torch.Tensor]:
    from mmfs_fast.models import Stylizer, StylizerConfig

    torch.manual_seed(0)
    return Stylizer(StylizerConfig(**TINY)).official_state_dict()


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def checkpoint_corpus(marker: Path) -> dict[str, tuple[str, bytes]]:
    """name → (suffix, bytes) of files every Stylizer loader must refuse."""
    state = tiny_state()
    first = next(iter(state))
    good_pt = torch_bytes({"G_ema_model": state})
    config = json.dumps(TINY)
    with_ = lambda **changes: {**state, **changes}  # noqa: E731
    nan = with_(**{first: torch.full_like(state[first], float("nan"))})
    inf = with_(**{first: torch.full_like(state[first], float("inf"))})
    wrong_shape = with_(**{first: torch.zeros(3, 3)})
    wrong_keys = {f"renamed.{k}": v for k, v in state.items()}
    int8 = {k: v.to(torch.int8) for k, v in state.items()}
    boolean = {k: v.bool() for k, v in state.items()}
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "truncated": (".pt", good_pt[: len(good_pt) // 2]),
        "random_bytes": (".pt", random.Random(1).randbytes(4096)),
        "zero_bytes": (".pt", b""),
        "text": (".pt", b"not a checkpoint\n"),
        "malicious_pickle": (".pt", pickle.dumps({"G_ema_model": Exploit(marker)})),
        "malicious_torch": (".pt", torch_bytes({"G_ema_model": {first: Exploit(marker)}})),
        "not_a_dict": (".pt", torch_bytes([1, 2, 3])),
        "g_ema_tensor": (".pt", torch_bytes({"G_ema_model": torch.zeros(3)})),
        "g_ema_list": (".pt", torch_bytes({"G_ema_model": [torch.zeros(3)]})),
        "non_tensor_value": (".pt", torch_bytes({"G_ema_model": with_(**{first: 3.0})})),
        "wrong_keys": (".pt", torch_bytes({"G_ema_model": wrong_keys})),
        "wrong_shape": (".pt", torch_bytes({"G_ema_model": wrong_shape})),
        "int8": (".pt", torch_bytes({"G_ema_model": int8})),
        "bool": (".safetensors", safetensors_bytes(boolean, {"format": "mmfs_fast", "config": config})),
        "nan": (".pt", torch_bytes({"G_ema_model": nan})),
        "inf": (".safetensors", safetensors_bytes(inf, {"format": "mmfs_fast", "config": config})),
        "huge_config": (".safetensors", safetensors_bytes({"x": torch.zeros(2)}, {"format": "mmfs_fast",
                                                                                   "config": '{"ngf": 2048}'})),
        "large_config": (".safetensors", safetensors_bytes(state, {"format": "mmfs_fast",
                                                                    "config": json.dumps({**TINY, "ngf": 128,
                                                                                          "size": 1024})})),
        "evil_config_key": (".safetensors", safetensors_bytes(state, {"format": "mmfs_fast",
                                                                       "config": '{"evil": 1}'})),
        "config_wrong_type": (".safetensors", safetensors_bytes(state, {"format": "mmfs_fast",
                                                                         "config": '{"ngf": "64"}'})),
        "config_not_json": (".safetensors", safetensors_bytes(state, {"format": "mmfs_fast", "config": "{ngf"})),
        "config_list": (".safetensors", safetensors_bytes(state, {"format": "mmfs_fast", "config": "[1]"})),
        "config_deep": (".safetensors", safetensors_bytes(state, {"format": "mmfs_fast", "config": deep})),
        "foreign_safetensors": (".safetensors", safetensors_bytes(state, {})),
        "bad_safetensors_header": (".safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1"),
    }


def write_checkpoint_corpus(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (suffix, data) in checkpoint_corpus(marker).items():
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        out[name] = path
    return out


# -- seeded mutations ----------------------------------------------------------------------
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: bit flips, byte overwrites with boundary values, truncation,
    insertion, deletion or duplication of a span."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 16))
            continue
        kind = rng.randrange(6)
        i = rng.randrange(len(buf))
        if kind == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        elif kind == 2:
            del buf[i:]
        elif kind == 3:
            buf[i:i] = rng.randbytes(rng.randint(1, 32))
        elif kind == 4:
            del buf[i:i + rng.randint(1, 64)]
        else:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j:j + rng.randint(1, 64)]
    return bytes(buf)


def fuzz(prefix: Path, seeds: dict[str, bytes], cases: int, rng: random.Random, load, error: type) -> dict[str, int]:
    """``cases`` seeded mutations of the valid files ``seeds`` (suffix → bytes), written next to
    ``prefix`` and passed to ``load``: each must load (``load`` checks the result) or raise
    ``error`` naming its file; nothing else may escape. Returns how many did which."""
    counts = {"ok": 0, "error": 0}
    for i in range(cases):
        suffix, data = rng.choice(list(seeds.items()))
        path = prefix.with_name(f"{prefix.name}{i % 20}{suffix}")
        path.write_bytes(mutate(data, rng))
        try:
            load(path)
        except error as e:
            assert str(path) in str(e), e
            counts["error"] += 1
        else:
            counts["ok"] += 1
    return counts
