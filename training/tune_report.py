"""What a search leaves behind: a CSV of trials, a sorted console summary, ``best.yaml`` and plots
(objective per trial, parameter importances), all also logged to the search's parent MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from ray.tune import Callback  # noqa: E402

from metarestore.config import dump  # noqa: E402
from metarestore.tracking import RunLogger  # noqa: E402
from training.search_space import SearchSpec, default_point, trial_config  # noqa: E402


class TrialLines(Callback):
    """The search's console: one line per trial report (its step, the metric, the best so far and how many
    trials have ended) and one when a trial ends, in place of Tune's status tables."""

    def __init__(self, metric: str, mode: str, total: int):
        self.metric, self.mode, self.total = metric, mode, total
        self.best: tuple[float, str] | None = None
        self.ended = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None:
            return
        if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
            self.best = (float(value), trial.trial_id)
        print(f"trial {trial.trial_id} step {_step(result)}: {self.metric} {value:.3f} | best "
              f"{self.best[0]:.3f} ({self.best[1]}) | {self.ended}/{self.total} trials ended", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, f"ended at step {_step(trial.last_result or {})}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed")

    def _ended(self, trial, how: str) -> None:
        self.ended += 1
        print(f"trial {trial.trial_id} {how} | {self.ended}/{self.total} trials ended", flush=True)


def _step(result: dict) -> str:
    """A report's step as a whole number (Tune hands its metrics back as floats)."""
    step = result.get("step")
    return "?" if step is None else str(int(step))


def trial_rows(grid, spec: SearchSpec, steps: int, out: Path, base: dict) -> list[dict[str, Any]]:
    default = default_point(base, spec) if spec.include_default else None
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        history = result.metrics_dataframe
        curve = []
        if history is not None and spec.metric in history and "step" in history:
            curve = history[["step", spec.metric]].dropna().values.tolist()
        run_file = out / "trials" / str(trial_id) / "mlflow_run_id"
        last_step = int(metrics.get("step", 0) or 0)
        rows.append({
            "trial_id": trial_id,
            "status": "ERROR" if result.error else "TERMINATED",
            "stopped_early": bool(not result.error and last_step < steps),
            "objective": metrics.get(spec.metric),
            "last_step": last_step,
            "duration_s": round(float(metrics.get("time_total_s", 0.0) or 0.0), 1),
            "mlflow_run_id": run_file.read_text().strip() if run_file.is_file() else None,
            "is_default": default is not None and all(
                _same((result.config or {}).get(k), v) for k, v in default.items()),
            **{f"config/{k}": v for k, v in (result.config or {}).items()},
            "_curve": curve,
        })
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return a == b


