"""Request payloads: multipart or JSON bodies, base64 and image bytes, validated into
clear 4xx errors. Images are decoded from memory only (no request ever names a file)."""
from __future__ import annotations

import base64
import binascii
import io as _bytes_io
import json
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from mmfs_fast.io import ImageError, open_rgb

# formats whose PIL decoders are mature and widely fuzzed; the rest are refused unread
SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_FORM_FIELDS = 16
# the bodies are flat objects of plain values; deeper nesting is refused before parsing, so
# that no body can take json's recursive parser to Python's recursion limit
MAX_JSON_DEPTH = 8
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class RequestError(Exception):
    """A request the service refuses: an HTTP status, a message for the client, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def validate(model: type[BaseModel], fields: dict) -> BaseModel:
    """``model`` from request fields; pydantic's errors as one 422 message."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise RequestError(422, problems) from None


async def read_payload(request: Request, file_fields: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    """(plain fields, file fields as bytes) of a multipart/form-data or JSON body; in JSON
    the file fields are base64 strings (a ``data:…;base64,`` prefix is allowed)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return await _read_json(request, file_fields)
    if content_type == "multipart/form-data":
        return await _read_form(request, file_fields)
    raise RequestError(415, "send multipart/form-data (file uploads) or application/json (base64 images), "
                            f"not {content_type or 'a body without a Content-Type'}")


async def _read_json(request: Request, file_fields: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    raw = await request.body()
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"the JSON body nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed "
                                "(its fields are plain values)")
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(422, "the JSON body must be an object")
    files = {name: decode_base64(body.pop(name), name) for name in file_fields if body.get(name) is not None}
    return body, files


async def _read_form(request: Request, file_fields: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    fields, files = {}, {}
    async with request.form(max_files=len(file_fields), max_fields=MAX_FORM_FIELDS) as form:
        for name, value in form.multi_items():
            if name in fields or name in files:
                raise RequestError(422, f"{name}: given more than once")
            if isinstance(value, UploadFile):
                if name not in file_fields:
                    raise RequestError(422, f"{name}: unexpected file upload (files: {', '.join(file_fields)})")
                files[name] = await value.read()
            elif name in file_fields:
                raise RequestError(422, f"{name}: must be a file upload")
            else:
                fields[name] = value
    return fields, files


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, brackets inside strings not
    counted; linear in the size, without parsing."""
    structure = np.frombuffer(_JSON_STRING.sub(b"", raw), np.uint8)
    step = (np.isin(structure, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(structure, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def decode_base64(value, name: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(422, f"{name}: must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{name}: not valid base64") from None


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Image bytes → RGB PIL image; the pixel count is checked before any pixel is decoded."""
    if not data:
        raise RequestError(400, f"{name}: empty upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(_bytes_io.BytesIO(data), formats=SAFE_FORMATS)
        if img.width * img.height > max_pixels:
            raise RequestError(413, f"{name}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        return open_rgb(img, max_pixels)
    except UnidentifiedImageError:
        raise RequestError(415, f"{name}: not an image in a supported format ({', '.join(SAFE_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name}: too many pixels (decompression bomb)") from None
    except ImageError as e:
        raise RequestError(400, f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"{name}: corrupt or truncated image ({e})") from None
