"""Plot a training run's validation PSNR (input, zero-shot, adapted) per held-out family from MLflow.

    python benchmarks/plot_validation.py RUN_ID [--tracking-uri sqlite:///mlflow.db] [-o docs/img/run.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("-o", "--output", default="validation.png")
    args = parser.parse_args()
    client = mlflow.tracking.MlflowClient(args.tracking_uri)
    run = client.get_run(args.run_id)
    families = sorted({k.split("/")[2] for k in run.data.metrics if k.startswith("val/psnr_adapted/")})
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(4 * (len(families) + 1), 3.6), squeeze=False)
    for ax, family in zip(axes[0], [*families, None], strict=True):
        suffix = f"/{family}" if family else ""
        for key, style in (("input", ":"), ("zero_shot", "--"), ("adapted", "-")):
            history = sorted(client.get_metric_history(args.run_id, f"val/psnr_{key}{suffix}"), key=lambda m: m.step)
            ax.plot([m.step for m in history], [m.value for m in history], style, marker="o",
                    label=key.replace("_", "-"))
        ax.set_title(family or "mean over held-out families")
        ax.set_xlabel("meta-step")
        ax.set_ylabel("PSNR (dB)")
    axes[0][0].legend()
    fig.suptitle(f"{run.data.tags.get('mlflow.runName', args.run_id)}: validation PSNR on held-out families")
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print(args.output)


if __name__ == "__main__":
    main()
