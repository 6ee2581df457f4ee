"""What a request may say, checked before any costly work: the restore body's image, the adapter form's
pairs and fields. Every refusal is an ``ApiError`` with its status and a message that says what to send."""

from __future__ import annotations

import math
from dataclasses import dataclass

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from serving.limits import MEDIA_TYPES, MULTIPART, ApiError, media_type, parse_form


async def restore_image_bytes(request: Request, body: bytes) -> bytes:
    """The image of a /v1/restore body: raw PNG/JPEG bytes, or the multipart field ``image``."""
    content_type = media_type(request)
    if content_type == MULTIPART:
        form = await parse_form(request, body, max_files=1)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_field", "the multipart body needs a file field 'image'")
        return await upload.read()
    if content_type in MEDIA_TYPES:
        return body
    raise ApiError(415, "unsupported_media_type", f"Content-Type {content_type or '(none)'} is not accepted: send "
                   "image/png or image/jpeg bytes, or multipart/form-data with a file field 'image'")


@dataclass
class AdapterForm:
    """A checked /v1/adapters form: the pairs' bytes, not yet decoded."""

    pairs: list[tuple[bytes, bytes]]
    steps: int
    label: str | None
    path: str  # auto or a path name


async def adapter_form(request: Request, body: bytes, max_shots: int, adapt_steps: int, max_steps: int,
                       auto_names: list[str]) -> AdapterForm:
    """Parse and check the multipart form: files ``degraded`` and ``clean`` (once per pair, in order),
    optional ``steps``, ``label`` and ``path`` (or its deprecated alias ``kind``)."""
    if media_type(request) != MULTIPART:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with file fields 'degraded' "
                       "and 'clean' (once per pair, in order) and an optional field 'steps'")
    form = await parse_form(request, body, max_files=4 * max_shots)
    degraded, clean = form.getlist("degraded"), form.getlist("clean")
    if not all(isinstance(f, UploadFile) for f in degraded + clean):
        raise ApiError(400, "missing_field", "'degraded' and 'clean' must be files")
    if not degraded or not clean:
        raise ApiError(400, "missing_field", "send at least one pair: file fields 'degraded' and 'clean'")
    if len(degraded) != len(clean):
        raise ApiError(400, "pair_count_mismatch", f"{len(degraded)} degraded but {len(clean)} clean images")
    if len(degraded) > max_shots:
        raise ApiError(400, "too_many_shots", f"{len(degraded)} pairs; at most {max_shots}")
    steps = steps_field(form.get("steps"), adapt_steps, max_steps)
    label = label_field(form.get("label"))
    path = path_field(_path_or_kind(form), auto_names)
    pairs = [(await d.read(), await c.read()) for d, c in zip(degraded, clean, strict=True)]
    return AdapterForm(pairs, steps, label, path)


def steps_field(value, default: int, most: int) -> int:
    if value is None or value == "":
        return default
    try:
        steps = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "invalid_steps", f"steps must be an integer, got {str(value)[:20]!r}") from None
    if steps < 1:
        raise ApiError(400, "invalid_steps", "steps must be at least 1")
    if steps > most:
        raise ApiError(400, "too_many_steps", f"steps={steps}; at most {most}")
    return steps


def label_field(value) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200 or not value.isprintable():
        raise ApiError(400, "invalid_label", "label must be printable text of at most 200 characters")
    return value


def _path_or_kind(form: FormData):
    """The field ``path``, or ``kind``, its former name (one of them, or both saying the same)."""
    path, kind = form.get("path"), form.get("kind")
    if path in (None, ""):
        return kind
    if kind not in (None, "") and kind != path:
        raise ApiError(422, "invalid_kind", "give 'path' or its deprecated alias 'kind', not two different paths")
    return path


def path_field(value, auto_names: list[str]) -> str:
    """The adapter's path: auto or a path name that ``Path.parse`` reads back to the same path."""
    from metarestore.operators.paths import MAX_PASSES, PRE_STEPS, Path

    if value is None or value == "":
        return "auto"
    if isinstance(value, str) and value == "auto":
        return value
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError(value)
        path = Path.parse(value)
        if not math.isfinite(path.balance) or not 0 <= path.balance <= 10 or Path.parse(path.name) != path:
            raise ValueError(value)
        if path.told is not None and f"told:{path.told}" not in auto_names:  # a family the model cannot be told
            raise ValueError(value)
    except ValueError:
        shown = str(value)[:40] if isinstance(value, str) else "(a file)"
        raise ApiError(422, "invalid_kind", f"kind {shown!r} is not auto or an adaptation path; valid: auto, "
                       f"{', '.join(auto_names)} (PRE@BALANCE and PRE@BALANCE+film with PRE one of "
                       f"{', '.join(p for p in PRE_STEPS if p != 'none')}; told:FAMILY or told:FAMILY*N, N up to "
                       f"{MAX_PASSES}, for a family the model can be told)") from None
    return path.name
