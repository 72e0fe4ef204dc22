"""orbax checkpoints of a training run, and their export to Keras ``.h5`` / a models folder.

A checkpoint (``<run>/checkpoints/<step>/``) holds three items:

* ``model`` -- ``{'params', 'batch_stats'}`` and, when the run keeps one, ``'ema_params'``
  (the moving average of the params): all that inference and export need. Export, inference and
  fine-tuning take the moving average when it is there;
* ``train`` -- ``{'step', 'opt_state', 'rng'}``: with ``model``, everything an exact resume needs
  (the data of step t is drawn with ``fold_in(rng, t)``, so no iterator state is required);
* ``meta`` -- JSON: the model spec, channel labels, input channels, generator voxel size.

Export (also ``python -m synthseg_jax.training.checkpoint``)::

    export_h5(run_dir, "out/synthseg_2.0.h5")                  # Keras save_weights layout
    export_models_dir({"2.0": run_dir}, "models/")             # folder predict.py reads
    export_models_dir({"robust": [run_s1, run_l2l, run_s2]}, "models/")   # cascade stages merged
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from synthseg_jax.weights.keras_h5 import save_keras_h5
from synthseg_jax.weights.models_dir import MODEL_FILES

CHECKPOINT_SUBDIR = "checkpoints"
ARCHITECTURE_FILE = "architecture.json"
# stage order of the robust cascade (by Keras prefix)
ROBUST_STAGES = ("unet", "l2l", "unet2")


def checkpoint_dir(path: str) -> str:
    """A run folder or its ``checkpoints/`` folder -> the ``checkpoints/`` folder."""
    path = os.path.abspath(path)
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else path


def latest_step(directory: str) -> int | None:
    """The newest step saved in a ``checkpoints/`` folder (None when it has none)."""
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps) if steps else None


def make_manager(directory: str, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the last ``keep`` checkpoints (all if None)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("model", "train", "meta"))


def save(manager: ocp.CheckpointManager, state, meta: Mapping[str, Any], force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    model = {"params": state.params, "batch_stats": state.batch_stats}
    if state.ema_params is not None:
        model["ema_params"] = state.ema_params
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    return manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(dict(meta, step=step))), force=force)


def has_average(path: str, step: int) -> bool:
    """Whether the checkpoint of ``step`` (``path``: a run folder or its ``checkpoints/``) holds a
    moving average of the params."""
    model = os.path.join(checkpoint_dir(path), str(step), "model")
    with ocp.StandardCheckpointer() as reader:
        return "ema_params" in reader.metadata(model).item_metadata


def restore_state(manager: ocp.CheckpointManager, template, step: int | None = None):
    """The full train state of ``step`` (default: latest) shaped like ``template`` (a
    ``TrainState``, e.g. freshly created); None when the folder has no checkpoint. A template
    with a moving average resumed from a checkpoint without one starts the average at the
    restored params; one without drops a stored average."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    model_t = {"params": template.params, "batch_stats": template.batch_stats}
    if has_average(str(manager.directory), step):
        model_t["ema_params"] = template.params
    train_t = {"step": template.step, "opt_state": template.opt_state, "rng": template.rng}
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract(model_t)),
        train=ocp.args.StandardRestore(abstract(train_t))))
    model, train = restored["model"], restored["train"]
    ema = None
    if template.ema_params is not None:
        ema = model["ema_params"] if "ema_params" in model else \
            jax.tree_util.tree_map(jnp.array, model["params"])   # a copy: the step donates both
    return template.replace(step=train["step"], params=model["params"],
                            batch_stats=model["batch_stats"], opt_state=train["opt_state"],
                            rng=train["rng"], ema_params=ema)


