"""Seconds per scan and peak memory of predict's pipeline (and optionally of the original
``mri_synthseg`` under TensorFlow), per mode, first scan (with compilation) and following scans.

    python benchmarks/bench_predict.py [--input IMG] [--models DIR] [--modes default,fast,robust,parc+qc]
                                       [--scans 2] [--threads 2] [--crop N] [--vol] [--post]
                                       [--original | --original-from WORK] [--original-threads 2]
                                       [--original-low-mem-threads 1]
                                       [--json OUT.json] [--grid 256x256x256 --random-models DIR]
                                       [--precisions float32,bf16]

Each mode runs in its own process (so its peak memory is its own): our pipeline segments the same
image ``--scans`` times in one batch (a .txt list, one scan at a time: ``overlap=false``, so that
the stages add up to the scan's time), which separates the first scan (compilation
included) from the following ones, and reports where the time goes (read, preprocessing,
compile, network, connected components, post-processing on the device, geometry/volumes on the
host, writing). "first scan" is the whole process up to the end of the first scan (Python and
JAX start-up, loading the weights, compilation), the figure to set against the original's whole
run; "following" is the mean of the later scans. ``--vol``/``--post`` also write the volumes
CSV / the posteriors (.nii) of each scan, like the parity runs (parc+qc writes the QC CSV).
``--original-from WORK`` takes the original's seconds and peak memory from the whole-run parity
harness's runs (``WORK/runs/<input>/<mode>/original/time.txt``, see
tools/parity/run_pipeline_parity.py) instead of running it again. ``--original`` also runs the unmodified original from
``.parity/`` (see tools/parity/README.md) on one scan per mode, writing what ours writes
(``--vol``/``--post`` too): a long run (minutes per mode, ~10 GB); REFERENCE.md says which modes
need one thread (``--original-low-mem-threads 1``).
``--grid XxYxZ`` segments the MNI T1 centred in a 1 mm grid of that shape (FreeSurfer's conformed
256^3, or 320x320x256 for a 0.8 mm scan's 1 mm grid) instead of ``--input``; ``--random-models
DIR`` makes (once) the published-size seeded random-weight models there (``gpu_check.py``'s) and
uses them as ``--models``. Memory at 256^3 (issue 20):
``python benchmarks/bench_predict.py --grid 256x256x256 --random-models .bench/models --scans 1 --vol --modes default,fast,v1,robust,parc,qc,parc+qc``
Wall-clock times depend on the machine's load, printed with every result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(REPO, ".parity")
DEFAULT_INPUT = os.path.join(PARITY, "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
MODES = {
    "default": {},
    "fast": {"fast": True},
    "v1": {"v1": True},
    "robust": {"robust": True},
    "parc": {"parc": True},
    "qc": {"qc": True},
    "parc+qc": {"parc": True, "qc": True},
}
ORIGINAL_FLAGS = {"default": [], "fast": ["--fast"], "v1": ["--v1"], "robust": ["--robust"],
                  "parc": ["--parc"], "qc": ["--qc", "QC"], "parc+qc": ["--parc", "--qc", "QC"]}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def inner(args: argparse.Namespace) -> None:
    """Runs in the child process: one mode, ``--scans`` scans, JSON on the last stdout line."""
    from synthseg_jax.inference.options import PredictOptions
    from synthseg_jax.inference.pipeline import Runner
    from synthseg_jax.inference.runtime import configure_runtime, setup_logging

    configure_runtime(args.threads, "cpu")
    setup_logging()
    work = tempfile.mkdtemp(prefix="bench_predict_")
    with open(os.path.join(work, "in.txt"), "w") as handle:
        handle.write("\n".join([os.path.abspath(args.input)] * args.scans) + "\n")
    with open(os.path.join(work, "out.txt"), "w") as handle:
        handle.write("\n".join(os.path.join(work, f"seg{n}.nii.gz") for n in range(args.scans)) + "\n")
    flags = dict(MODES[args.inner])
    for key, on, ext in (("vol", args.vol, "csv"), ("post", args.post, "nii")):
        if on:
            with open(os.path.join(work, f"{key}.txt"), "w") as handle:
                handle.write("\n".join(os.path.join(work, f"{key}{n}.{ext}") for n in range(args.scans)) + "\n")
            flags[key] = os.path.join(work, f"{key}.txt")
    if flags.pop("qc", False):
        with open(os.path.join(work, "qc.txt"), "w") as handle:
            handle.write("\n".join(os.path.join(work, f"qc{n}.csv") for n in range(args.scans)) + "\n")
        flags["qc"] = os.path.join(work, "qc.txt")
    start = time.perf_counter()
    runner = Runner(PredictOptions.create(i=os.path.join(work, "in.txt"), o=os.path.join(work, "out.txt"),
                            models_dir=args.models, crop=args.crop, progress=False, overlap=False,
                            precision=args.precision, **flags),
                    stdout=sys.stderr)
    setup = time.perf_counter() - start
    summary = runner.run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"mode": args.inner, "precision": args.precision, "setup": setup, "timings": runner.timings,
                      "failed": summary.failed, "cpu": usage.ru_utime + usage.ru_stime,
                      "peak_rss_gb": usage.ru_maxrss / 2**20, "load": load()}))


def run_ours(args: argparse.Namespace, mode: str, precision: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--inner", mode, "--input", args.input,
           "--models", args.models, "--scans", str(args.scans), "--threads", str(args.threads),
           "--precision", precision]
    cmd += ["--vol"] if args.vol else []
    cmd += ["--post"] if args.post else []
    if args.crop:
        cmd += ["--crop", str(args.crop)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: failed\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = wall
    return result


def run_original(args: argparse.Namespace, mode: str) -> dict:
    """One scan through the unmodified original, timed by /usr/bin/time (peak RSS)."""
    work = tempfile.mkdtemp(prefix="bench_original_")
    os.symlink(os.path.abspath(args.models), os.path.join(work, "models"))
    flags = [f if f != "QC" else os.path.join(work, "qc.csv") for f in ORIGINAL_FLAGS[mode]]
    # the same outputs as ours (a like-for-like time)
    flags += ["--vol", os.path.join(work, "vol.csv")] if args.vol else []
    flags += ["--post", os.path.join(work, "post.nii")] if args.post else []
    threads = original_threads(args, mode)
    cmd = ["/usr/bin/time", "-v", os.path.join(PARITY, "venv", "bin", "python"),
           os.path.join(PARITY, "mri_synthseg"), "--i", args.input, "--o", os.path.join(work, "seg.nii.gz"),
           "--cpu", "--threads", str(threads)] + flags
    if args.crop:
        cmd += ["--crop", str(args.crop)]
    env = dict(os.environ, FREESURFER_HOME=work)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    rss = [l for l in proc.stderr.splitlines() if "Maximum resident set size" in l]
    return {"mode": mode, "wall": wall, "ok": proc.returncode == 0 and "ERROR" not in proc.stdout,
            "peak_rss_gb": int(rss[0].split()[-1]) / 2**20 if rss else None, "load": load(),
            "threads": threads}


def original_threads(args: argparse.Namespace, mode: str) -> int:
    """The original dies with std::bad_alloc at 2 threads in robust and QC modes here
    (REFERENCE.md): ``--original-low-mem-threads`` sets their thread count."""
    low_mem = mode in ("robust", "parc+qc") and args.original_low_mem_threads
    return args.original_low_mem_threads if low_mem else args.original_threads


def original_from(args: argparse.Namespace, mode: str) -> dict | None:
    """The original's wall seconds and peak RSS from a whole-run parity harness run."""
    name = os.path.basename(args.input).replace(".nii.gz", "").replace(".nii", "")
    run = os.path.join(args.original_from, "runs", name, mode, "original")
    path = os.path.join(run, "time.txt")
    if not os.path.isfile(path):
        return None
    text = open(path).read()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text).groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    threads = re.search(r"--threads (\d+)", open(os.path.join(run, "cmd.txt")).read()).group(1)
    loads = open(os.path.join(run, "load_before.txt")).read().split("load average:")[-1].strip()
    ok = open(os.path.join(run, "rc")).read().strip() == "0"
    return {"mode": mode, "wall": int(wall[0] or 0) * 3600 + int(wall[1]) * 60 + float(wall[2]),
            "peak_rss_gb": rss / 2**20, "ok": ok, "threads": int(threads), "load": loads, "run": run}


