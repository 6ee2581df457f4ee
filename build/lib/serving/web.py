"""The web page at ``/``: try the restorer in a browser (restore, compare, download; make an adapter from
example pairs and restore with it). Plain HTML, JavaScript and CSS from ``serving/web/``; nothing is
fetched from elsewhere, so it works offline.

``add_page(app)`` is the one call the application makes. The page, its assets and its sample images
are public (they hold no secret, and a browser cannot send a bearer token when it navigates to a page);
every API call the page makes sends the token the user entered. The page is served by a middleware
that answers before the application's authentication, so it must be added after it (outermost).
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path

from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

ASSETS = Path(__file__).parent / "web"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/web/app.js": ("app.js", "text/javascript"),
         "/web/style.css": ("style.css", "text/css")}
HEADERS = {  # no inline script, nothing from another origin; images may be blob: URLs the page made
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# Samples: scikit-image photographs (BSD/public domain, shipped in its wheel) degraded by the registry,
# seeded. One image per family to restore; a held-out family's pairs to make an adapter from.
RESTORE_SAMPLES = (("noisy", "astronaut", (30, 150), "gaussian_noise", 0.6),
                   ("blurred", "coffee", (60, 160), "gaussian_blur", 0.5),
                   ("jpeg", "chelsea", (40, 120), "jpeg", 0.7),
                   ("colour cast", "rocket", (100, 180), "color_cast", 0.8))
PAIR_FAMILY, PAIR_SEVERITY = "color_cast", 0.8
PAIR_CROPS = (("astronaut", (0, 0)), ("coffee", (0, 0)), ("astronaut", (200, 200)))
SAMPLE_SIZE, PAIR_SIZE = 256, 128


def add_page(app: ASGIApp) -> None:
    """Serve the page at ``/`` of ``app`` (a FastAPI app), ahead of its other middleware."""
    app.add_middleware(PageMiddleware)  # type: ignore[attr-defined]


class PageMiddleware:
    """Answers GET/HEAD for the page, its assets and the samples; passes everything else on."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path, root = scope["path"], scope.get("root_path", "")
            if root and path == root.rstrip("/"):  # /prefix -> /prefix/: the page's relative links need the slash
                await RedirectResponse(root.rstrip("/") + "/", status_code=308)(scope, receive, send)
                return
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            found = await _lookup(path)
            if found is not None:
                body, media_type = found
                await Response(body, media_type=media_type, headers=HEADERS)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _lookup(path: str) -> tuple[bytes, str] | None:
    if path in PAGES:
        name, media_type = PAGES[path]
        return (ASSETS / name).read_bytes(), media_type
    if path == "/web/samples.json":
        return json.dumps(_catalogue()).encode(), "application/json"
    if path.startswith("/web/samples/"):
        images = await asyncio.to_thread(samples)
        name = path.removeprefix("/web/samples/")
        return (images[name], "image/png") if name in images else None
    return None


def _catalogue() -> dict:
    """What the page offers: images to restore, and (degraded, clean) pairs plus a query of one family."""
    return {"restore": [{"title": f"{title} ({image})", "url": f"web/samples/{_slug(title)}.png"}
                        for title, image, *_ in RESTORE_SAMPLES],
            "pairs": {"family": PAIR_FAMILY,
                      "pairs": [{"degraded": f"web/samples/pair{i}-degraded.png", "clean": f"web/samples/pair{i}-clean.png"}
                                for i in range(len(PAIR_CROPS))],
                      "query": "web/samples/pair-query.png"}}


def _slug(title: str) -> str:
    return title.replace(" ", "-")


_lock = threading.Lock()
_cache: dict[str, bytes] = {}


def samples() -> dict[str, bytes]:
    """The sample PNGs by file name, made once per process (about a second)."""
    with _lock:
        if not _cache:
            _cache.update(_make_samples())
    return _cache


def _make_samples() -> dict[str, bytes]:
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    from metarestore import degradations
    from metarestore.degradations.base import reseed

    def crop(name: str, at: tuple[int, int], size: int) -> torch.Tensor:
        array = getattr(skimage.data, name)()[at[0]:at[0] + size, at[1]:at[1] + size]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255

    def png(x: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((x[0].clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
        return buf.getvalue()

    out = {}
    for i, (title, image, at, family, severity) in enumerate(RESTORE_SAMPLES):
        fam = degradations.get(family)
        out[f"{_slug(title)}.png"] = png(fam(crop(image, at, SAMPLE_SIZE),
                                             fam.sample(severity, torch.Generator().manual_seed(i))))
    fam = degradations.get(PAIR_FAMILY)
    params = fam.sample(PAIR_SEVERITY, torch.Generator().manual_seed(0))  # one task: the pairs share it
    for i, (image, at) in enumerate(PAIR_CROPS):
        clean = crop(image, at, PAIR_SIZE)
        out[f"pair{i}-clean.png"] = png(clean)
        out[f"pair{i}-degraded.png"] = png(fam(clean, reseed(params, i)))
    out["pair-query.png"] = png(fam(crop("chelsea", (50, 50), SAMPLE_SIZE), reseed(params, 99)))
    return out
