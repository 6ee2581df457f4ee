"""Standard protocols: fixed degradations and measurement rules, so numbers compare with published tables.

A protocol names its datasets (matched by folder name, case-insensitive: ``--data .../CBSD68``), one
family at fixed levels, and how to measure. Protocols evaluate full images (no crop) unless asked.

- ``cbsd68-awgn`` / ``kodak24-awgn``: additive white Gaussian noise, sigma 15, 25, 50 (of 255), *not*
  clipped (the usual float noisy input: the ``awgn`` family), outputs rounded to 8 bits, PSNR/SSIM on RGB. Reference
  (CBSD68, sigma 25): CBM3D 30.71 dB, DnCNN 31.23, FFDNet 31.21, AirNet 31.26, PromptIR 31.31.
- ``live1-classic5-jpeg``: JPEG quality 10, 20, 30, 40 (torchvision's encoder, colour input; classic5
  is grey, read as three equal channels), 8-bit outputs, PSNR/SSIM on the Y channel as in the ARCNN and
  DnCNN tables (which compress the Y channel alone, so compare trends rather than hundredths).
- ``set5-set14-sr``: x2 and x4 bicubic down-sampling (antialiased, PyTorch) and bicubic up-sampling
  back (the model restores the up-sampled image, so ``identity`` is the bicubic baseline); images
  mod-cropped to the scale, 8-bit outputs, Y channel, ``scale`` border pixels shaved, as in SR papers.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.conditions import Condition, dataset_name
from metarestore.errors import UserError
from metarestore.registry import Registry


class ProtocolError(UserError, ValueError):
    """An unknown protocol, or data that does not fit it."""


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    datasets: tuple[str, ...]  # folder names it evaluates
    family: str
    levels: tuple[tuple[str, dict[str, float]], ...]  # (label, fixed parameters)
    quantize: bool = True
    y_channel: bool = False
    shave_scale: bool = False  # shave `scale` border pixels (SR)
    reference: str = ""

    def conditions(self) -> list[Condition]:
        out = []
        for label, fixed in self.levels:
            scale = int(fixed.get("scale", 1))
            out.append(Condition(self.family, label, fixed=dict(fixed), quantize=self.quantize,
                                 y_channel=self.y_channel, shave=scale if self.shave_scale else 0,
                                 modcrop=scale))
        return out

    def check_data(self, specs: list[str]) -> None:
        """Every --data folder must be one of this protocol's datasets, and at least one is needed."""
        wanted = ", ".join(self.datasets)
        if not specs:
            raise ProtocolError(f"protocol {self.name} needs --data with {wanted} "
                                f"(e.g. --data /work/shared/data/test/{self.datasets[0]})")
        known = {d.lower() for d in self.datasets}
        for spec in specs:
            if dataset_name(spec).lower() not in known:
                raise ProtocolError(f"protocol {self.name} evaluates {wanted}; {spec} is not one of them "
                                    "(the folder name must match)")


def _awgn(dataset: str) -> Protocol:
    return Protocol(f"{dataset.lower()}-awgn", f"{dataset}, additive white Gaussian noise, unclipped",
                    (dataset,), "awgn",
                    tuple((f"sigma={s}", {"sigma": s / 255.0}) for s in (15, 25, 50)),
                    reference="CBSD68 sigma 25: CBM3D 30.71, DnCNN 31.23, FFDNet 31.21, AirNet 31.26, "
                              "PromptIR 31.31 dB" if dataset == "CBSD68" else "")


PROTOCOLS: Registry[Protocol] = Registry("protocol", {p.name: p for p in (
    _awgn("CBSD68"),
    _awgn("Kodak24"),
    Protocol("live1-classic5-jpeg", "JPEG artefact removal, quality 10-40, Y channel", ("LIVE1", "classic5"),
             "jpeg", tuple((f"q={q}", {"quality": float(q)}) for q in (10, 20, 30, 40)), y_channel=True,
             reference="ARCNN / DnCNN-3 tables (Y channel)"),
    Protocol("set5-set14-sr", "x2 and x4 bicubic super-resolution, Y channel, border shaved", ("Set5", "Set14"),
             "downsample", tuple((f"x{s}", {"scale": float(s)}) for s in (2, 4)), y_channel=True,
             shave_scale=True, reference="SRCNN / VDSR tables (Y channel, shave = scale)"),
)}, error=ProtocolError)


def get(name: str) -> Protocol:
    return PROTOCOLS[name]  # unknown: a ProtocolError that lists the known
