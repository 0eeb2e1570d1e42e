"""Building the shipped pretrained base: ``deepseek-v3-tiny`` trained, non-privately, on the public corpus only.

Real users adapt a pretrained DeepSeek; adapting a randomly initialised toy understates what DP keeps. The base is
the tiny preset after full-parameter training on :func:`fedsecure.data.synth.public_corpus` (teaching notes from
institutions that are never a site, in house styles no site uses): it knows the clinical vocabulary and the shape
of a note, and leaves each site's hospital, style and specialty mix to learn. No site record is ever near it.

``fedsecure model pretrain --out DIR`` rebuilds it from nothing (seeded); the package ships the result as
``fedsecure/assets/deepseek-v3-tiny-clinical.safetensors``, loaded by :func:`fedsecure.model.presets.load_pretrained`
against its pinned SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class PretrainSettings:
    """How the shipped base was trained (written next to the weights as ``<name>.json``)."""

    preset: str = "deepseek-v3-tiny"
    records: int = 9600
    eval_records: int = 480
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    max_length: int = 96
    seed: int = 0


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(settings: PretrainSettings = PretrainSettings(),
             progress: Callable[[int, float], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train the preset's every weight on the public corpus; returns the model and a summary (losses, seconds)."""
    from fedsecure.data.dataset import TokenizedDataset, collate
    from fedsecure.data.synth import public_corpus
    from fedsecure.data.tokenizer import bundled_tokenizer
    from fedsecure.model.presets import build_base_model
    from fedsecure.training.local import evaluate, per_sequence_loss

    tok = bundled_tokenizer()
    texts = public_corpus(settings.records + settings.eval_records)
    train = TokenizedDataset.from_texts(texts[:settings.records], tok, settings.max_length)
    held = TokenizedDataset.from_texts(texts[settings.records:], tok, settings.max_length)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_base_model(settings.preset, settings.seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)

        def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < settings.warmup_steps:
                return (step + 1) / settings.warmup_steps
            frac = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        gen = torch.Generator().manual_seed(settings.seed)
        initial, _ = evaluate(model.eval(), held, pad_id=tok.pad_id)
        model.train()
        for step in range(settings.steps):
            idx = torch.randint(len(train), (settings.batch_size,), generator=gen).tolist()
            batch = collate([train[i] for i in idx], tok.pad_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = per_sequence_loss(out.logits, batch["labels"]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if progress is not None and (step + 1) % 100 == 0:
                progress(step + 1, float(loss))
        final, _ = evaluate(model.eval(), held, pad_id=tok.pad_id)
    summary = {"initial_eval_loss": initial, "final_eval_loss": final, "seconds": time.perf_counter() - t0,
               "torch": torch.__version__, "settings": asdict(settings)}
    return model.eval(), summary


def save_pretrained(model: torch.nn.Module, out_dir: str | Path, summary: dict,
                    name: str = "deepseek-v3-tiny-clinical") -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (settings, losses, digest) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"fedsecure": "pretrained on the public corpus only",
                                           "preset": summary["settings"]["preset"]})
    (out / f"{name}.json").write_text(json.dumps({**summary, "file": path.name, "sha256": _digest(path)},
                                                  indent=2) + "\n")
    return path