def prepare_inputs(args: argparse.Namespace) -> None:
    """``--grid`` and ``--random-models``: the scan and the models, made with gpu_check.py's code."""
    if not (args.grid or args.random_models):
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_check

    if args.grid:
        shape = tuple(int(s) for s in args.grid.split("x"))
        args.input = os.path.join(tempfile.mkdtemp(prefix="bench_grid_"), f"mni_{args.grid}.nii.gz")
        image = gpu_check.make_scan(args.input, shape)
    if args.random_models:
        args.models = os.path.abspath(args.random_models)
        if not os.path.isfile(os.path.join(args.models, "synthseg_qc_2.0.h5")):
            gpu_check.make_models(args.models, image if args.grid else gpu_check.make_scan(
                os.path.join(tempfile.mkdtemp(), "scan.nii.gz"), 256), tiny=False)


STAGES = ("read", "preprocess", "compile", "network", "components", "postprocess", "geometry", "write")


def row_name(result: dict) -> str:
    """The mode, and the precision where it is not float32 (ratios are against the same mode)."""
    precision = result.get("precision", "float32")
    return result["mode"] if precision == "float32" else f"{result['mode']}, {precision}"


def table(ours: list[dict], original: dict[str, dict]) -> str:
    """Seconds per scan and peak memory, ours against the original, and where our time goes."""
    lines = ["| mode | ours: first scan s (of which compile) | ours: following scan s | ours peak GB | "
             "original s (threads) | original peak GB | original / ours (first) | original / ours (following) | "
             "load (ours; original) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ours:
        first, rest = r["timings"][0], r["timings"][1:]
        following = sum(t["total"] for t in rest) / len(rest) if rest else float("nan")
        first_process = r["process_wall"] - sum(t["total"] for t in rest)
        orig = original.get(r["mode"])
        if orig and orig["ok"]:
            o = (f"{orig['wall']:.0f} ({orig['threads']})", f"{orig['peak_rss_gb']:.1f}",
                 f"{orig['wall'] / first_process:.2f}", f"{orig['wall'] / following:.2f}")
        else:
            o = ("failed" if orig else "-", "-", "-", "-")
        lines.append(f"| {row_name(r)} | {first_process:.0f} ({first.get('compile', 0):.0f}) | "
                     f"{following:.0f} | {r['peak_rss_gb']:.1f} | {' | '.join(o)} | "
                     f"{r['load']}; {orig['load'] if orig else '-'} |")
    lines += ["", "Where our time goes (s; the following scan, compile from the first):", "",
              "| mode | process start-up + weights | " + " | ".join(STAGES) + " | total |",
              "|---|---|" + "---|" * len(STAGES) + "---|"]
    for r in ours:
        first, rest = r["timings"][0], r["timings"][1:]
        timing = dict(rest[0] if rest else first, compile=first.get("compile", 0.0))
        startup = r["process_wall"] - sum(t["total"] for t in r["timings"])
        lines.append(f"| {row_name(r)} | {startup:.0f} | " + " | ".join(f"{timing.get(k, 0.0):.1f}" for k in STAGES)
                     + f" | {(rest[0] if rest else first)['total']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT)
    parser.add_argument("--models", default=os.path.join(PARITY, "models"))
    parser.add_argument("--modes", default="default,fast,robust,parc+qc")
    parser.add_argument("--scans", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--original", action="store_true")
    parser.add_argument("--original-threads", type=int, default=2)
    parser.add_argument("--original-low-mem-threads", type=int, default=None,
                        help="the original's threads in robust and parc+qc (default: --original-threads)")
    parser.add_argument("--original-from", default=None,
                        help="parity harness work dir whose original runs to report")
    parser.add_argument("--vol", action="store_true", help="also write each scan's volumes CSV")
    parser.add_argument("--post", action="store_true", help="also write each scan's posteriors")
    parser.add_argument("--json", default=None)
    parser.add_argument("--grid", default=None, help="XxYxZ: the MNI T1 centred in this 1 mm grid")
    parser.add_argument("--random-models", default=None,
                        help="folder of published-size random-weight models (made if missing)")
    parser.add_argument("--precisions", default="float32",
                        help="comma-separated: float32 and/or bf16 (predict's precision=), each mode in each")
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    prepare_inputs(args)
    if not os.path.isfile(args.input):   # else every run fails inside its process, unseen
        parser.error(f"{args.input}: no such scan")
    ours, original = [], {}
    for mode in args.modes.split(","):
        for precision in args.precisions.split(","):
            ours.append(run_ours(args, mode, precision))
            print(f"ours {row_name(ours[-1])}: {json.dumps(ours[-1]['timings'])} "
                  f"peak {ours[-1]['peak_rss_gb']:.1f} GB (load {ours[-1]['load']})", flush=True)
        if args.original:
            original[mode] = run_original(args, mode)
            print(f"original {mode}: {original[mode]}", flush=True)
        elif args.original_from:
            found = original_from(args, mode)
            if found:
                original[mode] = found
    print(table(ours, original))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ours": ours, "original": original, "args": vars(args)}, handle, indent=1)


if __name__ == "__main__":
    main()
