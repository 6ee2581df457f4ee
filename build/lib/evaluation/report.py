"""Everything an evaluation writes under ``--out``:

- ``results.csv``: tidy, one row per (dataset, image, condition, method, shots, steps); see ``COLUMNS``;
- ``summary.csv``: means over images per (dataset, family, severity, method, model, shots, steps);
- ``summary.md``: the methods table (PSNR / SSIM per family and level) and the adaptation tables
  (PSNR over shots x steps), Markdown for docs and pull requests;
- ``plots/adaptation.png`` (PSNR against adaptation steps, one panel per dataset and family, one line
  per model and shots), ``plots/methods.png`` (identity, best classical method and networks per family);
- ``examples/DATASET__FAMILY.png``: image grids, one row per level, one column per method;
- ``report.html``: all of the above in one self-contained page (PNGs embedded).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from evaluation.methods import adapted_label  # noqa: E402
from metarestore.viz import save_grid  # noqa: E402

COLUMNS = ["dataset", "image", "family", "family_role", "severity", "params", "method", "model", "shots", "steps",
           "psnr", "ssim", "lpips", "crop", "height", "width", "protocol", "seconds"]
GROUP = ["dataset", "family", "severity", "method", "model", "shots", "steps"]
NETWORK_STYLES = ["-", "--", ":", "-."]


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame[[c for c in COLUMNS if c in frame.columns]]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Means over images, keeping the order in which datasets, families, levels and methods appear."""
    summary = (results.groupby(GROUP, sort=False, dropna=False)
               .agg(psnr=("psnr", "mean"), ssim=("ssim", "mean"), lpips=("lpips", "mean"),
                    images=("image", "nunique"), seconds=("seconds", "mean"))
               .reset_index())
    return summary


def _order(values) -> list:
    return list(dict.fromkeys(values))


def network_labels(results: pd.DataFrame) -> list[str]:
    return _order(results.loc[results["model"] != "", "method"])


def headline(results: pd.DataFrame) -> tuple[int, int]:
    """The largest (shots, steps) of the run: the adapted column of the methods table."""
    adapted = results[results["shots"] > 0]
    if adapted.empty:
        return 0, 0
    return int(adapted["shots"].max()), int(adapted["steps"].max())


def methods_table(summary: pd.DataFrame, metric: str = "psnr", with_ssim: bool = True) -> pd.DataFrame:
    """One row per (dataset, family, level); identity, baselines, networks zero-shot and at the headline
    (shots, steps)."""
    k, s = headline(summary)
    pick = summary[((summary["shots"] == 0) & (summary["steps"] == 0)) | ((summary["shots"] == k) &
                                                                          (summary["steps"] == s))].copy()
    pick["column"] = [adapted_label(m, int(a), int(b)) for m, a, b in zip(pick["method"], pick["shots"],
                                                                         pick["steps"], strict=True)]
    if with_ssim:
        pick["cell"] = [_cell(p, q) for p, q in zip(pick[metric], pick["ssim"], strict=True)]
    else:
        pick["cell"] = [f"{p:.2f}" for p in pick[metric]]
    table = pick.pivot_table(index=["dataset", "family", "severity"], columns="column", values="cell",
                             aggfunc="first", sort=False)
    classical = _order(pick.loc[pick["model"] == "", "column"])  # identity first, then the baselines
    networks = _order(pick.loc[pick["model"] != "", "column"])
    return table[classical + networks].fillna("").reset_index()


def _cell(p: float, q: float) -> str:
    return f"{p:.2f} / {q:.3f}" if math.isfinite(p) else f"inf / {q:.3f}"


