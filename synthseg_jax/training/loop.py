"""The training loop: generator -> step -> logging -> validation -> checkpoints -> curves.

``run(cfg)`` takes the composed Hydra config (``configs/train.yaml``) and returns a summary dict.
Files written in the run folder (the Hydra output folder unless ``train.out_dir`` is set):

``config.yaml``        the resolved configuration
``checkpoints/<step>`` orbax checkpoints (every ``train.checkpoint_every`` steps, last N kept)
``metrics.csv``        one row per step: step, phase, loss, gradient norm, seconds
``validation.csv``     one row per validation: step, phase, synthetic Dice (or QC error), MNI Dice
``curves.png``         loss and validation curves
``export/``            a models folder: the final weights in Keras' layout (``synthseg_2.0.h5``
                       etc.), ``architecture.json`` and the label tables

Scalars go to CSV rather than TensorBoard event files: writing event files needs TensorFlow or
tensorboardX (protobuf) in an environment that otherwise has neither, while a CSV is appended
atomically line by line, can be cut back exactly to a resumed step, and is read by anything
(pandas, a spreadsheet, ``curves.png`` here). ``python -m synthseg_jax.training.loop plot RUN``
redraws the curves.
"""

from __future__ import annotations

import csv
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from generator.sampler import resolve_path
from synthseg_jax.training import checkpoint as ckpt
from synthseg_jax.training import step as st
from synthseg_jax.training.config import TrainConfig, TrainSection
from synthseg_jax.training.tasks import Task, load_frozen_segmenter, load_training_data
from synthseg_jax.training.validation import load_mni, mni_forward, mni_scores
from synthseg_jax.weights.keras_h5 import load_keras_h5

METRIC_FIELDS = ("step", "phase", "loss", "grad_norm", "lr", "seconds")
VALIDATION_FIELDS = ("step", "phase", "synthetic", "mni_wm", "mni_gm")


# --------------------------------------------------------------------------- config helpers

def output_dir(train: TrainSection) -> str:
    if train.out_dir:
        return os.path.abspath(os.path.expanduser(train.out_dir))
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.output_dir
    except Exception:  # noqa: BLE001 - not running under Hydra
        return os.getcwd()


def enable_compilation_cache(path: str | None) -> None:
    """XLA's persistent compilation cache: a restarted or resumed run skips recompiling.

    Off with the oneDNN convolutions: XLA cannot serialise programs holding their custom calls
    (every write fails with a warning), so the cache would only cost time."""
    from synthseg_jax.nn.conv import resolve_backend
    if path and resolve_backend() == "onednn":
        print("[train] persistent compilation cache off: oneDNN convolution programs cannot be cached")
    elif path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# --------------------------------------------------------------------------- CSV logging

