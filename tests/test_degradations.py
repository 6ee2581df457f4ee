"""The degradation families: each degrades real images, keeps shape/dtype/range, is deterministic given
its parameters, samples inside its documented ranges and behaves like the operator it models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from metarestore.degradations import UnknownFamilyError, get, names

FAMILIES = names()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def load(image, size: int = 128) -> torch.Tensor:
    """A skimage uint8 image as a (1,C,size,size) float batch in [0, 1], antialiased resize."""
    x = torch.from_numpy(image).float().div(255.0)
    x = x.permute(2, 0, 1)[None] if x.ndim == 3 else x[None, None]
    x = F.interpolate(x, size=(size, size), mode="area")
    return (x * 255).round().clamp(0, 255) / 255.0  # exact 8-bit levels


@pytest.fixture(scope="module")
def colour() -> torch.Tensor:
    return load(data.astronaut())


@pytest.fixture(scope="module")
def grey() -> torch.Tensor:
    return load(data.camera())


def test_registry_order() -> None:
    assert FAMILIES == ["gaussian_noise", "poisson_noise", "salt_pepper", "gaussian_blur", "motion_blur",
                        "jpeg", "downsample", "low_light", "color_cast", "contrast", "haze", "inpainting", "awgn"]


@pytest.mark.parametrize("name", FAMILIES)
def test_degrades_real_images(name: str, colour: torch.Tensor, grey: torch.Tensor) -> None:
    family = get(name)
    for seed in range(3):
        params = family.sample(0.5, gen(seed))
        assert psnr(family(colour, params), colour) < 35.0
        if name != "color_cast":  # grey gets the mean gain, which may be ~1 for some directions
            assert psnr(family(grey, params), grey) < 35.0


@pytest.mark.parametrize("sigma", [5 / 255, 25 / 255, 50 / 255])
def test_gaussian_noise_level(sigma: float) -> None:
    x = torch.full((2, 3, 128, 128), 0.5)
    y = get("gaussian_noise")(x, {"sigma": sigma, "seed": 7})
    assert abs((y - x).std().item() - sigma) < 0.1 * sigma


def high_frequency_energy(x: torch.Tensor, radius: float = 0.15) -> float:
    """Spectral energy outside a disc of ``radius`` cycles/pixel (DC-centred), summed over the batch."""
    spectrum = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    return spectrum[..., (fx**2 + fy**2).sqrt() > radius].sum().item()


@pytest.mark.parametrize("name", ["gaussian_blur", "motion_blur"])
def test_blur_removes_high_frequencies(name: str, colour: torch.Tensor, grey: torch.Tensor) -> None:
    family = get(name)
    for x in (colour, grey):
        for seed in range(3):
            y = family(x, family.sample(0.5, gen(seed)))
            assert high_frequency_energy(y) < 0.5 * high_frequency_energy(x)


def test_gaussian_blur_samples_both_shapes() -> None:
    family = get("gaussian_blur")
    params = [family.sample(0.5, gen(seed)) for seed in range(40)]
    isotropic = [p["sigma_x"] == p["sigma_y"] and p["angle"] == 0.0 for p in params]
    assert 5 < sum(isotropic) < 35


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_jpeg_matches_torchvision(quality: int, colour: torch.Tensor, grey: torch.Tensor) -> None:
    for x, mode in ((colour, ImageReadMode.RGB), (grey, ImageReadMode.GRAY)):
        batch = torch.cat([x, x.flip(-1)])
        y = get("jpeg")(batch, {"quality": quality, "seed": 0})
        for i in range(batch.shape[0]):
            raw = (batch[i] * 255).round().to(torch.uint8)
            ref = decode_jpeg(encode_jpeg(raw, quality=quality), mode=mode).float() / 255.0
            assert torch.equal(y[i], ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic(name: str, colour: torch.Tensor) -> None:
    family = get(name)
    params = family.sample(0.5, gen(11))
    assert params == family.sample(0.5, gen(11))
    assert params != family.sample(0.5, gen(12))
    batch = torch.cat([colour, colour.flip(-2)])
    assert torch.equal(family(batch, params), family(batch, json.loads(json.dumps(params))))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_range(name: str, channels: int) -> None:
    family = get(name)
    for shape, dtype in (((3, channels, 8, 8), torch.float32), ((2, channels, 24, 41), torch.float32),
                         ((1, channels, 33, 16), torch.float64)):
        x = torch.rand(shape, generator=gen(0), dtype=dtype)
        for severity in (0.0, 1.0):
            y = family(x, family.sample(severity, gen(1)))
            assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
            assert family.clipped == bool(y.min() >= 0.0 and y.max() <= 1.0)  # awgn alone keeps its overshoot


def test_chain_applies_in_order(colour: torch.Tensor) -> None:
    chain = get("gaussian_blur+jpeg")
    params = chain.sample(0.5, gen(3))
    json.dumps(params)
    blur_params, jpeg_params = params["chain"]
    expected = get("jpeg")(get("gaussian_blur")(colour, blur_params), jpeg_params)
    assert torch.equal(chain(colour, params), expected)
    assert psnr(chain(colour, params), colour) < psnr(get("jpeg")(colour, jpeg_params), colour)


def test_unknown_family() -> None:
    with pytest.raises(UnknownFamilyError) as info:
        get("nope")
    message = str(info.value)
    assert "nope" in message and all(name in message for name in FAMILIES)
    with pytest.raises(UnknownFamilyError):
        get("jpeg+nope")


@pytest.mark.parametrize("name", FAMILIES)
def test_describe_is_json(name: str) -> None:
    family = get(name)
    described = json.loads(json.dumps(family.describe()))
    assert described["name"] == name and described["description"]
    assert described["params"] and type(family).__doc__
    assert set(described["params"]) == set(family.specs)
    for key, spec in described["params"].items():
        # the documented ends are the values the operator really gets (integer parameters rounded)
        ends = (family.specs[key].at(0.0), family.specs[key].at(1.0))
        assert (spec["at_severity_0"], spec["at_severity_1"]) == pytest.approx(ends), key
        assert (spec["min"], spec["max"]) == pytest.approx(sorted(ends)) and spec["description"], key


@pytest.mark.parametrize("name", FAMILIES)
def test_sampled_params_in_documented_ranges(name: str) -> None:
    family = get(name)
    for severity in (0.0, 0.5, 1.0):
        for seed in range(10):
            params = family.sample(severity, gen(seed))
            json.dumps(params)
            assert set(family.specs) <= set(params)
            for key, spec in family.specs.items():
                lo, hi = sorted((spec.low, spec.high))
                assert lo - 1e-9 <= params[key] <= hi + 1e-9, (key, params[key])
                if spec.integer:
                    assert float(params[key]).is_integer()


@pytest.mark.parametrize("name", FAMILIES)
def test_severity_monotone(name: str, colour: torch.Tensor) -> None:
    family = get(name)

    def mean_psnr(severity: float) -> float:
        return sum(psnr(family(colour, family.sample(severity, gen(s))), colour) for s in range(4)) / 4

    assert mean_psnr(0.9) < mean_psnr(0.1)


def test_masks_and_impulses_hit_all_channels(colour: torch.Tensor) -> None:
    x = colour.clamp(0.02, 0.98)  # no pixel is exactly 0 or 1 before corruption
    y = get("inpainting")(x, get("inpainting").sample(0.5, gen(0)))
    missing = y == 0
    assert missing.any() and torch.equal(missing.all(dim=1), missing.any(dim=1))
    y = get("salt_pepper")(x, {"amount": 0.1, "salt_ratio": 0.5, "seed": 0})
    hit = (y == 0) | (y == 1)
    assert torch.equal(hit.all(dim=1), hit.any(dim=1))
    assert abs(hit.all(dim=1).float().mean().item() - 0.1) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_matches_cpu(name: str, colour: torch.Tensor, grey: torch.Tensor) -> None:
    family = get(name)
    for x in (torch.cat([colour, colour.flip(-1)]), grey):
        params = family.sample(0.7, gen(5))
        cpu = family(x, params)
        cuda = family(x.cuda(), params)
        assert cuda.device.type == "cuda" and cuda.dtype == cpu.dtype
        tolerance = 1 / 255 + 1e-4 if name == "jpeg" else 1e-4
        assert (cuda.cpu() - cpu).abs().max().item() <= tolerance
