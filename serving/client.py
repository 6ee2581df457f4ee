"""A small Python client for the metarestore server (what ``metarestore restore/adapt --endpoint`` use).

    client = RestorerClient("http://127.0.0.1:8000", token=None)
    adapter = client.create_adapter(["d1.png", "d2.png"], ["c1.png", "c2.png"], steps=10)
    client.restore_file("in.png", "out.png", adapter=adapter["adapter_id"])

A 4xx from the server raises ``ServerError`` (a UserError) carrying the server's code and message.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from metarestore.errors import UserError


class ServerError(UserError):
    """The server refused the request (4xx/5xx) or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0, code: str = "unreachable"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Restored:
    png: bytes
    model_version: str
    adapter: str | None
    replica: str
    found: str | None = None  # blind: what the server's estimator found (X-Degradation)
    restored_as: str | None = None  # blind: what it undid, comma-separated, or "none" (X-Restored-As)


def _image_bytes(image: str | Path | bytes) -> tuple[bytes, str]:
    """Bytes and Content-Type; files that are not PNG/JPEG (BMP, TIFF, ...) are converted to PNG here."""
    if isinstance(image, bytes):
        data = image
    else:
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image not found: {path}")
        data = path.read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data, "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return data, "image/jpeg"
    if isinstance(image, bytes):
        return data, "application/octet-stream"  # the server says what is wrong with it
    from PIL import Image

    from metarestore.data.images import read_image

    tensor, grey = read_image(image)  # a clear UserError if it is not an image
    buf = io.BytesIO()
    Image.fromarray(tensor.permute(1, 2, 0).numpy()).convert("L" if grey else "RGB").save(buf, format="PNG")
    return buf.getvalue(), "image/png"


class RestorerClient:
    def __init__(self, endpoint: str, token: str | None = None, timeout: float = 600.0):
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        url = f"{self.endpoint}{path}"
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach {self.endpoint} ({exc.__class__.__name__}); is the server "
                              "running? (metarestore serve --model ...)") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", response.text[:200] or response.reason
            raise ServerError(f"{self.endpoint} answered {response.status_code} {code}: {message}",
                              response.status_code, code)
        return response

    def health(self) -> dict:
        return self._call("GET", "/healthz").json()

    def model_info(self) -> dict:
        return self._call("GET", "/v1/model").json()

    def restore(self, image: str | Path | bytes, adapter: str | None = None,
                degradation: str | None = None) -> Restored:
        """Restore a PNG/JPEG (path or bytes; other formats given as a path are sent as PNG); ``degradation``
        names what happened to it, for a model that can be told (``/v1/model``'s ``degradations``)."""
        data, content_type = _image_bytes(image)
        params = {k: v for k, v in (("adapter", adapter), ("degradation", degradation)) if v} or None
        response = self._call("POST", "/v1/restore", data=data, params=params,
                              headers={"Content-Type": content_type})
        used = response.headers.get("X-Adapter", "none")
        return Restored(response.content, response.headers.get("X-Model-Version", "?"),
                        None if used == "none" else used, response.headers.get("X-Replica", "?"),
                        response.headers.get("X-Degradation"), response.headers.get("X-Restored-As"))

    def restore_file(self, image: str | Path, output: str | Path, adapter: str | None = None,
                     degradation: str | None = None) -> dict:
        """Restore ``image`` into ``output`` (PNG as sent; another extension is re-encoded locally)."""
        result = self.restore(image, adapter=adapter, degradation=degradation)
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".png":
            output.write_bytes(result.png)
        else:
            from PIL import Image

            try:
                Image.open(io.BytesIO(result.png)).save(output)
            except (ValueError, KeyError, OSError) as exc:
                raise UserError(f"cannot write {output}: {exc}") from None
        return {"output": str(output), "model_version": result.model_version, "adapter": result.adapter,
                "replica": result.replica, "found": result.found, "restored_as": result.restored_as}

    def create_adapter(self, degraded: Sequence[str | Path | bytes], clean: Sequence[str | Path | bytes],
                       steps: int | None = None, path: str | None = None, kind: str | None = None) -> dict:
        """Send K (degraded, clean) pairs, in order; returns the adapter's JSON (``adapter_id``, the ``path``
        chosen, held-out PSNRs ``psnr_input``, ``psnr_zero_shot``, ``psnr_adapted`` etc.). ``path``: auto (the
        server's default) or a path name such as film; ``kind``: its former name (deprecated)."""
        path = path if path is not None else kind
        if len(degraded) != len(clean):
            raise UserError(f"{len(degraded)} degraded but {len(clean)} clean images: give them in pairs")
        files = []
        for i, (d, c) in enumerate(zip(degraded, clean, strict=True)):
            for field, image in (("degraded", d), ("clean", c)):
                data, content_type = _image_bytes(image)
                files.append((field, (f"{field}{i}.png", data, content_type)))
        data = {"steps": str(steps)} if steps is not None else {}
        if path is not None:
            data["path"] = path
        return self._call("POST", "/v1/adapters", files=files, data=data or None).json()

    def get_adapter(self, adapter_id: str) -> dict:
        return self._call("GET", f"/v1/adapters/{adapter_id}").json()

    def delete_adapter(self, adapter_id: str) -> dict:
        return self._call("DELETE", f"/v1/adapters/{adapter_id}").json()
