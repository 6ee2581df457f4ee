"""What FastAPI cannot see for itself in the OpenAPI documentation: the routes read their bodies
themselves (to bound their size before parsing), so their request bodies and the restore answer's
headers are described here."""

from __future__ import annotations

from serving.limits import MULTIPART

PATH_FIELD = {"type": "string", "default": "auto", "description": "auto (the path is chosen by leave-one-out on "
              "the pairs) or a path: film, zero_shot, deconv@0.01, deconv@0.01+film, hqs@0.01, tone, tone+film, "
              "haze, ..."}


def form_file_body(*fields: str) -> dict:
    """The request body of a route that parses its multipart form itself: one file array per field."""
    props = {f: {"type": "array", "items": {"type": "string", "format": "binary"}} for f in fields}
    return {"requestBody": {"required": True, "content": {MULTIPART: {"schema": {"type": "object",
                                                                                  "properties": props}}}}}


def restore_body() -> dict:
    """/v1/restore: raw PNG/JPEG bytes, or multipart with a file field ``image``."""
    body = form_file_body("image")
    body["requestBody"]["content"].update({t: {"schema": {"type": "string", "format": "binary"}}
                                           for t in ("image/png", "image/jpeg")})
    return body


RESTORE_HEADERS = {
    "X-Degradation": {"schema": {"type": "string"}, "description": "Blind requests only: what the degradation "
                      "estimator found, e.g. 'clean (p=0.97)' or 'jpeg (p=1.00, quality 30) + gaussian_noise "
                      "(p=0.91, severity 0.40)'."},
    "X-Restored-As": {"schema": {"type": "string"}, "description": "Blind requests only: the families undone, in "
                      "order (comma-separated; 'jpeg:0.50' keeps half of the told correction, for mild "
                      "compression), or 'none' when the image came back as it was sent."},
    "X-Model-Version": {"schema": {"type": "string"}}, "X-Adapter": {"schema": {"type": "string"}}}


def adapter_body() -> dict:
    """/v1/adapters: the pairs as files, and the fields ``steps``, ``label`` and ``path`` (``kind``: its
    deprecated alias, still accepted)."""
    body = form_file_body("degraded", "clean")
    body["requestBody"]["content"][MULTIPART]["schema"]["properties"].update(
        steps={"type": "integer"}, label={"type": "string", "maxLength": 200}, path=PATH_FIELD,
        kind={**PATH_FIELD, "deprecated": True, "description": "Deprecated alias of 'path' (kept for one "
              "release): " + PATH_FIELD["description"]})
    return body
