"""What the API answers, as pydantic models: they are the OpenAPI documentation of the JSON responses."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    name: str
    version: str
    source: str
    device: str = Field("cpu", description="Where the replica's forward passes and adaptation run.")
    algorithm: str
    adapt: str
    families: dict[str, list[str]]
    inner_steps: int
    parameters: int
    adaptable_parameters: int
    degradations: list[str] = Field(default_factory=list, description="What /v1/restore's ``degradation`` may "
                                    "name (a model trained to be told the degradation); empty: blind only.")
    limits: dict[str, int | float]


class AdapterInfo(BaseModel):
    adapter_id: str
    kind: str = Field("film", description="The path asked for (the form's ``path``): auto (the path chosen by "
                      "held-out validation) or a path name.")
    path: str = Field("film", description="The adaptation path used, e.g. film, deconv@0.01+film, hqs@0.01, "
                      "tone (metarestore.operators.paths).")
    shots: int
    steps: int = Field(description="Gradient steps asked for the final fit of an adapted path (film, lora, ...; "
                       "paths without gradient adaptation take none).")
    height: int
    width: int
    fit_height: int | None = Field(None, description="The pairs were centre-cropped to this size for the fit "
                                   "(adapt_side and the memory budget bound it).")
    fit_width: int | None = None
    steps_used: int | None = Field(None, description="Gradient steps of the adapter's final fit (0: its path "
                                   "has no adapted restorer).")
    validation_steps: int | None = Field(None, description="Gradient steps each adapted candidate took in "
                                         "validation (0: the chosen path has none).")
    final_fit: str | None = Field(None, description="How the chosen adapted path's state was fitted: 'fold "
                                  "average' (the mean of its validated folds' states, no second fit) or 'all "
                                  "pairs' (fitted again); null: the path has no adapted restorer.")
    skipped: list[str] = Field([], description="Adapted candidates not validated within adapt_budget_s (stopped "
                               "or not started; never chosen).")
    ruled_out: list[str] = Field([], description="Candidates ruled out before scoring (kernel paths where every "
                                 "fold's fitted kernel is the identity; never chosen).")
    validation: str | None = Field(None, description="How the held-out figures were made: leave-one-out, "
                                   "split-halves (one pair), or none.")
    folds: int | None = Field(None, description="Held-out folds scored.")
    psnr_input: float | None = Field(description="PSNR (dB) of the held-out degraded support images "
                                     "(null: nothing could be held out).")
    psnr_zero_shot: float | None = Field(description="PSNR (dB) of the held-out support images restored "
                                         "zero-shot (the model without an adapter).")
    psnr_adapted: float | None = Field(description="PSNR (dB) of the held-out support images restored with the "
                                       "adapter's path, fitted without them.")
    psnr_before: float | None = Field(description="Deprecated alias of psnr_zero_shot (kept for one release).",
                                      json_schema_extra={"deprecated": True})
    psnr_after: float | None = Field(description="Deprecated alias of psnr_adapted (kept for one release).",
                                     json_schema_extra={"deprecated": True})
    scores: dict[str, float | None] = Field({}, description="Mean held-out PSNR (dB) of every candidate path.")
    residuals: dict[str, float | None] = Field({}, description="Relative residuals of the operators fitted "
                                               "(kernel, tone, haze).")
    noise: dict[str, float | bool | None] | None = Field(None, description="The noise level fitted on the pairs.")
    fit_ms: float | None = Field(None, description="Time of the fit itself (ms).")
    elapsed_ms: float
    created_at: str
    expires_at: str
    bytes: int
    model_version: str
    label: str | None = Field(None, description="The label given at creation, if any.")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]



def fit_report(fitted, model_version: str, model_sha256: str) -> dict:
    """What the API says of a fitted adapter (``serving.core.Fitted``), as JSON-safe values: the
    ``AdapterInfo`` fields the fit decides (the store adds id, size and expiry, the route the timing)."""
    fit = fitted.adapter.info
    zero_shot, adapted = _first(fit, "psnr_zero_shot"), _first(fit, "psnr_adapted", "psnr_after")
    info = {"kind": fitted.asked, "path": fitted.adapter.path.name, "shots": fitted.shots, "steps": fitted.steps,
            "steps_used": fit.get("steps", 0), "validation_steps": fit.get("validation_steps"),
            "final_fit": fit.get("final_fit"),
            "skipped": fit.get("skipped", []), "ruled_out": fit.get("ruled_out", []),
            "height": fitted.height, "width": fitted.width, "fit_height": fit["fit_height"],
            "fit_width": fit["fit_width"], "validation": fit.get("validation"), "folds": fit.get("folds"),
            "psnr_input": _first(fit, "psnr_input", "psnr_before"), "psnr_zero_shot": zero_shot,
            "psnr_adapted": adapted, "psnr_before": zero_shot, "psnr_after": adapted,
            "scores": {n: None if v is None else _db(v) for n, v in fit.get("scores", {}).items()},
            "residuals": fit.get("residuals", {}), "noise": fit.get("noise"),
            "fit_ms": round(fitted.fit_s * 1000, 1), "model_version": model_version, "model_sha256": model_sha256}
    return {k: (_db(v) if k.startswith("psnr") and v is not None else _finite(v)) for k, v in info.items()}


def _first(info: dict, *names: str):
    """The fit's figure under its name, or its former one (the core's ``psnr_before`` was the input's PSNR,
    the HTTP answer's the zero-shot one: the answer now names each once)."""
    return next((info[n] for n in names if n in info), None)


def _db(value: float) -> float:
    """PSNR for JSON: identical images give infinity, reported as 100 dB."""
    return round(min(value, 100.0), 3)


def _finite(value):
    """JSON has no NaN or infinity: non-finite numbers (a residual that could not be computed) become null."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value
