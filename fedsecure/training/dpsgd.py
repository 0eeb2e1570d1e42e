"""DP-SGD at a site with Opacus: Poisson sampling, per-record clipping, Gaussian noise, LoRA only.

We use Opacus' building blocks directly instead of ``PrivacyEngine.make_private``: a
``GradSampleModule`` (per-sample gradients), a ``DPOptimizer`` (clip to ``max_grad_norm``, add
N(0, σ²C²), average over the *expected* batch size) and our own Poisson sampler, because
accounting lives in the site's privacy ledger (not in an engine that a restart would forget),
and because a cached model must be wrapped and unwrapped cleanly every round.

* The loss is per sequence (:func:`fedsecure.training.local.per_sequence_loss`), so each record's
  gradient depends on that record only.
* An empty Poisson batch still takes a noise-only step, and that step is accounted.
* No gradient checkpointing: it re-fires Opacus' hooks and corrupts per-sample gradients.
* Randomness: Poisson sampling and noise come from a :mod:`fedsecure.privacy.noise` source: the
  operating system's secure generator at every deployed site; a known seed only at simulated sites
  that ask for one (reproducible tests: anyone who knows the seed can subtract the noise).
"""

from __future__ import annotations

import time
import warnings

import torch

from fedsecure.config import TrainSettings
from fedsecure.data.dataset import TokenizedDataset, collate
from fedsecure.privacy.guard import DPStepPlan
from fedsecure.privacy.noise import Randomness, SeededRandomness
from fedsecure.training.local import (
    TrainResult,
    activation_checkpointing,
    per_sequence_loss,
    to_device,
    trainable_parameters,
)

