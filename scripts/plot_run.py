"""Plot a ring-train run's loss and task accuracy from its CSV log(s) to a PNG.

    python scripts/plot_run.py outputs/default docs/default_run.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over every CSV version of the run (a resumed run adds versions)."""
    points: dict[int, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    points[int(row["step"])] = float(row[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's output directory (outputs/<name>)")
    parser.add_argument("png", type=Path, help="where to write the plot")
    args = parser.parse_args()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        steps, values = read_series(args.run_dir, key)
        ax_loss.plot(steps, values, label=label, marker="o" if key.startswith("val") else None)
    ax_loss.set(xlabel="step", ylabel="loss on answer tokens", title="loss")
    ax_loss.legend()
    for key, label in (("val/task_acc", "exact match"), ("val/token_acc", "answer tokens")):
        steps, values = read_series(args.run_dir, key)
        ax_acc.plot(steps, values, label=label, marker="o")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="task accuracy (validation)", ylim=(0, 1.02))
    ax_acc.legend()
    fig.suptitle(f"ring-train: {args.run_dir.name}")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
