"""``evaluate()``: check the request, run every (image, condition) as a Ray task, write and log the results.

- Every bad input is found before Ray starts and raised as a one-line ``UserError``: unknown protocol,
  family or baseline, missing or empty folder, data a protocol does not evaluate, a model that is not
  found, an unreachable tracking store.
- Ray: joins ``address`` or starts a local Ray in this process (and stops it at the end); a Ray that is
  already initialised (tests, notebooks) is used as it is. One task per (dataset, image, condition)
  with ``cpus_per_task`` CPUs and ``gpus_per_task`` GPUs. Datasets and model weights go to the object
  store once; each worker process decodes them and builds each network once and keeps them for every
  later task, so loading never dominates. A tqdm bar counts finished tasks with an ETA.
- MLflow: one run in ``experiment`` (default ``metarestore-eval``) naming the model URI, registered
  name and version, with the request as params, mean PSNR/SSIM per dataset, family, level, method and
  shots as metrics (adaptation steps as the metric step, so MLflow draws the curves), and every output
  file as an artifact.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from evaluation import baselines as classical
from evaluation import protocols, report
from evaluation.conditions import Dataset, grid_conditions, load_dataset
from evaluation.methods import ModelSpec, Settings, Unit, run_unit
from evaluation.metrics import lpips_status
from metarestore import degradations
from metarestore.data import EMBEDDED, DataError
from metarestore.errors import UserError
from metarestore.hub import model_families

DEFAULT_CROP = 256
ADAPTER_ALIASES = {"film": "own"}  # the old name of own: the learner's own kind, which may be LoRA


@dataclass
class Request:
    """Everything ``metarestore evaluate`` takes (see its --help)."""

    model: str
    data: list[str] = field(default_factory=list)  # folders or "embedded"; empty: embedded (no protocol)
    families: list[str] | None = None  # None: the model's trained and held-out families
    severities: list[float] = field(default_factory=lambda: [0.5])
    shots: list[int] = field(default_factory=lambda: [0, 5])
    steps: list[int] = field(default_factory=lambda: [0, 1, 5])
    baselines: str = "all"
    protocol: str | None = None
    specialist_from: str | None = None
    compare: str | None = None
    crop: int | None = None  # None: 256 (full images for protocols); 0: full images
    support_size: int = 96
    limit: int | None = None
    seed: int = 0
    out: Path = Path("runs/eval")
    tracking_uri: str | None = None
    experiment: str = "metarestore-eval"
    track: bool = True
    address: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    examples: int = 1
    tile: int = 512
    told: bool = False  # name each condition's family to a model that can be told it
    adapter: str = "own"  # own (alias film): learner.adapt, the learner's own kind; auto: as a server fits
    ensemble: bool = False  # the model's rows restore with the x8 self-ensemble
    progress: bool = True
    command: str = ""


@dataclass
class Evaluation:
    out: Path
    results: pd.DataFrame
    files: dict[str, Path]
    run_id: str | None
    notes: list[str]


@dataclass
class LoadedModel:
    spec: ModelSpec
    uri: str
    name: str | None
    version: str | None
    metadata: dict


def load_network(uri: str, label: str, tracking_uri: str | None, zero_shot: bool = True) -> LoadedModel:
    """Resolve and load a model on the driver (a missing one fails here, before any Ray work)."""
    from metarestore.hub import load_model

    learner, metadata, ref = load_model(uri, tracking_uri)
    display = f"{ref.name}/{ref.version}" if ref.version else str(ref.path)
    key = str(metadata.get("files", {}).get("model.safetensors") or ref.path)
    state = {k: v.detach().cpu() for k, v in learner.weights().items()}
    return LoadedModel(ModelSpec(label, display, key, (metadata, state), zero_shot), uri, ref.name, ref.version,
                       metadata)


def _check_lists(req: Request) -> None:
    for flag, values in (("--shots", req.shots), ("--steps", req.steps)):
        if not values or any(v < 0 for v in values):
            raise UserError(f"{flag} needs one or more integers >= 0, e.g. {flag} 0,1,5")
    if req.severities and any(not 0.0 <= s <= 1.0 for s in req.severities):
        raise UserError("--severities must lie in [0, 1], e.g. --severities 0.3,0.7")
    if req.limit is not None and req.limit < 1:
        raise UserError("--limit must be at least 1")


def load_datasets(specs: list[str], crop: int, limit: int | None) -> list[Dataset]:
    datasets, seen = [], set()
    for spec in specs:
        dataset = load_dataset(spec, crop, limit)
        name, n = dataset.name, 2
        while dataset.name in seen:  # two folders with the same name
            dataset.name = f"{name}-{n}"
            n += 1
        seen.add(dataset.name)
        datasets.append(dataset)
    return datasets


def evaluate(req: Request) -> Evaluation:
    """Run the evaluation described by ``req``; outputs go to ``req.out`` (and MLflow when tracking)."""
    _check_lists(req)
    req.adapter = ADAPTER_ALIASES.get(req.adapter, req.adapter)
    if req.adapter not in ("own", "auto"):
        raise UserError(f"--adapter must be own (alias film) or auto, got {req.adapter!r}")
    if req.ensemble and req.adapter == "auto" and any(k > 0 for k in req.shots):
        raise UserError("--ensemble restores through the model (zero-shot and own-adapter rows), not an --adapter auto "
                        "adapter: drop one of them")
    protocol = protocols.get(req.protocol) if req.protocol else None
    if protocol is not None:
        if req.families:
            raise UserError(f"--families cannot be combined with --protocol (protocol {protocol.name} evaluates "
                            f"{protocol.family})")
        protocol.check_data(req.data)
    if req.families:
        degradations.validate(req.families)
    wanted = classical.parse(req.baselines)
    tracking = None
    if req.track:
        from metarestore.tracking import check_reachable, resolve_uri

        tracking = resolve_uri(req.tracking_uri)
        check_reachable(tracking)
    adapting = any(k > 0 for k in req.shots)
    crop = req.crop if req.crop is not None else (0 if protocol else DEFAULT_CROP)
    datasets = load_datasets(req.data or [EMBEDDED], crop, req.limit)
    for dataset in datasets:
        if adapting and len(dataset.images) < 2:
            raise DataError(f"{dataset.name}: adaptation (--shots > 0) needs at least 2 images; support pairs "
                            "come from the dataset's other images")
    networks, notes = load_networks(req)
    if req.baselines.strip() == "all":
        notes += [f"{reason}; skipped" for name in classical.names() if (reason := classical.missing(name))]
    main = networks[0]
    trained, held_out = model_families(main.metadata)
    conditions = protocol.conditions() if protocol else grid_conditions(req.families or trained + held_out,
                                                                         req.severities)
    families = list(dict.fromkeys(c.family for c in conditions))
    if "downsample" in families:
        notes.append("downsample: the degraded input is the bicubic up-sampled image, so identity = bicubic")
    if adapting:
        notes.append(f"adaptation: K support patches ({req.support_size} px) from the dataset's other images, "
                     "degraded with the query's task parameters and fresh noise; "
                     + ("steps 0 equals zero-shot" if req.adapter == "own" else
                        "adapter auto: the adapter a server with default settings fits for path=auto "
                        "(fit_as_served: the path chosen by leave-one-out on the K pairs; steps 0: only paths "
                        "without gradient steps)"))
    if protocol is not None:
        notes.append(f"protocol {protocol.name}: {protocol.description}"
                     + (f"; published: {protocol.reference}" if protocol.reference else ""))
    if crop:
        notes.append(f"images centre-cropped to {crop} px" + (": not comparable with published tables" if protocol
                                                               else " (--crop 0 for full images)"))

    settings = Settings(shots=sorted(set(req.shots)), steps=sorted(set(req.steps)), baselines=wanted,
                        support_size=req.support_size, seed=req.seed, protocol=protocol.name if protocol else "",
                        lpips=lpips_status()[0], tile=req.tile, threads=max(1, int(req.cpus_per_task)),
                        use_gpu=req.gpus_per_task > 0, told=req.told, adapter=req.adapter,
                        ensemble=req.ensemble)
    units = [Unit(d.name, i, c, example=n < req.examples) for d in datasets for c in conditions
             for n, i in enumerate(d.queries)]
    results = run_units(units, datasets, [n.spec for n in networks], settings, req)

    rows = [row for r in results for row in r["rows"]]
    role = {f: "trained" for f in trained} | {f: "held_out" for f in held_out}
    for row in rows:
        row["family_role"] = role.get(row["family"], "unseen")
    frame = report.results_frame(rows)
    examples = [r["example"] for r in results if r["example"] is not None]
    context = {"title": f"Evaluation of {main.spec.display}" + (f" ({protocol.name})" if protocol else ""),
               "info": {"model": f"{main.uri} -> {main.spec.display}",
                        "algorithm": main.metadata.get("algorithm"), "trained families": ", ".join(trained),
                        "held-out families": ", ".join(held_out),
                        "datasets": ", ".join(f"{d.name} ({len(d.queries)} of {len(d.images)} images)"
                                              for d in datasets),
                        "protocol": protocol.name if protocol else "-", "families": ", ".join(families),
                        "levels": ", ".join(dict.fromkeys(c.level for c in conditions)),
                        "shots": ", ".join(map(str, settings.shots)), "steps": ", ".join(map(str, settings.steps)),
                        "crop": crop or "full images", "seed": req.seed,
                        **{n.spec.label: f"{n.uri} -> {n.spec.display}" for n in networks[1:]},
                        "command": req.command or "-"},
               "notes": notes}
    files = report.write_all(frame, examples, Path(req.out), context)
    run_id = log_run(tracking, req, networks, datasets, conditions, settings, frame, files) if tracking else None
    return Evaluation(Path(req.out), frame, files, run_id, notes)


def load_networks(req: Request) -> tuple[list[LoadedModel], list[str]]:
    """The model under test, then the specialist and the second model when asked for; and the notes."""
    networks = [load_network(req.model, "model", req.tracking_uri)]
    notes = [lpips_status()[1]]
    if req.specialist_from:
        specialist = load_network(req.specialist_from, "specialist", req.tracking_uri, zero_shot=False)
        networks.append(specialist)
        if specialist.metadata.get("algorithm") != "multitask":
            notes.append(f"the specialist comes from a {specialist.metadata.get('algorithm')} model, not a "
                         "multitask one")
        if not any(k > 0 for k in req.shots):
            notes.append("specialist rows need --shots > 0 (it is the multitask model fine-tuned)")
    else:
        notes.append("specialist skipped: give --specialist-from URI (a model trained with algorithm: multitask)")
    if req.compare:
        other = load_network(req.compare, "compare", req.tracking_uri)
        label = other.name or other.metadata.get("name") or "compare"
        label = f"{label}-v{other.version}" if other.version else label
        if label in {"model", "specialist", "identity", *classical.names()}:
            label += "-compare"
        other.spec.label = label
        networks.append(other)
    return networks, notes


# Ray -----------------------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}  # per worker process: datasets and networks, built once


def _fetch(value: Any, key: str) -> Any:
    import ray

    if key not in _CACHE:
        if len(_CACHE) > 32:  # a long-lived worker serving many evaluations
            _CACHE.clear()
        _CACHE[key] = ray.get(value) if isinstance(value, ray.ObjectRef) else value
    return _CACHE[key]


def _network(spec: ModelSpec, device: torch.device):
    key = f"net:{spec.key}:{device}"
    if key not in _CACHE:
        from metarestore.hub import learner_from_metadata

        metadata, state = _fetch(spec.payload, f"weights:{spec.key}")
        learner = learner_from_metadata(metadata, device)
        learner.load_weights(state)
        _CACHE[key] = learner.eval()
    return _CACHE[key]


def evaluate_task(unit: Unit, dataset_box: list, specs: list[ModelSpec], settings: Settings) -> dict[str, Any]:
    """One Ray task: every method on one (dataset, image, condition)."""
    torch.set_num_threads(settings.threads)
    device = torch.device("cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu")
    dataset = _fetch(dataset_box[0], f"dataset:{dataset_box[0].hex()}")
    return run_unit(unit, dataset, [(spec, _network(spec, device)) for spec in specs], settings, device)


def run_units(units: list[Unit], datasets: list[Dataset], specs: list[ModelSpec], settings: Settings,
              req: Request) -> list[dict[str, Any]]:
    """Run every unit as a Ray task; results in unit order."""
    import ray
    from tqdm import tqdm

    from cluster.ray_runtime import init_ray

    started = init_ray(req.address)
    try:
        boxes = {d.name: [ray.put(d)] for d in datasets}
        shipped = [ModelSpec(s.label, s.display, s.key, ray.put(s.payload), s.zero_shot) for s in specs]
        task = ray.remote(evaluate_task).options(num_cpus=req.cpus_per_task, num_gpus=req.gpus_per_task,
                                                 max_retries=1)
        pending = {task.remote(u, boxes[u.dataset], shipped, settings): i for i, u in enumerate(units)}
        results: dict[int, dict[str, Any]] = {}
        t0 = time.perf_counter()
        with tqdm(total=len(units), desc="evaluate", unit="task", disable=not req.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        results[pending.pop(ref)] = ray.get(ref)
                        bar.update(1)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        if not req.progress:
            print(f"evaluated {len(units)} tasks in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return [results[i] for i in range(len(units))]
    finally:
        if started:
            ray.shutdown()


# MLflow --------------------------------------------------------------------------------------------
def _key(*parts: object) -> str:
    text = "/".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "/_-. :" else "_" for c in text)


def log_run(tracking: str, req: Request, networks: list[LoadedModel], datasets: list[Dataset], conditions: list,
            settings: Settings, frame: pd.DataFrame, files: dict[str, Path]) -> str:
    """One MLflow evaluation run naming the model version; returns its id."""
    from metarestore.tracking import RunLogger

    main = networks[0]
    version = main.version or ""
    tags = {"metarestore.kind": "evaluation", "metarestore.model_uri": main.uri,
            "metarestore.model_name": main.name or "", "metarestore.model_version": version}
    logger = RunLogger(tracking, req.experiment, f"eval {main.spec.display}" + (f" {req.protocol}" if req.protocol
                                                                                 else ""), tags=tags)
    params = {"model_uri": main.uri, "model_name": main.name or main.metadata.get("name", ""),
              "model_version": version, "model_algorithm": main.metadata.get("algorithm"),
              "model_step": main.metadata.get("step"), "datasets": ",".join(d.name for d in datasets),
              "data": ",".join(d.source for d in datasets), "images": sum(len(d.queries) for d in datasets),
              "families": ",".join(dict.fromkeys(c.family for c in conditions)),
              "severities": ",".join(dict.fromkeys(c.level for c in conditions)),
              "shots": ",".join(map(str, settings.shots)), "steps": ",".join(map(str, settings.steps)),
              "baselines": req.baselines, "protocol": req.protocol or "", "crop": datasets[0].crop,
              "limit": req.limit or "", "seed": req.seed, "support_size": req.support_size}
    for net in networks[1:]:
        params[f"{net.spec.label}_uri"] = net.uri
        params[f"{net.spec.label}_model"] = net.spec.display
    logger.params(params)
    summary = report.summarize(frame)
    for steps, group in summary.groupby("steps"):
        metrics = {}
        for row in group.itertuples(index=False):
            for metric in ("psnr", "ssim"):
                value = getattr(row, metric)
                if pd.notna(value) and value != float("inf"):
                    metrics[_key(metric, row.dataset, row.family, row.severity, row.method,
                                 f"shots{row.shots}")] = value
        logger.metrics(metrics, step=int(steps))
    overall = frame[(frame["shots"] == 0) & (frame["steps"] == 0)].groupby("method")["psnr"].mean()
    logger.metrics({_key("psnr_mean", m): v for m, v in overall.items() if pd.notna(v) and v != float("inf")},
                   step=0)
    for kind, path in files.items():
        if kind in ("plots", "examples"):
            logger.artifact(path, kind)
        else:
            logger.artifact(path)
    logger.finish()
    return logger.run_id
