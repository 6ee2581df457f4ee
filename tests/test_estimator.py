"""The degradation estimator and blind restoration built on it (issue 39): a JPEG file's quality from its
tables, the noise level, the plan that leaves alone what needs no restoring, the shipped estimator on real
photos, and restoration that returns a clean photo untouched."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from metarestore import degradations
from metarestore.data.images import to_chw_uint8
from metarestore.estimator import LABELS, Estimate, Step, jpeg_quality, load_estimator, noise_sigma, plan
from metarestore.estimator.estimate import crop_origins
from metarestore.estimator.evidence import tone_span
from metarestore.estimator.plan import jpeg_strength
from metarestore.inference import restore_estimated, restore_image


def photo(name: str = "coffee", size: int = 192) -> torch.Tensor:
    """A real photo (scikit-image's, never in the estimator's training), cropped: float (1, 3, H, W)."""
    x = to_chw_uint8(getattr(skimage.data, name)())[:, 40:40 + size, 60:60 + size]
    return x[None].float() / 255


def encode(x: torch.Tensor, fmt: str, **kwargs) -> tuple[torch.Tensor, bytes]:
    buf = io.BytesIO()
    Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, fmt, **kwargs)
    data = buf.getvalue()
    back = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy())
    return back.permute(2, 0, 1)[None].float() / 255, data


@pytest.mark.parametrize("quality", [5, 10, 30, 60, 75, 90, 95])
def test_a_jpeg_files_quality_is_read_from_its_tables(quality):
    _, data = encode(photo(), "JPEG", quality=quality)
    assert jpeg_quality(data) == quality


def test_anything_but_a_jpeg_file_has_no_jpeg_quality():
    _, png = encode(photo(), "PNG")
    assert jpeg_quality(png) is None
    assert jpeg_quality(b"not an image") is None and jpeg_quality(None) is None and jpeg_quality(b"") is None


def test_noise_level_is_measured_in_8_bit_levels():
    x = photo("astronaut")
    gen = torch.Generator().manual_seed(0)
    for sigma in (5.0, 15.0, 30.0):
        noisy = (x + sigma / 255 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        assert abs(noise_sigma(noisy) - sigma) < 0.2 * sigma + 1.5, sigma
    assert noise_sigma(x) < 3.0


def estimate(probs: dict[str, float], **kwargs) -> Estimate:
    p = dict.fromkeys(LABELS, 0.01) | probs
    return Estimate(p, dict.fromkeys(LABELS, 0.5), **kwargs)


def families(steps) -> list[str]:
    return [s.family for s in steps]


def test_the_plan_undoes_what_was_found_last_applied_first_and_nothing_else():
    told = [f for f in LABELS if f not in ("haze", "color_cast", "motion_blur")]
    assert plan(estimate({}), told) == []  # clean: leave it
    assert plan(estimate({"gaussian_noise": 0.45}), told) == []  # unsure: leave it
    steps = plan(estimate({"gaussian_noise": 0.9, "jpeg": 1.0}, jpeg_quality=40), told)
    assert steps == [Step("jpeg"), Step("gaussian_noise")] and [str(s) for s in steps] == ["jpeg", "gaussian_noise"]
    # two explanations of the same thing: the likelier only, never both on top of each other; their
    # probabilities count together (0.4 and 0.3 of softness: found, as the likelier)
    assert families(plan(estimate({"gaussian_noise": 0.7, "poisson_noise": 0.9}), told)) == ["poisson_noise"]
    assert families(plan(estimate({"gaussian_blur": 0.8, "downsample": 0.6, "jpeg": 0.9}), told)) == \
        ["jpeg", "gaussian_blur"]
    assert families(plan(estimate({"gaussian_blur": 0.3, "downsample": 0.4}), told)) == ["downsample"]
    # something the model cannot be told: a guess is what does harm, so nothing at all
    assert plan(estimate({"haze": 0.9}), told) == []
    assert plan(estimate({"color_cast": 0.8, "jpeg": 1.0}), told) == []
    # a third step needs a surer finding than the first two
    chain = {"jpeg": 1.0, "gaussian_noise": 0.9, "gaussian_blur": 0.55}
    assert families(plan(estimate(chain), told)) == ["jpeg", "gaussian_noise"]
    assert families(plan(estimate(chain | {"gaussian_blur": 0.7}), told)) == ["jpeg", "gaussian_noise", "gaussian_blur"]
    # a correction of every tone needs a sure estimate
    # unsure of low light, unless the highlights are dark (an under-exposed photo's stay at its exposure)
    assert plan(estimate({"low_light": 0.7}, highlights=0.9), told) == []
    assert families(plan(estimate({"low_light": 0.7}, highlights=0.6), told)) == ["low_light"]
    assert plan(estimate({"low_light": 0.45}, highlights=0.6), told) == []
    assert plan(estimate({"low_light": 0.7}), told) == [] and families(plan(estimate({"low_light": 0.9}), told)) == \
        ["low_light"]


def test_a_chain_the_model_was_taught_is_undone_in_one_told_pass():
    """A model with a row per realistic chain (configs/base-chains.yaml) is told the whole chain once, the
    longest that matches; steps it has no (winning) chain for, or a mild JPEG kept in part, go one family at a
    time."""
    told = ["gaussian_noise", "gaussian_blur", "jpeg", "downsample", "low_light", "gaussian_noise+jpeg",
            "downsample+jpeg", "low_light+gaussian_noise+jpeg"]
    found = plan(estimate({"gaussian_noise": 0.9, "jpeg": 1.0}, jpeg_quality=40), told)
    assert found == [Step("gaussian_noise+jpeg")] and str(found[0]) == "gaussian_noise+jpeg"
    three = {"gaussian_noise": 0.9, "jpeg": 1.0, "low_light": 0.9}
    assert plan(estimate(three, jpeg_quality=40), told) == [Step("low_light+gaussian_noise+jpeg")]
    # a chain row that lost to a pass per family in the A/B (plan.JOINED) is not used
    assert families(plan(estimate({"downsample": 0.9, "jpeg": 1.0}, jpeg_quality=40), told)) == ["jpeg", "downsample"]
    assert families(plan(estimate({"gaussian_noise": 0.9, "jpeg": 1.0}, jpeg_quality=92), told)) == \
        ["jpeg", "gaussian_noise"]  # a mild JPEG keeps part of its correction: no chain


def test_mild_jpeg_keeps_less_of_the_told_correction():
    told = ["jpeg", "gaussian_noise"]
    strengths = [plan(estimate({"jpeg": 1.0}, jpeg_quality=q), told) for q in (30, 83, 90, 95, 98)]
    assert [s[0].strength if s else 0.0 for s in strengths] == [1.0, 1.0, 0.5, 0.14, 0.0]
    assert str(strengths[2][0]) == "jpeg:0.50"
    assert jpeg_strength(100) == 0.0 and jpeg_strength(10) == 1.0
    assert estimate({"jpeg": 1.0}, jpeg_quality=30).summary().startswith("jpeg (p=1.00, quality 30)")
    assert estimate({}).clean and estimate({}).summary().startswith("clean (p=0.96")  # 4 tone labels at 0.01


def test_the_tone_span_bounds_a_contrast_reduction():
    """A contrast reduction by ``f`` leaves the tones at most ``f`` of the way from the mean to black or white,
    whatever the photo; real photos reach (nearly) the ends."""
    contrast = degradations.get("contrast")
    for name in ("coffee", "astronaut", "chelsea", "rocket"):
        x = photo(name)
        assert tone_span(x) >= 0.77, name
        for factor in (0.7, 0.5, 0.3):
            flat = contrast(x, {"factor": factor, "seed": 0})
            assert tone_span(flat) <= factor + 1e-4 and tone_span(flat) == pytest.approx(factor * tone_span(x), abs=0.01)
    assert tone_span(torch.full((3, 8, 8), 0.5)) == 0.0


def test_crops_start_on_the_jpeg_block_grid_and_cover_the_image():
    assert crop_origins(80, 96, 3) == [0]
    starts = crop_origins(500, 96, 3)
    assert all(s % 8 == 0 for s in starts) and starts[0] == 0 and 500 - 96 - 8 < starts[-1] <= 500 - 96


@pytest.fixture(scope="module")
def estimator():
    return load_estimator()


def test_the_shipped_estimator_knows_a_clean_photo_from_a_degraded_one(estimator):
    """Real photos it never trained on: clean ones are clean; JPEG files are JPEG at their quality (the file
    says so); strong noise and blur are found from the pixels alone."""
    for name in ("coffee", "astronaut", "chelsea"):
        found = estimator(photo(name))
        assert found.clean, (name, found.summary())
    assert estimator(photo()).noise_sigma is None and estimator(photo(), noise=True).noise_sigma < 3.0
    tiny = estimator(torch.rand(1, 3, 4, 4), noise=True)  # too small to judge: left as it is, no NaN
    assert tiny.clean and tiny.noise_sigma is None and "nan" not in tiny.summary()
    x = photo("astronaut")
    jpeg, data = encode(x, "JPEG", quality=20)
    found = estimator(jpeg, data)
    assert found.present[0] == "jpeg" and found.jpeg_quality == 20
    gen = torch.Generator().manual_seed(1)
    noisy = (x + 25 / 255 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    assert set(estimator(noisy).present) & {"gaussian_noise", "poisson_noise"}
    blur = degradations.get("gaussian_blur")
    blurred = blur(x, blur.sample(0.75, torch.Generator().manual_seed(0)))
    assert set(estimator(blurred).present) & {"gaussian_blur", "downsample"}


def test_flattened_tones_are_found_as_contrast_and_full_ones_never_are(estimator):
    """The tones are the evidence for ``contrast``: a photo flattened to half its contrast is found as
    contrast (severity about 0.6) whatever the windows look like; a clean photo never is."""
    contrast = degradations.get("contrast")
    for name in ("coffee", "astronaut", "chelsea"):
        x = photo(name)
        assert estimator(x).probabilities["contrast"] == 0.0 and estimator(x).tone_span >= 0.77
        found = estimator(contrast(x, {"factor": 0.5, "seed": 0}))
        assert found.present == ["contrast"] and found.severities["contrast"] == pytest.approx(0.625, abs=0.05)
        assert plan(found, ["contrast"]) == [Step("contrast")]


def test_an_enlarged_photo_has_periodic_detail_and_a_blurred_one_is_found_as_blur(estimator):
    """Resampling leaves the detail periodic, a blur does not (``resampling_peak``); so a blurred photo saved
    in 8 bits, which the windows alone read as lost resolution, is found as blur, and a downsampled one as
    downsampling."""
    from metarestore.estimator.evidence import resampling_peak

    blur, down = degradations.get("gaussian_blur"), degradations.get("downsample")
    for name in ("coffee", "astronaut", "chelsea"):
        x = photo(name)
        blurred = to_8_bits(blur(x, {"sigma_x": 2.0, "sigma_y": 2.0, "angle": 0.0, "seed": 0}))
        enlarged = to_8_bits(down(x, {"scale": 2.5, "seed": 0}))
        assert resampling_peak(x) < 3.0 and resampling_peak(blurred) < 3.0 < resampling_peak(enlarged), name
        assert estimator(blurred).present == ["gaussian_blur"] and estimator(enlarged).present == ["downsample"]


def to_8_bits(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def test_an_under_exposed_photo_has_dark_highlights():
    """``highlights``: a photo's brightest pixels reach near white, an under-exposed one's stay at its
    exposure; a 24 MP image is measured too (a histogram, not torch.quantile's 2^24-value limit)."""
    from metarestore.estimator.evidence import highlights

    low_light = degradations.get("low_light")
    for name in ("coffee", "astronaut", "chelsea"):
        x = photo(name)
        dark = to_8_bits(low_light(x, low_light.sample(0.5, torch.Generator().manual_seed(0))))
        assert highlights(x) > 0.75 and highlights(dark) <= 0.7, name
    assert highlights(torch.full((1, 3, 4000, 6000), 0.5)) == pytest.approx(0.5, abs=1 / 512)


def test_blind_restoration_returns_a_clean_photo_untouched_and_undoes_a_jpeg(estimator, told_checkpoint):
    from metarestore.hub import load_learner

    learner, _ = load_learner(told_checkpoint)
    x = photo("coffee", 128)
    y, steps = restore_estimated(learner, x, estimator(x))
    assert steps == [] and y is x  # not a pass of the model: the very image
    jpeg, data = encode(x, "JPEG", quality=15)
    y, steps = restore_estimated(learner, jpeg, estimator(jpeg, data))
    assert steps[0] == Step("jpeg")
    expected = jpeg
    for step in steps:
        expected = restore_image(learner, expected, family=step.family)
    torch.testing.assert_close(y, expected)
    assert not torch.equal(y, jpeg)


def test_the_estimator_trains_and_resumes_where_it_stopped(tmp_path):
    from metarestore.checkpoint import read_metadata
    from metarestore.estimator.train import train_estimator

    out = tmp_path / "est"
    log = io.StringIO()
    train_estimator("embedded", out, steps=2, batch_size=4, crop=48, checkpoint_every=1, log_every=1, stream=log)
    assert read_metadata(out)["step"] == 2
    first = load_estimator(out).net.state_dict()
    train_estimator("embedded", out, steps=4, batch_size=4, crop=48, checkpoint_every=1, log_every=1, stream=log,
                    resume=True)
    assert read_metadata(out)["step"] == 4
    assert "step 3/4" in log.getvalue() and "step 1/4" not in log.getvalue()  # resumed, not restarted
    assert any(not torch.equal(v, load_estimator(out).net.state_dict()[k]) for k, v in first.items())


def test_the_confusion_report_counts_every_image_once_per_row(estimator, tmp_path):
    from evaluation.estimator_report import plot, run
    from metarestore.data.images import load_images

    images = load_images("embedded", "val").images[:2]
    report = run(estimator, images, crop=96)
    assert list(report.matrices) == [0.25, 0.5, 0.75] and report.rows[0] == "clean"
    for m in report.matrices.values():
        assert m.shape == (len(LABELS) + 1,) * 2 and (m.sum(1) == len(images)).all()
    assert (report.matrices[0.25][0] == report.matrices[0.75][0]).all()  # the clean photos, judged once
    assert all(total == len(images) for _, total in report.chains.values())
    assert sum(n for _, _, n in report.calibration) == len(LABELS) * len(images) * (1 + 3 * len(LABELS) + 4)
    assert 0.0 <= report.expected_calibration_error() <= 1.0
    plot(report, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 10_000


def test_an_estimator_with_the_spectrum_feature_trains_and_resumes_as_itself(tmp_path):
    """``spectral_bins``: the radial power spectrum beside the pooled features; a resumed run keeps its own
    network whatever the call says, and the loaded estimator judges an image."""
    from metarestore.checkpoint import read_metadata
    from metarestore.estimator.network import radial_spectrum
    from metarestore.estimator.train import train_estimator

    x = photo("astronaut", 96)
    blurred = degradations.get("gaussian_blur")(x, {"sigma_x": 2.0, "sigma_y": 2.0, "angle": 0.0, "seed": 0})
    sharp, soft = radial_spectrum(x, 8)[0], radial_spectrum(blurred, 8)[0]
    assert torch.isfinite(sharp).all() and (soft[-3:] < sharp[-3:] - 0.1).all()  # blur empties the high rings
    out, log = tmp_path / "spectral", io.StringIO()
    train_estimator("embedded", out, steps=2, batch_size=4, crop=48, checkpoint_every=1, spectral_bins=8, stream=log)
    train_estimator("embedded", out, steps=3, batch_size=4, crop=48, checkpoint_every=1, resume=True, stream=log)
    assert read_metadata(out)["spectral_bins"] == 8 and read_metadata(out)["step"] == 3
    estimator = load_estimator(out)
    assert estimator.net.spectral_bins == 8 and set(estimator(photo()).probabilities) == set(LABELS)
