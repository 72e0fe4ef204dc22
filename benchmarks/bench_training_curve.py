"""Accuracy over training of a run whose checkpoints are committed to git, on one fixed held-out
set larger than the training loop's validation: the curve across sessions with error bars.

The training loop validates on 2 synthetic images per held-out map, cheap enough to run every
250 steps but too noisy (single points swing by +-0.1) to tell a flat curve from a rising one.
This re-scores every committed checkpoint of the run on ``--n-per-map`` images per held-out map
(the same validation images for every checkpoint, so differences between steps are paired), at
the network's own voxel size, and on the nilearn MNI T1, exactly as the training loop does.

    python benchmarks/bench_training_curve.py [--run checkpoints/cpu_2.0_run] [--n-per-map 16]
        [--png curve.png] [--checkpoints DIR ...] [--own-stats] [--raw]

Prints a markdown table for BENCHMARKS.md: one row per committed checkpoint, then the working
tree's checkpoint if it is newer. ``--checkpoints`` scores the given ``checkpoints/`` folders
instead (an A/B of runs forked from one step), with each one's paired difference from the first;
a folder inside a run folder with its own ``config.yaml`` is scored with that run's network (a
narrower and a wider network on the same images), any other with ``--run``'s.
``--own-stats`` adds the synthetic score with BatchNorm normalising each image with its own
statistics, as training does without ``train.bn_running_stats``. Checkpoints that keep a moving
average of the weights (``train.ema_decay``) are scored with it, as they are exported; ``--raw``
adds the raw weights' score and the average's paired gain over them.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=os.path.join("checkpoints", "cpu_2.0_run"),
                   help="run folder, relative to the repository (its config.yaml sets the task)")
    p.add_argument("--n-per-map", type=int, default=16, help="synthetic images per held-out map")
    p.add_argument("--png", default=None, help="also draw the curve here")
    p.add_argument("--checkpoints", nargs="+", default=None,
                   help="score these checkpoints/ folders (their latest step) instead of the history")
    p.add_argument("--own-stats", action="store_true",
                   help="also score with each image's own BatchNorm statistics")
    p.add_argument("--raw", action="store_true",
                   help="also score the raw weights of checkpoints that keep a moving average")
    return p.parse_args(argv)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True,
                          text=True).stdout


def committed_checkpoints(run: str) -> list[tuple[str, str]]:
    """``(commit, date)`` of every commit that changed the run's checkpoints, oldest first."""
    log = git("log", "--reverse", "--format=%h %ad", "--date=short", "--",
              f"{run}/checkpoints")
    return [tuple(line.split()) for line in log.splitlines() if line.strip()]


def extract(commit: str, run: str, into: str) -> str:
    """The run's ``checkpoints/`` folder as of ``commit``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, f"{run}/checkpoints"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return os.path.join(into, run, "checkpoints")


def make_scorer(run_dir: str, n_per_map: int, own_stats: bool):
    """``score(variables) -> (per-image Dice, MNI scores and the own-statistics mean)``, built
    once: the validation images are drawn once with the run's validation seed."""
    import dataclasses

    from synthseg_jax.training import config
    from synthseg_jax.training.loop import Run

    cfg = config.of_run(run_dir)
    cfg = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, n_per_map=n_per_map,
                                                                   mni=True))
    run = Run(cfg, out_dir=run_dir)   # only read: nothing is written there
    chunks, mni = run.validation_set(), run.mni()

    def score(variables):
        extra = run.validate(variables, [], mni)
        if own_stats:
            extra["own_stats"] = float(run.synthetic_scores(variables, chunks, own_stats=True).mean())
        return run.synthetic_scores(variables, chunks), extra
    return score


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(steps, [r["mean"] for r in rows], yerr=[r["se"] for r in rows], marker="o",
                capsize=3, label="held-out synthetic, mean Dice (+- s.e.)")
    ax.plot(steps, [r["mni_wm"] for r in rows], marker="s", label="MNI T1 white matter")
    ax.plot(steps, [r["mni_gm"] for r in rows], marker="^", label="MNI T1 grey matter")
    ax.set_xlabel("training step")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_difference(a: np.ndarray, b: np.ndarray) -> str:
    diff = a - b
    return f"{diff.mean():+.3f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}"


def print_table(rows: list[dict], paired: bool, own_stats: bool, raw: bool) -> None:
    """Markdown; ``paired``: add each row's mean per-image difference from the first row."""
    first = rows[0]["dice"]
    heads = ["checkpoint", "date", "step", f"held-out synthetic mean Dice (+- s.e., n={len(first)})"]
    heads += ["same, each image's own BatchNorm statistics"] if own_stats else []
    heads += ["raw weights (averaged minus raw, +- s.e.)"] if raw else []
    heads += ["MNI WM Dice", "MNI GM Dice"] + (["minus the first row (+- s.e.)"] if paired else [])
    print("\n| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for r in rows:
        cells = [r["commit"], r["date"], str(r["step"]), f"{r['mean']:.3f} +- {r['se']:.3f}"]
        cells += [f"{r['own_stats']:.3f}"] if own_stats else []
        if raw:
            cells.append(f"{r['raw'].mean():.3f} ({paired_difference(r['dice'], r['raw'])})"
                         if "raw" in r else "no average kept")
        cells += [f"{r['mni_wm']:.3f}", f"{r['mni_gm']:.3f}"]
        if paired:
            cells.append(paired_difference(r["dice"], first))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from synthseg_jax.training.checkpoint import checkpoint_dir, has_average, latest_step, load_model

    run_dir = os.path.join(REPO, args.run)
    scorers = {}

    def scorer_for(directory: str):
        """The scorer of the run that owns ``directory`` (``--run``'s if it has no config)."""
        owner = os.path.dirname(os.path.abspath(directory))
        owner = owner if os.path.isfile(os.path.join(owner, "config.yaml")) else run_dir
        if owner not in scorers:
            scorers[owner] = make_scorer(owner, args.n_per_map, args.own_stats)
        return scorers[owner]
    sources = []
    with tempfile.TemporaryDirectory(prefix="curve_ckpt_") as tmp:
        if args.checkpoints:
            sources = [(path, time.strftime("%Y-%m-%d"), checkpoint_dir(path)) for path in args.checkpoints]
        else:
            for commit, date in committed_checkpoints(args.run):
                sources.append((commit, date, extract(commit, args.run, os.path.join(tmp, commit))))
            current = checkpoint_dir(run_dir)
            if latest_step(current) is not None:
                sources.append(("working tree", time.strftime("%Y-%m-%d"), current))
        rows, seen = [], set()
        for commit, date, directory in sources:
            step = latest_step(directory)
            if step is None or (step in seen and not args.checkpoints):
                continue
            seen.add(step)
            t0 = time.perf_counter()
            try:
                variables, _ = load_model(directory, step)
            except (ValueError, KeyError, FileNotFoundError) as err:
                print(f"{commit}: step {step} not readable with this code ({err}); skipped",
                      file=sys.stderr)
                continue
            score = scorer_for(directory)
            dice, mni = score(variables)
            rows.append(dict(commit=commit, date=date, step=step, dice=dice, mean=float(dice.mean()),
                             se=float(dice.std(ddof=1) / np.sqrt(len(dice))), **mni))
            if args.raw and has_average(directory, step):
                rows[-1]["raw"] = score(load_model(directory, step, average=False)[0])[0]
            print(f"{commit} step {step}: {rows[-1]['mean']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)

    print_table(rows, paired=bool(args.checkpoints), own_stats=args.own_stats, raw=args.raw)
    if args.png:
        plot(rows, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