def adaptation_tables(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per (dataset, family, network): mean PSNR over images and levels, rows shots, columns steps."""
    out = []
    nets = summary[summary["model"] != ""]
    if nets[nets["shots"] > 0].empty:
        return out
    for (dataset, family, method), group in nets.groupby(["dataset", "family", "method"], sort=False):
        table = group.pivot_table(index="shots", columns="steps", values="psnr", aggfunc="mean")
        table = table.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        table.index = [("zero-shot" if k == 0 else f"{k} shot{'s' if k > 1 else ''}") for k in table.index]
        table.columns = [f"{c} steps" for c in table.columns]
        out.append((f"{dataset} / {family} / {method}", table.reset_index(names="shots")))
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


# plots ---------------------------------------------------------------------------------------------
def plot_adaptation(summary: pd.DataFrame, path: Path) -> Path | None:
    """PSNR against adaptation steps, one panel per (dataset, family): a line per network and shots,
    the identity (dashed grey) and the best classical method (dotted black) for reference."""
    nets = summary[summary["model"] != ""]
    if nets[nets["shots"] > 0].empty:
        return None
    panels = _order(zip(nets["dataset"], nets["family"], strict=True))
    labels = _order(nets["method"])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (dataset, family) in zip(axes.flat, panels, strict=False):
        here = summary[(summary["dataset"] == dataset) & (summary["family"] == family)]
        for i, label in enumerate(labels):
            mine = here[here["method"] == label]
            style = NETWORK_STYLES[i % len(NETWORK_STYLES)]
            zero = mine[mine["shots"] == 0]["psnr"].mean()
            for j, (k, group) in enumerate(mine[mine["shots"] > 0].groupby("shots")):
                curve = group.groupby("steps")["psnr"].mean()
                ax.plot(curve.index, curve.values, style, marker="o", color=plt.cm.viridis(j / max(1, len(
                    mine["shots"].unique()) - 1)), label=f"{label}, {k} shot{'s' if k > 1 else ''}")
            if not math.isnan(zero):
                ax.axhline(zero, color="tab:red", linestyle=style, linewidth=1, label=f"{label} zero-shot")
        identity = here[here["method"] == "identity"]["psnr"].mean()
        ax.axhline(identity, color="grey", linestyle="--", linewidth=1, label="identity (input)")
        classical = here[(here["model"] == "") & (here["method"] != "identity")]
        if not classical.empty:
            best = classical.groupby("method")["psnr"].mean()
            ax.axhline(best.max(), color="black", linestyle=":", linewidth=1, label=f"{best.idxmax()} (classical)")
        ax.set_title(f"{dataset} / {family}", fontsize=10)
        ax.set_xlabel("adaptation steps")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_methods(summary: pd.DataFrame, path: Path, max_groups: int = 12) -> Path:
    """Bars per family (per family and level when there are at most ``max_groups`` of them, as in a
    protocol): identity, the best classical method (named on the bar), each network zero-shot and at the
    headline (shots, steps); one panel per dataset."""
    k, s = headline(summary)
    datasets = _order(summary["dataset"])
    by_level = len(_order(zip(summary["family"], summary["severity"], strict=True))) <= max_groups
    keys = ["family", "severity"] if by_level else ["family"]
    width_in = 1.9 * max(len(_order(summary[keys].itertuples(index=False))), 1) + 2
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(6.0, width_in), 3.6 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        here = summary[summary["dataset"] == dataset]
        nets = network_labels(here)
        bars: dict[str, list[float]] = {"identity": [], "classical (best)": []}
        for label in nets:
            bars[label] = []
            if k:
                bars[adapted_label(label, k, s)] = []
        names, ticks = [], []
        for key, group in here.groupby(keys, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            ticks.append("\n".join([str(key[0]), *[_level(str(level)) for level in key[1:]]]))
            bars["identity"].append(group[group["method"] == "identity"]["psnr"].mean())
            classical = group[(group["model"] == "") & (group["method"] != "identity")].groupby("method")["psnr"].mean()
            bars["classical (best)"].append(classical.max() if not classical.empty else math.nan)
            names.append(classical.idxmax() if not classical.empty else "")
            for label in nets:
                net = group[group["method"] == label]
                bars[label].append(net[net["shots"] == 0]["psnr"].mean())
                if k:
                    bars[adapted_label(label, k, s)].append(net[(net["shots"] == k) & (net["steps"] == s)]["psnr"].mean())
        bars = {label: values for label, values in bars.items() if not all(math.isnan(v) for v in values)}
        width = 0.8 / len(bars)
        for i, (label, values) in enumerate(bars.items()):
            xs = [x + (i - (len(bars) - 1) / 2) * width for x in range(len(ticks))]
            ax.bar(xs, values, width, label=label)
            if label == "classical (best)":
                for x, v, name in zip(xs, values, names, strict=True):
                    if name and not math.isnan(v):
                        ax.text(x, v, name, rotation=90, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.margins(y=0.15)
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(dataset, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_examples(examples: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One grid per (dataset, family): a row per level of the first evaluated image(s)."""
    grids: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for example in examples:
        grids.setdefault((example["dataset"], example["family"]), []).append(example)
    paths = []
    for (dataset, family), items in grids.items():
        columns = items[0]["columns"]
        several = len({e["image"] for e in items}) > 1
        rows = [(f"{e['image']}\n{_level(e['level'])}" if several else _level(e["level"]),
                 [im.float() / 255.0 for im in e["images"]]) for e in items if e["columns"] == columns]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}__{family}")
        paths.append(save_grid(rows, columns, folder / f"{safe}.png", title=f"{dataset} / {family}"))
    return paths


