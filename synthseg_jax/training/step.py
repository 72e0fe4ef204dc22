"""Train state, optimiser, initialisation and the jitted, data-parallel training step.

* :class:`TrainState` -- step, params, BatchNorm statistics, optimiser state, the run's RNG key
  (everything a checkpoint needs for an exact resume) and, optionally, an exponential moving
  average of the params: the weights validation and export use;
* :func:`make_optimizer` -- optax Adam with Keras' defaults and a learning-rate schedule of the
  run's global step (:func:`learning_rate`), with optional frozen layers for fine-tuning;
* :func:`init_variables` -- Keras' initialisation (Glorot-uniform kernels, zero biases, unit BN
  scales) drawn with NumPy on the shapes of ``jax.eval_shape(module.init)``: exact and fast (a
  jitted ``init`` with dozens of initialisers compiles for tens of seconds on CPU);
* :class:`Trainer` -- the jitted step per loss phase, sharded over a 1-D ``('data',)`` mesh of the
  local (or, after ``jax.distributed.initialize``, global) devices: the batch is split along its
  first axis, parameters and optimiser state are replicated. BatchNorm statistics are computed
  over the *global* batch (XLA inserts the cross-device reductions), so a step on N devices equals
  the single-device step on the same batch, and the moving averages follow Keras
  (``moving = 0.99 moving + 0.01 batch``; variance without Bessel's correction, which differs
  from TensorFlow's fused kernel by a factor n/(n-1) with n ~ 10^5-10^6 voxels).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from synthseg_jax.weights.models_dir import variable_shapes

DATA_AXIS = "data"


class TrainState(struct.PyTreeNode):
    step: jax.Array           # int32 scalar: optimisation steps done
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array            # uint32 key data of the run; step t uses fold_in(rng, t)
    ema_params: Any = None    # moving average of params (None: not kept)

    def variables(self) -> dict:
        """The weights being optimised."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def inference_variables(self) -> dict:
        """The weights to validate and export: the moving average when one is kept (with batch 1
        and a new contrast every step the raw weights jitter around a better average)."""
        params = self.params if self.ema_params is None else self.ema_params
        return {"params": params, "batch_stats": self.batch_stats}


# --------------------------------------------------------------------------- initialisation

def init_variables(module: nn.Module, in_channels: int, seed: int = 0, size: int = 16) -> dict:
    """Keras-style initial variables (NumPy draws; deterministic in ``seed``)."""
    shapes = flax.core.unfreeze(variable_shapes(module, in_channels, size))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        collection = path[0].key
        shape = leaf.shape
        if collection == "batch_stats":
            return np.ones(shape, np.float32) if name == "var" else np.zeros(shape, np.float32)
        if name == "kernel":
            receptive = int(np.prod(shape[:-2]))
            fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        if name == "scale":
            return np.ones(shape, np.float32)
        return np.zeros(shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    variables.setdefault("batch_stats", {})
    return variables


# --------------------------------------------------------------------------- optimiser

def _layer_names(tree: Mapping, path=()) -> dict:
    """Layer name (innermost dict holding arrays) of every leaf path."""
    out = {}
    for key, child in tree.items():
        if isinstance(child, Mapping):
            out.update(_layer_names(child, path + (key,)))
        else:
            out[path + (key,)] = path[-1] if path else key
    return out


def frozen_mask(params: Mapping, patterns: Sequence[str]) -> Any:
    """``True`` for the leaves of layers whose Keras name matches any regex in ``patterns``."""
    regexes = [re.compile(p) for p in patterns or ()]

    def mark(path, _):
        layer = [p.key for p in path][-2] if len(path) > 1 else path[-1].key
        return any(r.search(layer) for r in regexes)

    return jax.tree_util.tree_map_with_path(mark, params)


def keras_time_decay(lr: float, decay: float) -> optax.Schedule:
    """Keras' ``decay`` argument: ``lr / (1 + decay t)``."""
    return lambda step: lr / (1.0 + decay * step)


def learning_rate(name: str, lr: float, total_steps: int, decay: float = 0.0,
                  warmup_steps: int = 0, end_lr: float = 0.0, boundaries: Sequence[int] = (),
                  factor: float = 0.1) -> optax.Schedule:
    """The learning-rate schedule ``name`` (``configs/optim/adam.yaml`` describes each) as a
    function of the run's global step."""
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "time_decay":
        return keras_time_decay(lr, decay)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1),
                                                  end_lr)
    if name == "step":
        return optax.piecewise_constant_schedule(lr, {int(b): factor for b in boundaries})
    raise ValueError(f"unknown learning-rate schedule {name!r}")