class CsvLog:
    """Append-only CSV; on resume, rows after the restored step are dropped first."""

    def __init__(self, path: str, fields, keep_until: int | None, enabled: bool = True):
        self.path, self.fields, self.enabled = path, tuple(fields), enabled
        if not enabled:
            return
        rows = []
        if keep_until is not None and os.path.isfile(path):
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= keep_until]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.fields).writerow(
                {k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_curves(run_dir: str, out: str | None = None) -> str | None:
    """``curves.png``: training loss (raw and smoothed) and validation scores against steps."""
    rows = read_csv(os.path.join(run_dir, "metrics.csv"))
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vals = read_csv(os.path.join(run_dir, "validation.csv"))
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in dict.fromkeys(r["phase"] for r in rows):
        sel = [r for r in rows if r["phase"] == phase]
        x = np.array([int(r["step"]) for r in sel])
        y = np.array([float(r["loss"]) for r in sel])
        line, = ax_l.plot(x, y, alpha=0.3, lw=0.8)
        if len(y) >= 10:
            w = max(len(y) // 50, 5)
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax_l.plot(x[w - 1:], smooth, color=line.get_color(), label=f"{phase} (mean of {w})")
        else:
            line.set_alpha(1.0)
            line.set_label(phase)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_l.set_yscale("log")
    ax_l.legend()
    labels = {"synthetic": "held-out synthetic", "mni_wm": "MNI white matter",
              "mni_gm": "MNI grey matter"}
    for key, label in labels.items():
        pts = [(int(r["step"]), float(r[key])) for r in vals if r.get(key) not in (None, "")]
        if pts:
            ax_v.plot(*zip(*pts), marker="o", label=label)
    qc = bool(vals) and vals[0].get("phase") == "qc"
    ax_v.set_xlabel("step")
    ax_v.set_ylabel("mean absolute error of predicted Dice" if qc else "Dice")
    if vals:
        ax_v.legend()
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- initial weights

def initial_variables(module, task: Task, init: str | None, seed: int) -> dict:
    """Keras-style random weights, or (fine-tuning) weights from a ``.h5`` file or a run."""
    variables = st.init_variables(module, task.in_channels, seed)
    if not init:
        return variables
    init = os.path.expanduser(str(init))
    if init.endswith(".h5"):
        return load_keras_h5(init, variables, other_layers=True)
    loaded, _ = ckpt.load_model(init)
    shapes = jax.tree_util.tree_map(np.shape, variables)
    if jax.tree_util.tree_map(np.shape, loaded) != shapes:
        raise ValueError(f"{init}: the checkpoint's network differs from the configured one")
    return loaded


def freeze_patterns(train: TrainSection) -> list[str]:
    patterns = list(train.freeze)
    for level in range(train.freeze_levels):
        patterns += [f"_conv_downarm_{level}_", f"_bn_down_{level}$",
                     f"_expand_down_merge_{level}$"]
    return patterns


# --------------------------------------------------------------------------- the run

class Run:
    """Everything a run needs, built once from the config (also used by tests/benchmarks)."""

    def __init__(self, cfg: TrainConfig | Mapping, out_dir: str | None = None):
        self.config = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_mapping(cfg)
        train, self.val_cfg = self.config.train, self.config.validation
        self.out_dir = out_dir or output_dir(train)
        enable_compilation_cache(train.compilation_cache)
        if train.distributed:
            jax.distributed.initialize()
        self.spec = self.config.model
        gcfg = self.config.generator
        multiple = self.spec.size_multiple * train.network_pooling
        bad = [s for s in gcfg.output_shape if s % multiple]
        if bad:
            raise ValueError(f"generator.output_shape {list(gcfg.output_shape)} must be a multiple "
                             f"of {multiple} for a {self.spec.nb_levels}-level network"
                             + (f" pooled {train.network_pooling} times" if train.network_pooling > 1 else ""))
        self.data = load_training_data(self.spec, gcfg, held_out=train.held_out,
                                       max_maps=train.max_maps, downsample=train.label_downsample,
                                       label_dir=train.label_dir)
        frozen = load_frozen_segmenter(self.spec, self.data.gcfg.atlas_res) \
            if self.spec.inputs == "predictions" else None
        self.task = Task(self.spec, self.data.params, frozen, pooling=train.network_pooling)
        self.module = self.task.module()
        self.seed = self.config.seed
        self.batch_size = train.batch_size
        devices = jax.devices()
        n_dev = min(train.devices or len(devices), len(devices))
        if self.batch_size % n_dev:
            raise ValueError(f"train.batch_size {self.batch_size} is not a multiple of the "
                             f"{n_dev} devices; set train.devices or the batch size")
        self.mesh = st.make_mesh(devices[:n_dev])
        variables = initial_variables(self.module, self.task, train.init, self.seed)
        optim = self.config.optim
        self.total_steps = train.steps
        self.lr = st.learning_rate(optim.schedule, optim.lr, self.total_steps, decay=optim.decay,
                                   warmup_steps=optim.warmup_steps, end_lr=optim.end_lr,
                                   boundaries=optim.boundaries, factor=optim.factor)
        self.freeze = freeze_patterns(train)
        self.tx = st.make_optimizer(self.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                    clip_norm=optim.clip_norm, freeze=self.freeze,
                                    params=variables["params"])
        self.trainer = st.Trainer(self.module, self.tx, self.task.loss, self.mesh,
                                  frozen_stats=self.freeze, running_stats=train.bn_running_stats,
                                  ema_decay=train.ema_decay)
        self.initial = st.create_state(variables, self.tx, self.seed, ema=self.trainer.ema_decay > 0)
        maps = [self.data.train_maps] + ([self.data.val_maps] if self.data.val_maps is not None else [])
        self.n_train = len(self.data.train_maps)
        self.bank = jax.device_put(np.concatenate(maps), self.trainer.replicated)
        self.aux = jax.device_put(self.task.aux, self.trainer.replicated)
        self._batch = jax.jit(self._make_batch, out_shardings=(self.trainer.batch_sharding,) * 2)
        self._eval = jax.jit(lambda v, x, y: self.task.evaluate(self.module.apply(v, x), y))
        self._eval_own_stats = jax.jit(lambda v, x, y: self.task.evaluate(
            self.module.apply(v, x, train=True, mutable=["batch_stats"])[0], y))
        self._forward_mni = jax.jit(mni_forward(self.module.apply, self.task.network_voxel))
        self.wl2_steps = train.wl2_steps if "wl2" in self.task.phases else 0

    # ---- data
    def _make_batch(self, key, indices, bank, aux):
        keys = jax.random.split(key, indices.shape[0])
        return jax.vmap(self.task.sample, in_axes=(0, 0, None))(keys, bank[indices], aux)

    def batch(self, step: int, rng) -> tuple[jax.Array, jax.Array]:
        """The training batch of ``step`` (a pure function of the run's key and the step)."""
        k_pick, k_data = jax.random.split(jax.random.fold_in(rng, step))
        idx = jax.random.randint(k_pick, (self.batch_size,), 0, self.n_train)
        return self._batch(k_data, idx, self.bank, self.aux)

    def phase(self, step: int) -> str:
        if self.task.phases == ("qc",):
            return "qc"
        return "wl2" if step < self.wl2_steps else "dice"

    def metadata(self) -> dict:
        return {"model": self.spec.flat_dict(self.task.n_outputs), "n_outputs": int(self.task.n_outputs),
                "in_channels": int(self.task.in_channels),
                "target_labels": [int(v) for v in self.task.target_labels],
                "voxel_size": float(self.task.network_voxel),
                "crop": list(self.task.crop_shape),
                "priors_dir": resolve_path(self.data.gcfg.priors_dir),
                "train_maps": [os.path.basename(p) for p in self.data.train_paths],
                "held_out": [os.path.basename(p) for p in self.data.val_paths]}

    # ---- validation
    def validation_set(self):
        """Held-out synthetic pairs, drawn once with the validation seed (batch-sized chunks)."""
        if self.data.val_maps is None or not self.val_cfg.n_per_map:
            return []
        n_val = len(self.data.val_maps)
        per_map = self.val_cfg.n_per_map
        base = jax.random.key(self.val_cfg.seed)
        items = [(self.n_train + i, jax.random.fold_in(jax.random.fold_in(base, i), j))
                 for i in range(n_val) for j in range(per_map)]
        chunks = []
        for start in range(0, len(items), self.batch_size):
            part = items[start:start + self.batch_size]
            part = part + [part[-1]] * (self.batch_size - len(part))    # pad the last chunk
            idx = jnp.asarray([i for i, _ in part], jnp.int32)
            keys = jnp.stack([jax.random.key_data(k) for _, k in part])
            chunks.append(self._batch_keys(keys, idx))
        return chunks

    def _batch_keys(self, keys, idx):
        if not hasattr(self, "_batch_k"):
            self._batch_k = jax.jit(
                lambda k, i, b, a: jax.vmap(self.task.sample, in_axes=(0, 0, None))(
                    jax.vmap(jax.random.wrap_key_data)(k), b[i], a),
                out_shardings=(self.trainer.batch_sharding,) * 2)
        return self._batch_k(keys, idx, self.bank, self.aux)

    def synthetic_scores(self, variables, chunks, own_stats: bool = False) -> np.ndarray:
        """The validation score (Dice, or QC error) of every chunk of :meth:`validation_set`;
        ``own_stats``: BatchNorm normalises each chunk with its own statistics, as training does
        (the gap to the default shows how far the moving statistics are from the images')."""
        evaluate = self._eval_own_stats if own_stats else self._eval
        scores = [jax.device_get(evaluate(variables, x, y)) for x, y in chunks]
        return np.array([float(next(iter(s.values()))) for s in scores])

    def validate(self, variables, chunks, mni) -> dict:
        out = {}
        if chunks:
            out["synthetic"] = float(np.mean(self.synthetic_scores(variables, chunks)))
        if mni is not None:
            logits = self._forward_mni(variables, mni.image)
            labels = np.asarray(self.task.target_labels)[np.asarray(jnp.argmax(logits[0], -1))]
            out.update(mni_scores(labels, mni, self.spec.mni_wm, self.spec.mni_gm))
        return out

    def mni(self):
        if not self.val_cfg.mni or self.spec.kind != "segmenter" \
                or not (self.spec.mni_wm and self.spec.mni_gm):
            return None
        return load_mni(self.task.network_voxel, self.spec.size_multiple)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (how SLURM and other schedulers stop a job) during training.

    The first signal only asks the loop to stop: the step, validation or checkpoint save under
    way finishes, then the state of that last completed step is saved and the run exits with 130.
    Raising at the signal instead would abandon a step whose jitted call has already taken (donated)
    the previous state's buffers, leaving no complete state to save. A second signal stops at once,
    keeping the checkpoints already written. Once the run is saving and closing (``finishing``),
    further signals are ignored: they would only break the save. SIGINT is set explicitly because
    a shell starts background jobs with it ignored.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.finishing = False

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.finishing:
            print(f"\n[train] {signal.Signals(signum).name}: already stopping, finishing the checkpoint",
                  flush=True)
            return
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[train] {signal.Signals(signum).name}: stopping after the current step "
              f"(send it again to stop at once)", flush=True)


def stop_run(manager, out_dir: str, main: bool, state=None, meta: Mapping | None = None,
             at_once: bool = False) -> None:
    """Exit with 130 after a signal, a save in flight finished first. ``state`` (the last
    completed step, its metrics written) is saved unless its checkpoint exists; without one (a
    second signal) the checkpoints already written are what is kept. ``at_once`` (the second
    signal interrupted the step, possibly inside XLA's tracing or compilation): leave without the
    interpreter's teardown, which then crashed with SIGSEGV after the message."""
    if state is not None and manager.latest_step() != int(jax.device_get(state.step)):
        ckpt.save(manager, state, meta, force=True)
    manager.wait_until_finished()
    latest = manager.latest_step()
    manager.close()
    if main:
        what = "interrupted: checkpoint at step" if state is not None else \
            "stopped at once: the latest checkpoint is step"
        then = f"stopped at once: no checkpoint yet in {out_dir}" if latest is None else \
            f"{what} {latest} in {out_dir}; the same command resumes from it"
        print(f"[train] {then}", flush=True)
    if at_once:
        sys.stderr.flush()
        os._exit(130)
    raise SystemExit(130)


def run(cfg: TrainConfig | Mapping) -> dict:
    """Train as configured; resumes from the run folder's latest checkpoint when there is one.
    SIGINT and SIGTERM are handled from the start (:class:`StopRequest`): one arriving while the
    run is set up stops it before its first step."""
    stop = StopRequest()
    with stop.installed():
        return _train(cfg, stop)


def _train(cfg: TrainConfig | Mapping, stop: StopRequest) -> dict:
    import logging
    from tqdm import tqdm

    logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every save at INFO

    r = Run(cfg)
    train = r.config.train
    main = jax.process_index() == 0
    os.makedirs(r.out_dir, exist_ok=True)
    if main:
        from omegaconf import OmegaConf
        OmegaConf.save(OmegaConf.create(dict(r.config.raw)), os.path.join(r.out_dir, "config.yaml"))
    manager = ckpt.make_manager(os.path.join(r.out_dir, ckpt.CHECKPOINT_SUBDIR),
                                keep=train.keep_checkpoints, async_save=train.async_checkpointing)
    state = r.initial
    start = 0
    if train.resume in ("auto", "must") and manager.latest_step() is not None:
        state = ckpt.restore_state(manager, state)
        start = int(state.step)
    elif train.resume == "must":
        raise FileNotFoundError(f"{r.out_dir}: no checkpoint to resume from")
    state = r.trainer.place_state(state)
    metrics_log = CsvLog(os.path.join(r.out_dir, "metrics.csv"), METRIC_FIELDS, start, main)
    val_log = CsvLog(os.path.join(r.out_dir, "validation.csv"), VALIDATION_FIELDS, start, main)
    meta = r.metadata()
    val_every = r.val_cfg.every
    chunks = r.validation_set() if val_every else []
    mni = r.mni() if val_every else None
    rng = jax.random.wrap_key_data(jax.device_get(state.rng))
    if main:
        print(f"[train] {r.spec.name} ({r.spec.kind}): {r.n_train} training maps, "
              f"crop {list(r.task.crop_shape)} at {r.task.network_voxel:g} mm"
              + (f" (generated at {r.data.gcfg.atlas_res:g} mm, pooled)" if r.task.pooling > 1 else "") + ", "
              f"batch {r.batch_size} on {r.trainer.n_devices} device(s), steps {start} -> "
              f"{r.total_steps}, run folder {r.out_dir}", flush=True)
    bar = tqdm(total=r.total_steps, initial=start, disable=not main or train.quiet,
               dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    last_val = {}
    loss = float("nan")
    t_run = time.perf_counter()
    try:
        for step in range(start, r.total_steps):
            if stop:
                break
            phase = r.phase(step)
            if step == r.wl2_steps and step > 0 and phase == "dice" and train.reset_optimizer_after_wl2:
                # the original compiles a new model with a fresh Adam for the Dice phase
                state = r.trainer.place_state(state.replace(opt_state=r.tx.init(state.params)))
            t0 = time.perf_counter()
            inputs, targets = r.batch(step, rng)
            state, m = r.trainer.step(phase, state, inputs, targets)
            loss = float(m["loss"])
            seconds = time.perf_counter() - t0
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1} ({phase})")
            metrics_log.write(step=step + 1, phase=phase, loss=loss, grad_norm=float(m["grad_norm"]),
                              lr=float(r.lr(step)), seconds=seconds)
            bar.set_postfix_str(f"{phase} loss {loss:.4f}" + "".join(
                f" {k} {v:.3f}" for k, v in last_val.items()), refresh=False)
            bar.update(1)
            done = step + 1
            if val_every and (done % val_every == 0 or done == r.total_steps):
                last_val = r.validate(state.inference_variables(), chunks, mni)
                val_log.write(step=done, phase=phase, **last_val)
                if main:
                    plot_curves(r.out_dir)
            if done % train.checkpoint_every == 0 or done == r.total_steps:
                ckpt.save(manager, state, meta)
    except KeyboardInterrupt:
        stop.finishing = True
        bar.close()
        stop_run(manager, r.out_dir, main, at_once=True)
    if stop and int(jax.device_get(state.step)) < r.total_steps:
        stop.finishing = True
        bar.close()
        nothing_done = manager.latest_step() is None and int(jax.device_get(state.step)) == 0
        stop_run(manager, r.out_dir, main, *(() if nothing_done else (state, meta)))
    bar.close()
    manager.wait_until_finished()
    manager.close()
    summary = {"run_dir": r.out_dir, "steps": r.total_steps, "last_loss": loss,
               "seconds": time.perf_counter() - t_run, **last_val}
    if main:
        plot_curves(r.out_dir)
        if train.export_h5 and r.total_steps > start:
            summary["export"] = ckpt.export_trained(jax.device_get(state.inference_variables()),
                                                    meta, os.path.join(r.out_dir, "export"))
        print(f"[train] done: {summary}", flush=True)
    return summary


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plot":
        print(plot_curves(sys.argv[2]))
    else:
        sys.exit("usage: python -m synthseg_jax.training.loop plot RUN_DIR")
