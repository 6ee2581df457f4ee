"""What the server accepts: body size, image formats and pixel counts, checked before any costly work.

Decoding reads the image header first and refuses too many pixels (or an extreme aspect ratio) before
a single pixel is decompressed, so a small file that claims a huge image (a decompression bomb) costs
nothing. Every PNG/JPEG mode becomes RGB in [0, 1] the way a viewer shows it: EXIF orientation applied,
16-bit samples scaled (not clipped), palettes expanded, CMYK converted, transparency composited on
white. The response is an 8-bit PNG: greyscale (``L``) when the input was greyscale, else RGB; never alpha.
"""

from __future__ import annotations

import asyncio
import io
import struct
import warnings
import zlib
from collections.abc import AsyncIterator

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from metarestore.data.images import to_pil
from metarestore.errors import UserError
from metarestore.pixels import to_uint8

DEFAULT_MAX_PIXELS = 16_000_000  # 16 MP per image
DEFAULT_MAX_BODY_MB = 64.0
FORMATS = ("PNG", "JPEG")  # the only decoders PIL may use on request bytes
MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/pjpeg"}
MULTIPART = "multipart/form-data"
GREY_MODES = ("L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "1", "F")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits per sample
DEFAULT_MAX_ASPECT = 32.0


class ApiError(UserError):
    """A bad request: the server answers ``status`` with ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_bytes: int, idle_timeout_s: float | None = None,
                    deadline_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes`` (declared or streamed), and
    with 408 when the client sends nothing for ``idle_timeout_s`` or is not done after ``deadline_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    loop = asyncio.get_running_loop()
    end = None if deadline_s is None else loop.time() + deadline_s
    chunks, size = [], 0
    stream = request.stream()
    while True:
        waits = [t for t in (idle_timeout_s, None if end is None else end - loop.time()) if t is not None]
        try:
            chunk = await asyncio.wait_for(anext(stream), min(waits) if waits else None)
        except StopAsyncIteration:
            break
        except TimeoutError:
            await stream.aclose()
            raise ApiError(408, "body_timeout", "the request body stopped arriving (or took too long); "
                           "send it in one go") from None
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is larger than {max_bytes / 2**20:g} MiB")


async def parse_form(request: Request, body: bytes, max_files: int) -> FormData:
    """Parse an already size-checked multipart body (files spool to disk above 1 MiB)."""
    async def once() -> AsyncIterator[bytes]:
        yield body
        yield b""

    try:
        return await MultiPartParser(request.headers, once(), max_files=max_files, max_fields=16).parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from None


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    return None


def decode_image(data: bytes, max_pixels: int, what: str = "image",
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[torch.Tensor, bool]:
    """PNG or JPEG bytes -> ((1, 3, H, W) float in [0, 1], was_grey).

    Raises ApiError: 400 empty or corrupt, 415 another format, 413 more than ``max_pixels``,
    422 a side more than ``max_aspect`` times the other (a 16,000,000 x 1 strip is thousands of tiles).
    """
    if not data:
        raise ApiError(400, "empty_body", f"{what} is empty")
    if _sniff(data) is None:
        raise _not_png_or_jpeg(data, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check follows
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                width, height = im.size  # from the header; nothing decompressed yet
                if width * height > max_pixels:
                    raise ApiError(413, "too_many_pixels", f"{what} is {width}x{height} = "
                                   f"{width * height / 1e6:.1f} MP; the limit is {max_pixels / 1e6:g} MP")
                if max(width, height) > max_aspect * min(width, height):
                    raise ApiError(422, "extreme_aspect_ratio", f"{what} is {width}x{height}; one side may be "
                                   f"at most {max_aspect:g} times the other")
                grey = im.mode in GREY_MODES
                rgb = _as_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError:  # PIL's own guard, when it trips before ours
        raise ApiError(413, "too_many_pixels", f"{what} has more than {max_pixels / 1e6:g} MP") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, "invalid_image", f"{what} is not a valid PNG or JPEG image ({exc})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous(), grey


def _as_rgb(im: Image.Image) -> np.ndarray:
    """Any PNG/JPEG mode -> (H, W, 3) float32 in [0, 1], as a viewer shows it on a white page."""
    if im.mode in WIDE_MODES:  # 16-bit greyscale PNG (Pillow: I;16 or I): scale the full range
        grey = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    if im.has_transparency_data:  # RGBA, LA, palette or colour-key transparency
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # L, 1, P, RGB, CMYK, YCbCr


def _not_png_or_jpeg(data: bytes, what: str) -> ApiError:
    """415 when it is some other image format (PIL knows it), 400 when it is not an image at all."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only
            fmt = im.format
    except Exception:  # any failure just means "not an image"
        return ApiError(400, "invalid_image", f"{what} is not a PNG or JPEG image (unrecognised bytes)")
    return ApiError(415, "unsupported_format", f"{what} is {fmt}; send PNG or JPEG")


def encode_png(image: torch.Tensor, grey: bool = False, level: int = 0) -> bytes:
    """A float (1, 3, H, W) or (3, H, W) tensor in [0, 1] -> PNG bytes (grey in, grey out).

    zlib ``level`` 0 by default, the better trade for a transient response (photographs barely compress
    losslessly): written as stored blocks with no row filters (``stored_png``), 4x faster than libpng at
    level 0, which still runs its per-row filter search. Above 0, colour goes through torchvision's libpng
    encoder. Grey goes through Pillow's luma conversion, which defines what a grey client gets back."""
    if grey:
        pil = to_pil(image, grey)
        if level == 0:
            return stored_png(np.asarray(pil))
        buf = io.BytesIO()
        pil.save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    pixels = to_uint8(image[0] if image.ndim == 4 else image)
    if level == 0:
        return stored_png(pixels.permute(1, 2, 0).numpy())
    return torchvision.io.encode_png(pixels, compression_level=level).numpy().tobytes()


def stored_png(pixels: np.ndarray) -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 -> an uncompressed PNG (filter 0 on every row, zlib level 0).

    The format's own minimum (signature, IHDR, one IDAT, IEND; RFC 2083): what libpng writes at level 0
    without the filter search, which is most of its time on a 256x256 image."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # column 0: the row's filter type, 0 (none)
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(rows.data, 0)), _chunk(b"IEND", b"")))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))
