"""train.distribute: mirrored on 2 logical CPU devices against a single device, same global batch.

One subprocess (logical devices must be configured before TensorFlow starts) runs the mirrored
experiment first, then the single-device one; both through ``gradlab.run`` with diagnostics.
Gradient clipping is on and active (a small ``clip_norm``), so per-replica clipping -- what
Keras 3's optimizer does under tf.distribute -- would make the runs differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from conftest import gradlab_cli

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import gradlab
    from gradlab.events import read_scalars
    out = {}
    base = {
        "seed": 5,
        # batches of 15 and a short last one: 2 replicas get 8 + 7 rows (uneven splits crashed,
        # and weighted replicas equally in the mean loss)
        "data": {"name": "synthetic", "samples": 95, "features": 6, "batch_size": 15, "standardize": True,
                 "validation_split": 0.25},
        "model": {"kind": "mlp", "hidden": [12], "activation": "sigmoid"},
        "train": {"epochs": 2, "optimizer": "momentum", "learning_rate": 0.5, "clip_norm": 0.05,
                  "loss": "cross_entropy"},
        "diagnostics": [{"type": "gradient_stats", "every": 1}, {"type": "activation_saturation", "every": 2}],
    }
    for name, extra in (("mirrored", {"distribute": "mirrored", "cpu_devices": 2}), ("single", {})):
        cfg = dict(base, name=name, train=dict(base["train"], **extra))
        r = gradlab.run(cfg, run_dir=sys.argv[1] + "/" + name, quiet=True, verbose=0)
        import h5py
        w = []
        with h5py.File(r.run_dir / "final.weights.h5") as f:
            f.visititems(lambda n, o: w.append(o[()].ravel().tolist()) if hasattr(o, "shape") else None)
        out[name] = {"replicas": r.metrics["replicas"], "scalars": read_scalars(r.run_dir, "train"),
                     "weights": w, "loss": r.metrics["loss"], "val_loss": r.metrics["val_loss"]}
    print(json.dumps(out))
''')


def test_mirrored_two_cpus_matches_single_device(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    mirrored, single = out["mirrored"], out["single"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    ms, ss = mirrored["scalars"], single["scalars"]
    grad_tags = {t for t in ss if t.startswith("gradients/")}
    act_tags = {t for t in ss if t.startswith("activations/")}
    assert "gradients/global_norm" in grad_tags and "gradients/hidden_1/kernel/norm" in grad_tags
    assert act_tags, "activation_saturation wrote nothing"
    assert set(ms) == set(ss)
    for tag in sorted(grad_tags | act_tags | {"step/loss", "step/loss_last", "epoch_loss"} & set(ss)):
        got, want = np.array(ms[tag]), np.array(ss[tag])
        np.testing.assert_array_equal(got[:, 0], want[:, 0], err_msg=tag)
        # statistics of the global (all-reduced) gradient; loss not scaled by 1/replicas
        np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=1e-5, atol=1e-7, err_msg=tag)
    # clipping was active and applied to the global gradient: same weights after 6 clipped steps
    assert max(v for _, v in ss["gradients/global_norm"]) > 0.05 * 2
    for a, b in zip(mirrored["weights"], single["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(mirrored["val_loss"], single["val_loss"], rtol=1e-5)


def test_mirrored_on_one_device_with_the_default_diagnostics(tmp_path):
    # One replica under a strategy: the nonfinite guard's skip must not put optimizer.apply (a
    # merge_call under tf.distribute) inside a tf.cond.
    config = tmp_path / "one.yaml"
    config.write_text("name: one\ndata: {name: iris, batch_size: 32}\ntrain: {epochs: 1, distribute: mirrored}\n")
    proc = gradlab_cli("run", str(config), "--run-dir", str(tmp_path / "run"), "--quiet",
                       env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["replicas"] == 1
