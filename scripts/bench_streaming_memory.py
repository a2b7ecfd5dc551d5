"""Peak memory of a streamed file dataset at 1x and 10x the file size.

Writes an npz (or csv / tfrecord) of ``--rows`` x ``--features`` float32 and one 10 times
larger, then, each in a fresh subprocess, runs ``gradlab run`` for one epoch on it and reports
the child's peak RSS (``ru_maxrss``). Streaming means the two peaks are about equal.

    python scripts/bench_streaming_memory.py --rows 100000 --features 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys
import gradlab
cfg = json.loads(sys.argv[1])
gradlab.run(cfg, run_dir=sys.argv[2], quiet=True, verbose=0)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_file(path: Path, fmt: str, rows: int, features: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if fmt == "npz":
        x = np.lib.format.open_memmap(str(path) + ".x.npy", mode="w+", dtype=np.float32, shape=(rows, features))
        for i in range(0, rows, 100_000):
            n = min(100_000, rows - i)
            x[i:i + n] = rng.normal(size=(n, features))
        x.flush()
        y = (np.arange(rows) % 10).astype(np.int32)
        np.savez(path, x=x, y=y)
        del x
        os.unlink(str(path) + ".x.npy")
    elif fmt == "csv":
        with open(path, "w") as f:
            for i in range(0, rows, 50_000):
                n = min(50_000, rows - i)
                block = np.c_[rng.normal(size=(n, features)), (np.arange(i, i + n) % 10)]
                np.savetxt(f, block, delimiter=",", fmt="%.5g")
    else:
        from gradlab.data import write_tfrecord
        import tensorflow as tf

        with tf.io.TFRecordWriter(str(path)) as w:
            for i in range(rows):
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=rng.normal(size=features).tolist())),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 10]))}))
                w.write(ex.SerializeToString())


def measure(path: Path, fmt: str, run_dir: Path) -> dict:
    cfg = {"name": "bench", "data": {"name": fmt, "path": str(path), "batch_size": 1024, "classes": 10},
           "model": {"kind": "softmax_linear"}, "train": {"epochs": 1}, "diagnostics": []}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(run_dir)], capture_output=True,
                         text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = round(time.time() - t0, 1)
    res["file_mb"] = round(path.stat().st_size / 2**20, 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--format", choices=("npz", "csv", "tfrecord"), default="npz")
    p.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        results = {}
        for scale in (1, 10):
            path = d / f"data_{scale}x.{args.format}"
            write_file(path, args.format, args.rows * scale, args.features, seed=scale)
            results[scale] = measure(path, args.format, d / f"run_{scale}x")
            r = results[scale]
            print(f"{scale:>2}x: {args.rows * scale:>9} rows, file {r['file_mb']:>8.1f} MB, "
                  f"peak RSS {r['peak_rss_mb']:>7.1f} MB, {r['seconds']} s", flush=True)
            path.unlink()
        ratio = results[10]["peak_rss_mb"] / results[1]["peak_rss_mb"]
        print(f"peak RSS ratio 10x/1x: {ratio:.3f} (file size ratio 10)")


if __name__ == "__main__":
    main()
