"""Image sources and the episode sampler."""


import numpy as np
import pytest
import torch
from PIL import Image

from metarestore.data import (
    DataError,
    EpisodeSampler,
    ImageSet,
    TaskSpec,
    load_embedded,
    load_folder,
    load_images,
)


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_embedded_images_are_colour_uint8_and_splits_disjoint():
    train, val = load_embedded("train"), load_embedded("val")
    assert len(train) >= 10 and len(val) >= 2
    assert not set(train.names) & set(val.names)
    for im in train.images + val.images:
        assert im.dtype == torch.uint8 and im.shape[0] == 3


def test_folder_recursive_formats_grey_and_unreadable(tmp_path):
    rng = np.random.default_rng(0)
    write(tmp_path / "a.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    write(tmp_path / "sub" / "b.jpg", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    write(tmp_path / "sub" / "deep" / "c.bmp", rng.integers(0, 255, (33, 41), dtype=np.uint8))  # grey
    write(tmp_path / "d.tif", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        images = load_folder(tmp_path)
    assert sorted(images.names) == ["a.png", "d.tif", "sub/b.jpg", "sub/deep/c.bmp"]
    assert list(images.skipped) == ["broken.png"]
    grey = images.images[images.names.index("sub/deep/c.bmp")]
    assert grey.shape == (3, 33, 41) and torch.equal(grey[0], grey[1])


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        load_folder(tmp_path)
    write(tmp_path / "small.png", np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="no image is at least 64x64"):
        EpisodeSampler(load_folder(tmp_path), patch_size=64, support=2, query=2)


def test_small_images_are_skipped_with_warning():
    images = ImageSet("x", [torch.zeros(3, 80, 80, dtype=torch.uint8), torch.zeros(3, 10, 80, dtype=torch.uint8)],
                      ["big", "small"])
    with pytest.warns(UserWarning, match="smaller than"):
        kept = images.at_least(64)
    assert kept.names == ["big"] and "small" in kept.skipped


def test_images_are_cached_per_process():
    assert load_images("embedded", "val") is load_images("embedded", "val")


def test_episodes_are_reproducible_and_shaped():
    sampler = EpisodeSampler(load_images("embedded", "train"), patch_size=32, support=3, query=5)
    task = TaskSpec("gaussian_noise", 0.5, seed=123)
    a, b = sampler.episode(task), sampler.episode(task)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.support_x.shape == (3, 3, 32, 32) and a.query_y.shape == (5, 3, 32, 32)
    assert a.params == b.params
    c = sampler.episode(TaskSpec("gaussian_noise", 0.5, seed=124))
    assert not torch.equal(a.support_y, c.support_y)
    assert not torch.equal(a.support_x, a.support_y)  # degraded


def test_unclipped_fraction_keeps_the_noise_outside_the_unit_range():
    """families.unclipped: the AWGN benchmarks' unclipped noise is a training distribution of its own."""
    images = load_images("embedded", "train")
    clipped = EpisodeSampler(images, patch_size=32, support=2, query=2)
    unclipped = EpisodeSampler(images, patch_size=32, support=2, query=2, unclipped={"gaussian_noise": 1.0})
    task = TaskSpec("gaussian_noise", 1.0, seed=5)
    a, b = clipped.episode(task), unclipped.episode(task)
    assert a.query_x.min() >= 0 and a.query_x.max() <= 1
    assert b.query_x.min() < 0 or b.query_x.max() > 1
    assert torch.equal(a.query_y, b.query_y)  # the same patches: only the clipping differs
    assert torch.allclose(b.query_x.clamp(0, 1), a.query_x)
    # other families are untouched, and a fraction draws per task from its seed (both kinds occur)
    blur = TaskSpec("gaussian_blur", 0.5, seed=5)
    assert torch.equal(clipped.episode(blur).query_x, unclipped.episode(blur).query_x)
    half = EpisodeSampler(images, patch_size=32, support=2, query=2, unclipped={"gaussian_noise": 0.5})
    kinds = {bool(((e.query_x < 0) | (e.query_x > 1)).any()) for e in
             (half.episode(TaskSpec("gaussian_noise", 1.0, seed=s)) for s in range(12))}
    assert kinds == {True, False}
