"""Peak host memory of loading a local sharded checkpoint, in its dtype vs upcast to float32.

    .venv/bin/python bench/bench_load.py [--hidden 768] [--layers 12] [--shard 50MB]

Writes a random ~120 M-parameter Qwen2 model (the R1-Distill-Qwen architecture, smaller) as a sharded
bfloat16 safetensors checkpoint, then loads it with fedsecure's loader (``local_files_only``) in fresh
processes: with ``model.dtype: bfloat16`` (read in its dtype) and with ``float32`` (the only way before
``model.dtype``: the baseline). Prints each process's peak RSS growth over its state after the imports, as a
ratio to the checkpoint's size on disk (goal: <= 1.3x in its dtype). Every weight is read once after loading
(one value a page suffices), since safetensors maps the files and untouched pages are not resident.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mib() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike getrusage's maxrss, which a child inherits)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def load(path: str, dtype: str) -> dict:
    import torch
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401 - the libraries' own pages are not the checkpoint's

    from fedsecure.model.presets import load_local_model, torch_dtype

    torch.zeros(1)
    before = _rss_mib()
    model = load_local_model(path, torch_dtype(dtype))
    for p in model.parameters():  # read every weight once, as training does (mapped pages become resident)
        p.detach().view(-1)[:: max(1, 4096 // p.element_size())].float().sum()
    peak = _rss_mib()
    params = sum(p.numel() for p in model.parameters())
    return {"dtype": dtype, "peak_growth_mib": peak - before, "params": params,
            "param_dtype": str(next(model.parameters()).dtype)}


def write(out: Path, hidden: int, layers: int, shard: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=32_000, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=shard)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shard", default="50MB")
    ap.add_argument("--load", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        print(json.dumps(load(*args.load)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        size = write(Path(tmp), args.hidden, args.layers, args.shard)
        shards = len(list(Path(tmp).glob("*.safetensors")))
        rows = {}
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, __file__, "--load", tmp, dtype], capture_output=True, text=True,
                                 check=True)
            rows[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = size / 2**20
    print(f"# bench_load: a {rows['bfloat16']['params'] / 1e6:.0f} M-parameter Qwen2 checkpoint, bfloat16, "
          f"{shards} shards, {mib:.0f} MiB on disk")
    print("| loaded as | parameters in | peak RSS growth | x checkpoint size |")
    print("|---|---|---|---|")
    for dtype, label in (("float32", "float32 (baseline: before model.dtype)"), ("bfloat16", "bfloat16 (its dtype)")):
        r = rows[dtype]
        print(f"| {label} | {r['param_dtype']} | {r['peak_growth_mib']:.0f} MiB | {r['peak_growth_mib'] / mib:.2f} |")


if __name__ == "__main__":
    main()