def plot_objective(rows: list[dict], spec: SearchSpec, path: Path) -> Path:
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"complete": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}
    for i, row in enumerate(rows):
        kind = "error" if row["status"] == "ERROR" else "stopped early" if row["stopped_early"] else "complete"
        bars.bar(i, row["objective"] if row["objective"] is not None else 0, color=colours[kind],
                 label=kind if kind not in bars.get_legend_handles_labels()[1] else None)
        if row["_curve"]:
            xs, ys = zip(*row["_curve"], strict=True)
            curves.plot(xs, ys, marker="o", label=row["trial_id"])
    bars.set_xticks(range(len(rows)), [r["trial_id"] for r in rows], rotation=45, ha="right", fontsize=8)
    values = [r["objective"] for r in rows if r["objective"] is not None]
    if values:
        bars.set_ylim(min(values) - 0.5, max(values) + 0.5)
    bars.set_ylabel(spec.metric)
    bars.set_title("objective per trial (last report)")
    bars.legend(fontsize=8)
    curves.set_xlabel("step")
    curves.set_ylabel(spec.metric)
    curves.set_title("validation during training")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def importances(rows: list[dict], spec: SearchSpec) -> dict[str, float]:
    """Parameter importances (Optuna's evaluator) over the trials that reported the objective."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def distribution(kind: str, args: list):
        if kind == "loguniform":
            return FloatDistribution(args[0], args[1], log=True)
        if kind in ("uniform", "quniform"):
            return FloatDistribution(args[0], args[1])
        if kind == "randint":
            return IntDistribution(args[0], args[1] - 1)
        return CategoricalDistribution(args)

    distributions = {k: distribution(*v) for k, v in spec.space.items()}
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    for row in rows:
        if row["objective"] is None:
            continue
        params = {k: row.get(f"config/{k}") for k in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=row["objective"]))
    if len(study.trials) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every trial the same value
        return {}


def plot_importances(values: dict[str, float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(3, len(values)) + 1))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:green")
        ax.set_xlabel("importance (Optuna)")
    else:
        ax.text(0.5, 0.5, "not enough finished trials to rank parameters", ha="center", va="center")
        ax.axis("off")
    ax.set_title("parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(grid, spec: SearchSpec, base: dict, steps: int, out: Path, parent: RunLogger,
                  duration_s: float) -> dict[str, Any]:
    rows = trial_rows(grid, spec, steps, out, base)
    finished = [r for r in rows if r["objective"] is not None and r["status"] != "ERROR"]
    if not finished:
        raise RuntimeError(f"no trial reported {spec.metric}; see {out / 'ray_tune'}")
    sign = -1.0 if spec.mode == "max" else 1.0
    rows.sort(key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0.0)))
    # the best config is one proven over the whole schedule: a trial that ran to the end, when there is one
    complete = [r for r in finished if not r["stopped_early"]]
    best = min(complete or finished, key=lambda r: sign * r["objective"])
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "_curve"} for r in rows])
    csv = out / "trials.csv"
    table.to_csv(csv, index=False)

    best_values = {k[len("config/"):]: v for k, v in best.items() if k.startswith("config/")}
    best_cfg = trial_config(base, {**best_values, "name": f"{base.get('name', 'experiment')}-best"})
    best_yaml = out / "best.yaml"
    best_yaml.write_text(f"# best trial {best['trial_id']}: {spec.metric} = {best['objective']:.4f}\n"
                         + dump(best_cfg))
    objective_png = plot_objective(rows, spec, out / "objective.png")
    importance = importances(rows, spec)
    importance_png = plot_importances(importance, out / "importance.png")

    client = parent.client
    for row in rows:
        if row["mlflow_run_id"]:
            try:
                client.set_tag(row["mlflow_run_id"], "tune.stopped_early", str(row["stopped_early"]).lower())
                # Tune ends a trial's function at its last report, before it can close its own run
                status = "FAILED" if row["status"] == "ERROR" else "KILLED" if row["stopped_early"] else "FINISHED"
                client.set_terminated(row["mlflow_run_id"], status)
            except Exception:  # noqa: BLE001 - a tag is not worth failing the search
                pass
    parent.metrics({f"best/{spec.metric}": best["objective"], "trials": len(rows),
                    "stopped_early": sum(r["stopped_early"] for r in rows)}, step=0)
    for path in (csv, best_yaml, objective_png, importance_png):
        parent.artifact(path)
    parent.flush()
    default = next((r for r in rows if r["is_default"]), None)
    return {"rows": rows, "best": best, "default": default, "csv": str(csv), "best_yaml": str(best_yaml),
            "plots": [str(objective_png), str(importance_png)], "importances": importance,
            "duration_s": duration_s, "parent_run_id": parent.run_id}


def format_summary(summary: dict[str, Any], spec_metric: str) -> str:
    rows = summary["rows"]
    keys = [k for k in rows[0] if k.startswith("config/")]
    lines = [f"{'trial':<14}{'status':<15}{spec_metric:>20}{'step':>6}{'time':>8}  " + "  ".join(k[7:] for k in keys)]
    for r in rows:
        status = "stopped early" if r["stopped_early"] else r["status"].lower()
        objective = f"{r['objective']:.3f}" if r["objective"] is not None else "-"
        values = "  ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        lines.append(f"{r['trial_id']:<14}{status:<15}{objective:>20}{r['last_step']:>6}{r['duration_s']:>7.0f}s  {values}")
    return "\n".join(lines)
