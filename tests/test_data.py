"""Image sources and the episode sampler."""


import numpy as np
import pytest
import torch
from PIL import Image

from metarestore import degradations
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


def test_awgn_is_gaussian_noise_left_unclipped():
    """awgn: the AWGN benchmarks' unclipped noise is a training family of its own, the same draw as
    gaussian_noise's without the clamp (and a chain ending in it stays unclipped)."""
    sampler = EpisodeSampler(load_images("embedded", "train"), patch_size=32, support=2, query=2)
    a = sampler.episode(TaskSpec("gaussian_noise", 1.0, seed=5))
    b = sampler.episode(TaskSpec("awgn", 1.0, seed=5))
    assert a.query_x.min() >= 0 and a.query_x.max() <= 1
    assert b.query_x.min() < 0 or b.query_x.max() > 1
    assert torch.equal(a.query_y, b.query_y) and a.params == b.params  # the same patches and noise ...
    assert torch.allclose(b.query_x.clamp(0, 1), a.query_x)  # ... only the clipping differs
    assert not degradations.get("gaussian_blur+awgn").clipped and degradations.get("awgn+jpeg").clipped
