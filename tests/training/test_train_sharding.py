"""A data-parallel step on 2 (forced host) devices equals the single-device step on the same batch.

The check runs in a subprocess, since the device count is fixed when JAX starts."""

import json
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT, subprocess_env

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from synthseg_jax.nn.synthseg import Segmenter
    from synthseg_jax.nn.unet import UNetConfig
    from synthseg_jax.training import losses, step as st

    assert len(jax.devices()) == 2, jax.devices()
    module = Segmenter(UNetConfig(prefix="unet", n_labels=4, nb_features=4, nb_levels=3))
    variables = st.init_variables(module, 1, seed=0)
    loss_fn = lambda phase, out, y: losses.segmentation_loss(phase, out, y)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    x[1] = 2.0 * x[1] + 1.0          # the two items differ: BatchNorm must pool them across devices
    y = rng.integers(0, 4, (2, 16, 16, 16)).astype(np.int32)
    out = {}
    for n in (1, 2):
        tx = st.make_optimizer(1e-3)
        trainer = st.Trainer(module, tx, loss_fn, st.make_mesh(jax.devices()[:n]))
        state = trainer.place_state(st.create_state(variables, tx, 0))
        xs, ys = trainer.place_batch(x), trainer.place_batch(y)
        assert len(xs.sharding.device_set) == n
        curve = []
        for phase in ("wl2", "dice", "dice"):
            state, m = trainer.step(phase, state, xs, ys)
            curve.append(float(m["loss"]))
        assert len(state.params["unet"]["unet_likelihood"]["kernel"].sharding.device_set) == n
        leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(jax.device_get(state.variables()))]
        out[n] = (curve, leaves)
    diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
               for a, b in zip(out[1][1], out[2][1]))
    print(json.dumps({"loss1": out[1][0], "loss2": out[2][0], "max_rel_diff": diff}))
""")


def test_two_device_step_equals_single_device():
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    for a, b in zip(result["loss1"], result["loss2"]):
        assert abs(a - b) <= 1e-5 * abs(a), result
    assert result["max_rel_diff"] < 1e-4, result