def _level(level: str) -> str:
    try:
        return f"severity {float(level):g}"
    except ValueError:
        return level


# html ----------------------------------------------------------------------------------------------
def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_html(path: Path, context: dict[str, Any], summary: pd.DataFrame, plots: list[Path],
               examples: list[Path]) -> Path:
    info = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in context["info"].items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in context["notes"])
    adaptation = "".join(f"<h3>{html.escape(title)}</h3>{table.to_html(index=False, border=0)}"
                         for title, table in adaptation_tables(summary))
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(context['title'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; margin: 0.5em 0; }}
</style></head><body>
<h1>{html.escape(context['title'])}</h1>
<table>{info}</table>
<h2>Notes</h2><ul>{notes}</ul>
<h2>Plots</h2>{''.join(_img(p) for p in plots)}
<h2>Methods per family (PSNR dB / SSIM, mean over images)</h2>
{methods_table(summary).to_html(index=False, border=0)}
<h2>Adaptation (PSNR dB over shots and steps)</h2>{adaptation or '<p>No adaptation settings (shots 0 only).</p>'}
<h2>Examples</h2>{''.join(_img(p) for p in examples)}
<p>Per-image numbers: <a href="results.csv">results.csv</a>; means: <a href="summary.csv">summary.csv</a>.</p>
</body></html>"""
    path.write_text(body)
    return path


def write_markdown(path: Path, context: dict[str, Any], summary: pd.DataFrame) -> Path:
    parts = [f"# {context['title']}", ""]
    parts += [f"- {k}: {v}" for k, v in context["info"].items()]
    parts += ["", "Notes:", *[f"- {n}" for n in context["notes"]], "",
              "## Methods per family (PSNR dB / SSIM, mean over images)", "", markdown_table(methods_table(summary))]
    tables = adaptation_tables(summary)
    if tables:
        parts += ["", "## Adaptation (PSNR dB over shots and steps)"]
        for title, table in tables:
            parts += ["", f"### {title}", "", markdown_table(table)]
    path.write_text("\n".join(parts) + "\n")
    return path


def write_all(results: pd.DataFrame, examples: list[dict[str, Any]], out: Path,
              context: dict[str, Any]) -> dict[str, Path]:
    """Write every output; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.csv", "summary_csv": out / "summary.csv"}
    results.to_csv(files["results"], index=False)
    summary = summarize(results)
    summary.to_csv(files["summary_csv"], index=False)
    plots = [p for p in (plot_adaptation(summary, out / "plots" / "adaptation.png"),
                         plot_methods(summary, out / "plots" / "methods.png")) if p is not None]
    grids = save_examples(examples, out / "examples")
    files["summary_md"] = write_markdown(out / "summary.md", context, summary)
    files["report"] = write_html(out / "report.html", context, summary, plots, grids)
    files["plots"] = out / "plots"
    if grids:
        files["examples"] = out / "examples"
    return files
