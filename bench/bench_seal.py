"""Sealing cost: a 256 MiB adapter sealed/opened vs written/read as plain safetensors, same run.

    .venv/bin/python bench/bench_seal.py [--mib 256] [--repeats 3]

Plain: ``safetensors.numpy.save_file`` + fsync, and ``load_file``. Sealed: fedsecure's
``seal_tensors`` (streams tensors through chunked AES-256-GCM, temp file, fsync, rename) and
``open_tensors`` (decrypt into one buffer, arrays are views). Interleaved repeats, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedsecure.crypto import generate_keyring, open_tensors, seal_tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    per = 4 << 20  # 4 MiB tensors, like the LoRA A/B matrices of a large model's layers
    tensors = {f"base_model.model.layers.{i}.lora_{'AB'[i % 2]}.weight": rng.standard_normal(per // 4, np.float32)
               .reshape(-1, 1024) for i in range(args.mib * (1 << 20) // per)}
    size = sum(v.nbytes for v in tensors.values())
    ring = generate_keyring()
    t: dict[str, list[float]] = {"plain write": [], "plain read": [], "sealed write": [], "sealed read": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        plain, sealed = Path(tmp) / "a.safetensors", Path(tmp) / "a.safetensors.sealed"
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            save_file(tensors, str(plain))
            fd = os.open(plain, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            t["plain write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = load_file(str(plain))
            t["plain read"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            seal_tensors(sealed, tensors, ring)
            t["sealed write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            opened, _ = open_tensors(sealed, ring)
            t["sealed read"].append(time.perf_counter() - t0)
            assert all(np.array_equal(opened[k], back[k]) for k in list(tensors)[:3])
            del back, opened
    med = {k: statistics.median(v) for k, v in t.items()}
    mib = size / (1 << 20)
    print(f"# bench_seal: {mib:.0f} MiB adapter, {len(tensors)} tensors, {args.repeats} interleaved repeats")
    for k, v in med.items():
        print(f"{k:>13}: {v:6.3f} s  {mib / v:8.1f} MiB/s")
    print(f"sealing / plain write = {med['sealed write'] / med['plain write']:.2f}x   "
          f"opening / plain read = {med['sealed read'] / med['plain read']:.2f}x")


if __name__ == "__main__":
    main()
