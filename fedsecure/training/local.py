"""Local training and evaluation at a site.

The loss is computed **per sequence** (mean over that sequence's tokens) and then averaged over
the batch. HF's built-in ``labels=`` loss is a token mean over the whole batch, which makes
each record's gradient depend on the other records' lengths; under DP-SGD that breaks the
per-record sensitivity argument, so we never use it, private or not.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsecure.config import TrainSettings
from fedsecure.data.dataset import IGNORE_INDEX, TokenizedDataset, collate


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged within each sequence: shape ``(batch,)``."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(lb.shape)
    return tok.sum(1) / (lb != IGNORE_INDEX).sum(1).clamp(min=1)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""
    loss: float  # mean per-sequence loss over the steps
    steps: int
    examples: int  # records in the site's training set (the FedAvg weight)
    seconds: float


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (the LoRA weights)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Recompute each decoder layer in the backward pass instead of keeping its activations (``on``), for the
    duration of the block. Reentrant checkpointing: its first forward runs without autograd, so Opacus' hooks
    capture each layer's activations once, when it is recomputed, and per-sample gradients stay exact (``hooks``
    mode; the ``ew`` mode gets none, and the non-reentrant form loses most: tested).
    """
    if not on:
        yield
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.activation_checkpointing_enable({"use_reentrant": True})  # also makes the embeddings' output need grad
    try:
        yield
    finally:
        inner.activation_checkpointing_disable()
        inner.disable_input_require_grads()


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch on the model's device (batches are built on the CPU)."""
    device = next(model.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_local(model: torch.nn.Module, data: TokenizedDataset, settings: TrainSettings, *, pad_id: int,
                seed: int) -> TrainResult:
    """``settings.local_steps`` AdamW steps on uniformly drawn batches (non-private path)."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=settings.learning_rate,
                            weight_decay=settings.weight_decay)
    model.train()
    losses = []
    n = len(data)
    bs = min(settings.batch_size, n)
    with activation_checkpointing(model, settings.gradient_checkpointing):
        _steps(model, data, settings, opt, gen, bs, pad_id, losses)
    model.eval()
    return TrainResult(loss=sum(losses) / len(losses), steps=len(losses), examples=n,
                       seconds=time.perf_counter() - start)


def _steps(model: torch.nn.Module, data: TokenizedDataset, settings: TrainSettings, opt: torch.optim.Optimizer,
           gen: torch.Generator, bs: int, pad_id: int, losses: list[float]) -> None:
    n = len(data)
    for _ in range(settings.local_steps):
        idx = torch.randperm(n, generator=gen)[:bs].tolist()
        batch = to_device(collate([data[i] for i in idx], pad_id), model)
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = per_sequence_loss(out.logits, batch["labels"]).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenizedDataset, *, pad_id: int, batch_size: int = 32) -> tuple[float, int]:
    """Token-weighted mean next-token loss over ``data``; returns (loss, tokens scored)."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = to_device(collate(data.sequences[i:i + batch_size], pad_id), model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        lg, lb = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        total += float(loss)
        tokens += int((lb != IGNORE_INDEX).sum())
    return (total / tokens if tokens else math.nan), tokens