def load_model(path: str, step: int | None = None, average: bool = True) -> tuple[dict, dict]:
    """``(variables, meta)`` of a checkpoint: ``path`` is a run folder or its ``checkpoints/``.
    ``average``: the moving average of the params when the checkpoint has one (else the params)."""
    directory = checkpoint_dir(path)
    if latest_step(directory) is None:
        raise FileNotFoundError(f"{directory}: no checkpoint here")
    manager = make_manager(directory, keep=None, async_save=False, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint here")
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    model = jax.tree_util.tree_map(np.asarray, dict(restored["model"]))
    ema = model.pop("ema_params", None)
    if average and ema is not None:
        model["params"] = ema
    model.setdefault("batch_stats", {})
    return model, dict(restored["meta"])


def architecture(meta: Mapping[str, Any]) -> dict:
    """The hyper-parameters a reader needs to rebuild the network of a checkpoint."""
    model = meta["model"]
    keys = ("kind", "prefix", "nb_features", "nb_levels", "conv_size", "nb_conv_per_level",
            "feat_mult", "activation", "batch_norm", "skip_n_concatenations")
    out = {k: model[k] for k in keys if k in model}
    out.update(n_outputs=meta["n_outputs"], in_channels=meta["in_channels"],
               voxel_size=meta.get("voxel_size"), labels=meta.get("target_labels"),
               crop=meta.get("crop"))
    return out


def export_h5(path: str, out_path: str, step: int | None = None) -> dict:
    """Write a checkpoint's weights in Keras' ``save_weights`` HDF5 layout, its training voxel size
    recorded in the file (so the ``.h5`` alone is read right); returns its meta."""
    variables, meta = load_model(path, step)
    save_keras_h5(variables, out_path, voxel_size=meta.get("voxel_size"))
    return meta


def export_trained(variables: Mapping, meta: Mapping[str, Any], out_dir: str) -> str:
    """A run's final weights as a models folder (training writes ``RUN/export/``): the ``.h5``, its
    ``architecture.json`` entry and the run's label tables, so ``models_dir=RUN/export`` predicts
    as it is. A robust cascade stage is one file of three (``synthseg_robust_2.0_<prefix>.h5``;
    ``export_models_dir`` merges the three runs). Returns the ``.h5``'s path."""
    key, prefix = meta["model"]["export"], meta["model"]["prefix"]
    name = (f"synthseg_robust_2.0_{prefix}.h5" if key == "robust"
            else MODEL_FILES.get(key, f"{meta['model']['name']}.h5"))
    path = os.path.join(out_dir, name)
    _write_models_entry(out_dir, key, {name: variables}, [meta], meta.get("priors_dir"))
    return path


def _merge(trees: Sequence[Mapping]) -> dict:
    out: dict = {}
    for tree in trees:
        for collection in ("params", "batch_stats"):
            for name, value in tree.get(collection, {}).items():
                if name in out.setdefault(collection, {}):
                    raise ValueError(f"two checkpoints both hold network '{name}'")
                out[collection][name] = value
    return out


def _write_models_entry(out_dir: str, key: str, files: Mapping[str, Mapping],
                        metas: Sequence[Mapping], priors_dir: str | None) -> list[str]:
    """Write ``files`` (name -> variables) into ``out_dir`` with the training voxel size in each,
    record ``metas`` under ``key`` in its ``architecture.json`` (kept entries of other kinds) and
    copy the label tables of ``priors_dir``. Returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    arch_path = os.path.join(out_dir, ARCHITECTURE_FILE)
    arch = {}
    if os.path.isfile(arch_path):
        with open(arch_path) as fh:
            arch = json.load(fh)
    written = []
    for name, variables in files.items():
        path = os.path.join(out_dir, name)
        save_keras_h5(variables, path, voxel_size=metas[0].get("voxel_size"))
        written.append(path)
    arch[key] = {m["model"]["prefix"]: architecture(m) for m in metas}
    with open(arch_path, "w") as fh:
        json.dump(arch, fh, indent=2)
    written.append(arch_path)
    if priors_dir:
        for table in sorted(glob.glob(os.path.join(priors_dir, "synthseg_*.npy"))):
            dest = os.path.join(out_dir, os.path.basename(table))
            shutil.copyfile(table, dest)
            written.append(dest)
    return written


def export_models_dir(sources: Mapping[str, Any], out_dir: str, priors_dir: str | None = None,
                      step: int | None = None) -> list[str]:
    """Write a models folder: ``sources`` maps a ``MODEL_FILES`` key ('1.0', '2.0', 'robust',
    'parc', 'qc') to a run folder (or, for 'robust', a list of the three stage runs). The label
    ``.npy`` tables are copied from ``priors_dir`` (default: the one the first run trained with),
    and ``architecture.json`` records each network's hyper-parameters. Returns the written paths.
    """
    written: list[str] = []
    for key, runs in sources.items():
        if key not in MODEL_FILES:
            raise ValueError(f"unknown network kind {key!r}; expected one of {sorted(MODEL_FILES)}")
        runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
        loaded = [load_model(r, step) for r in runs]
        for (_, meta), run in zip(loaded, runs):
            if meta["model"]["export"] != key:
                raise ValueError(f"{run}: this network is part of '{meta['model']['export']}', "
                                 f"not '{key}'")
        if key == "robust":
            prefixes = [m["model"]["prefix"] for _, m in loaded]
            if sorted(prefixes) != sorted(ROBUST_STAGES):
                raise ValueError(f"the robust cascade needs one run per stage {ROBUST_STAGES}, "
                                 f"got {prefixes}")
        if priors_dir is None:
            priors_dir = loaded[0][1].get("priors_dir")
        written += _write_models_entry(out_dir, key, {MODEL_FILES[key]: _merge([v for v, _ in loaded])},
                                       [m for _, m in loaded], priors_dir)
    return list(dict.fromkeys(written))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m synthseg_jax.training.checkpoint",
        description="Export a training checkpoint to a Keras .h5 file or a models folder.")
    parser.add_argument("run", nargs="+", help="run folder(s) (or their checkpoints/ folder); "
                        "three runs (unet, l2l, unet2) for --kind robust")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--h5", help="write this .h5 file (one run)")
    parser.add_argument("--models-dir", help="write / update this models folder")
    parser.add_argument("--kind", help="models-folder entry (default: the run's own)")
    parser.add_argument("--priors-dir", help="label tables to copy (default: the run's)")
    args = parser.parse_args(argv)
    if not args.h5 and not args.models_dir:
        parser.error("give --h5 and/or --models-dir")
    if args.h5:
        if len(args.run) != 1:
            parser.error("--h5 takes one run")
        meta = export_h5(args.run[0], args.h5, args.step)
        print(f"{args.h5}: {meta['model']['name']} at step {meta['step']}")
    if args.models_dir:
        kind = args.kind or load_model(args.run[0], args.step)[1]["model"]["export"]
        runs = args.run if kind == "robust" else args.run[0]
        for path in export_models_dir({kind: runs}, args.models_dir, args.priors_dir, args.step):
            print(path)


if __name__ == "__main__":
    main()