def scale_by_global_step(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """``-schedule(step) * updates`` with ``step`` the run's global step, given to ``update`` as
    ``step=``. optax's own schedules count the updates of their transformation, which restart with
    the fresh Adam of the Dice phase; the global step does not, and a resume restores it. No
    state: a constant rate leaves the optimiser state as ``optax.adam(lr)``'s."""

    def update(updates, state, params=None, *, step, **extra):
        del params, extra
        step_size = -schedule(step)
        return jax.tree_util.tree_map(lambda g: step_size * g, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(lr: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-7, freeze: Sequence[str] = (), params: Any = None,
                   clip_norm: float | None = None) -> optax.GradientTransformationExtraArgs:
    """optax Adam with Keras' defaults (epsilon 1e-7); the rate (a number or a schedule of the
    global step) needs ``update(..., step=global_step)``, as :class:`Trainer` passes it.

    ``freeze``: regexes of layer names (e.g. ``'_downarm_[0-2]_'``) whose parameters stay fixed.
    """
    schedule = lr if callable(lr) else optax.constant_schedule(lr)
    tx = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), scale_by_global_step(schedule))
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if freeze:
        if params is None:
            raise ValueError("freezing layers needs the parameter tree")
        mask = frozen_mask(params, freeze)
        if not any(jax.tree_util.tree_leaves(mask)):
            raise ValueError(f"no layer matches the freeze pattern(s) {list(freeze)}")
        labels = jax.tree_util.tree_map(lambda m: "frozen" if m else "train", mask)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return optax.with_extra_args_support(tx)


def create_state(variables: Mapping, tx: optax.GradientTransformation, seed: int,
                 ema: bool = False) -> TrainState:
    """``ema``: keep a moving average of the params, starting from them."""
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      ema_params=jax.tree_util.tree_map(jnp.array, params) if ema else None)


# --------------------------------------------------------------------------- the step

def make_mesh(devices: Sequence | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (DATA_AXIS,))


class Trainer:
    """Jitted training/evaluation functions of one network on one mesh.

    ``loss_fn(phase, outputs, targets) -> scalar`` defines the phases (e.g. 'wl2', 'dice').
    ``frozen_stats``: regexes of BatchNorm layers whose moving statistics must not change.
    ``running_stats``: normalise with the moving statistics in training too, as inference does.
    With batch 1 and a random contrast per image, each image's own statistics differ from the
    averages, and a network that has learnt to lean on them scores far lower at inference; this
    trains the network that inference runs (the statistics then stay fixed).
    ``ema_decay``: each step moves a state's ``ema_params`` (when it has them) towards the new
    params, ``ema = decay ema + (1 - decay) params``.
    """

    def __init__(self, module: nn.Module, tx: optax.GradientTransformation,
                 loss_fn: Callable, mesh: Mesh | None = None, frozen_stats: Sequence[str] = (),
                 running_stats: bool = False, ema_decay: float = 0.0):
        self.module = module
        self.running_stats = running_stats
        self.ema_decay = float(ema_decay)
        self.tx = tx
        self.loss_fn = loss_fn
        self.mesh = mesh or make_mesh(jax.devices()[:1])
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.frozen_stats = tuple(frozen_stats)
        self._steps: dict[str, Callable] = {}
        self._apply = jax.jit(self._forward, out_shardings=self.batch_sharding)

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)

    def place_batch(self, x):
        return jax.device_put(x, self.batch_sharding)

    def _forward(self, variables, inputs):
        return self.module.apply(variables, inputs, train=False)

    def predict(self, variables, inputs):
        """Inference-mode outputs (moving BatchNorm statistics)."""
        return self._apply(variables, inputs)

    def _step(self, phase: str, state: TrainState, inputs, targets):
        def objective(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if self.running_stats:
                outputs = self.module.apply(variables, inputs, train=False)
                return self.loss_fn(phase, outputs, targets), state.batch_stats
            outputs, updates = self.module.apply(variables, inputs, train=True, mutable=["batch_stats"])
            return self.loss_fn(phase, outputs, targets), updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        if self.frozen_stats:
            mask = frozen_mask(batch_stats, self.frozen_stats)
            batch_stats = jax.tree_util.tree_map(lambda m, new, old: old if m else new,
                                                 mask, batch_stats, state.batch_stats)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, step=state.step)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - self.ema_decay)
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def step_fn(self, phase: str) -> Callable:
        """``(state, inputs, targets) -> (state, metrics)``, jitted once per phase; the input state
        is donated."""
        if phase not in self._steps:
            self._steps[phase] = jax.jit(
                lambda s, x, y: self._step(phase, s, x, y),
                in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding),
                out_shardings=(self.replicated, self.replicated), donate_argnums=0)
        return self._steps[phase]

    def step(self, phase: str, state: TrainState, inputs, targets):
        return self.step_fn(phase)(state, inputs, targets)

    def loss(self, phase: str, state: TrainState, inputs, targets, train: bool | None = None):
        """Loss of ``state`` on a batch without updating anything. ``train``: BatchNorm with the
        batch's own statistics; by default as the step normalises (so not with ``running_stats``)."""
        train = not self.running_stats if train is None else train
        key = ("loss", phase, train)
        if key not in self._steps:
            def f(s, x, y):
                if train:
                    outputs = self.module.apply(s.variables(), x, train=True,
                                                mutable=["batch_stats"])[0]
                else:
                    outputs = self.module.apply(s.variables(), x, train=False)
                return self.loss_fn(phase, outputs, y)
            self._steps[key] = jax.jit(f)
        return self._steps[key](state, inputs, targets)