GRAD_SAMPLE_MODES = ("hooks", "ew")


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` in Opacus' per-sample gradient module: ``hooks`` (GradSampleModule) or ``ew`` (expanded weights)."""
    if mode == "ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights

        return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
    from opacus import GradSampleModule

    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)


def unwrap(gsm: torch.nn.Module, model: torch.nn.Module) -> None:
    """Remove Opacus' hooks and per-sample attributes from ``model``, so the cached model is clean again."""
    if hasattr(gsm, "_close"):
        gsm._close()  # removes hooks and grad_sample attributes (GradSampleModule)
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "_current_grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


def _dp_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings, plan: DPStepPlan, expected: float,
                  randomness: Randomness, *, distributed: bool = False, compression: str = "none",
                  bucket: bool = True):
    """Opacus' DPOptimizer (clip, sum, noise, average over the expected batch) whose noise is ``randomness``'s;
    ``distributed``: its DistributedDPOptimizer (noise on rank 0 only, then one SUM all-reduce, divided by the
    world size). ``draws`` counts the noise tensors drawn by this process.

    Distributed, the gradients travel in one bucket (``bucket``; Opacus' own sends one all-reduce per tensor).
    ``compression="bf16"``: the all-reduce's two halves, the reduce-scatter in float32 (each rank gets its share
    of the exact sum, rank 0's noise included) and the all-gather in bfloat16 (each share of the noised mean,
    rounded): 3/4 of the bytes of a float32 all-reduce. The rounding happens after the noise covers the exact sum,
    so it is post-processing: the per-record bound C and the accounting are unchanged. (Rounding each rank's
    partial sum before they are combined, as an all-reduce in bf16 does, has no per-record bound at all.)
    """
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    base = DistributedDPOptimizer if distributed else DPOptimizer

    class _Optimizer(base):  # type: ignore[valid-type,misc]
        draws = 0

        def add_noise(self) -> None:  # Opacus' add_noise, with the noise drawn from our source (rank 0 only)
            if distributed and self.rank != 0:  # as DistributedDPOptimizer: the other ranks add none
                for p in self.params:
                    p.grad = p.summed_grad.view_as(p)
                return
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = randomness.gaussian(p.summed_grad, self.noise_multiplier * self.max_grad_norm)
                self.draws += 1
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

        def reduce_gradients(self) -> None:
            if not bucket and compression == "none":
                return super().reduce_gradients()
            _reduce_bucket([p.grad for p in self.params if p.requires_grad], self.rank, self.world_size, compression)
            return None

    inner = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return _Optimizer(inner, noise_multiplier=plan.sigma, max_grad_norm=plan.max_grad_norm,
                      expected_batch_size=expected, loss_reduction="mean")


def _reduce_bucket(grads: list[torch.Tensor], rank: int, world: int, compression: str) -> None:
    """Every rank's ``grads`` become the mean over ranks (in place), sent as one flat tensor."""
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads])
    if compression == "bf16":  # an all-reduce's two halves, the second in bfloat16
        n = flat.numel()
        flat = torch.nn.functional.pad(flat, (0, -n % world))
        mine = torch.empty(flat.numel() // world, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(mine, flat)  # float32: this rank's share of the exact sum, noise included
        half = torch.empty(flat.numel(), dtype=torch.bfloat16, device=flat.device)
        dist.all_gather_into_tensor(half, (mine / world).to(torch.bfloat16))  # rounded after the noise
        flat = half[:n].to(flat.dtype)
    else:
        dist.all_reduce(flat)
        flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def dp_steps(gsm: torch.nn.Module, opt, params: list[torch.nn.Parameter], data: TokenizedDataset,
             indices: list[int], plan: DPStepPlan, randomness: Randomness, *, pad_id: int, grad_sample_mode: str
             ) -> list[tuple[float, int]]:
    """``plan.steps`` DP-SGD steps, each on a Poisson sample (rate ``plan.q``) of ``indices``; returns each step's
    (sum of per-sequence losses, records sampled). An empty sample still steps: noise only.
    """
    per_step: list[tuple[float, int]] = []
    for _ in range(plan.steps):
        mask = randomness.poisson_mask(len(indices), plan.q) if indices else torch.zeros(0, dtype=torch.bool)
        picked = [indices[i] for i in mask.nonzero().flatten().tolist()]
        opt.zero_grad(set_to_none=True)
        if not picked:
            # Empty Poisson batch: the HF forward cannot take 0 rows; a noise-only step keeps the
            # mechanism (and its accounting) exactly the sampled Gaussian one.
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            per_step.append((0.0, 0))
        else:
            batch = to_device(collate([data[i] for i in picked], pad_id), gsm)
            if grad_sample_mode == "ew":
                out = gsm(batch["input_ids"], attention_mask=batch["attention_mask"])
            else:
                out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            per_seq = per_sequence_loss(out.logits, batch["labels"])
            with warnings.catch_warnings():
                # Opacus' full backward hooks note that the token ids need no gradient: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients",
                                        category=UserWarning)
                per_seq.mean().backward()
            per_step.append((float(per_seq.detach().sum()), len(picked)))
        opt.step()
    return per_step


def mean_loss(per_step: list[tuple[float, int]]) -> float:
    """The mean over the steps that sampled records of each step's mean per-sequence loss (NaN if none did)."""
    means = [total / count for total, count in per_step if count]
    return sum(means) / len(means) if means else float("nan")


def train_private(model: torch.nn.Module, data: TokenizedDataset, settings: TrainSettings, plan: DPStepPlan, *,
                  pad_id: int, randomness: Randomness | int, grad_sample_mode: str = "hooks") -> TrainResult:
    """Run ``plan.steps`` DP-SGD steps on the LoRA parameters of ``model`` (a PEFT model).

    ``randomness`` draws the Poisson samples and the noise (an int is a test seed: :class:`SeededRandomness`).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}; got {grad_sample_mode!r}")
    if isinstance(randomness, int):
        randomness = SeededRandomness(randomness)
    start = time.perf_counter()
    params = trainable_parameters(model)
    n = len(data)
    expected = max(1, round(plan.q * n))
    if settings.gradient_checkpointing and grad_sample_mode != "hooks":
        raise ValueError("gradient checkpointing needs grad_sample_mode hooks: ew computes no per-sample gradient "
                         "when layers are recomputed")
    gsm = wrap(model, grad_sample_mode)
    opt = _dp_optimizer(params, settings, plan, expected, randomness)
    model.train()
    try:
        with activation_checkpointing(model, settings.gradient_checkpointing):
            per_step = dp_steps(gsm, opt, params, data, list(range(n)), plan, randomness, pad_id=pad_id,
                                grad_sample_mode=grad_sample_mode)
    finally:
        unwrap(gsm, model)
        model.eval()
    return TrainResult(loss=mean_loss(per_step), steps=plan.steps, examples=n, seconds=time.perf_counter() - start)
