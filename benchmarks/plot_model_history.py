"""The default model's accuracy through predict's whole pipeline against the CPU hours spent
training it (issue 15): every stretch scored by ``bench_model_accuracy.py --contrasts 3`` (maps 19
and 20 held out, 3 resolutions x 3 random contrasts), beside the aim and the ceilings that the
network's 2 mm grid sets (``bench_resolution_ceiling.py``).

    python benchmarks/plot_model_history.py [--csv checkpoints/model_history.csv] [--png checkpoints/accuracy_curve_pipeline.png]
"""

from __future__ import annotations

import argparse
import csv
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTIONS = {"dice_1x1x1": "1x1x1 mm", "dice_1x1x5": "1x1x5 mm", "dice_3x3x3": "3x3x3 mm"}
AIMS = {"dice_1x1x1": 0.85, "dice_1x1x5": 0.80, "dice_3x3x3": 0.80}
CEILINGS = {"labels at the 2 mm cells' centres": 0.818, "label shares of the 2 mm cells": 0.901}


def read_history(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(rows: list[dict[str, str]], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [float(r["cumulative_cpu_hours"]) for r in rows]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    for key, name in RESOLUTIONS.items():
        values = [float(r[key]) for r in rows]
        for axis in (ax, zoom):
            axis.plot(hours, values, "o", label=name)
    points = {f"{r['network']} {r['step']}": (h, float(r["dice_all"])) for r, h in zip(rows, hours)}
    for axis in (ax, zoom):
        axis.plot(*zip(*points.values()), "k.", label="all 18 images (a line from each start)")
        for r in rows:   # forks of one start branch off it rather than follow each other
            if r["start"] in points:
                (x0, y0), (x1, y1) = points[r["start"]], points[f"{r['network']} {r['step']}"]
                axis.plot([x0, x1], [y0, y1], "k-", lw=0.8)
        axis.set_xlabel("cumulative training time, CPU hours on 2 cores")
        axis.set_ylabel("mean Dice, held-out synthetic images")
        axis.grid(alpha=0.3)
    ax.axhline(AIMS["dice_1x1x1"], color="tab:blue", ls="--", label="aim at 1 mm (0.85)")
    ax.axhline(AIMS["dice_1x1x5"], color="tab:orange", ls="--", label="aim at 1x1x5 and 3 mm (0.80)")
    for (name, value), style in zip(CEILINGS.items(), (":", "-.")):
        ax.axhline(value, color="grey", ls=style, label=f"ceiling at 1 mm, {name} ({value})")
    ax.set_ylim(0.6, 0.95)
    ax.set_title("the shipped network's stretches, against the aim")
    ax.legend(fontsize=7, loc="upper left")
    for r, h in zip(rows, hours):
        zoom.annotate(f"{r['network']} {r['step']}", (h, float(r["dice_all"])), fontsize=7,
                      xytext=(4, -10), textcoords="offset points")
    zoom.set_title("the same points, zoomed")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=os.path.join(REPO, "checkpoints", "model_history.csv"))
    p.add_argument("--png", default=os.path.join(REPO, "checkpoints", "accuracy_curve_pipeline.png"))
    args = p.parse_args(argv)
    rows = read_history(args.csv)
    print("| network | step | start | CPU hours | 1x1x1 | 1x1x5 | 3x3x3 | all | MNI WM | MNI GM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['network']}` | {r['step']} | {r['start'] or '-'} | {r['cumulative_cpu_hours']} | "
              f"{r['dice_1x1x1']} | {r['dice_1x1x5']} | {r['dice_3x3x3']} | {r['dice_all']} | "
              f"{r['mni_wm']} | {r['mni_gm']} |")
    plot(rows, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
