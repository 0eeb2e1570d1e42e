"""Local training: a per-sequence loss, and training that actually learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsecure.config import LoraSettings, ModelSettings, TrainSettings
from fedsecure.data.dataset import collate, load_site
from fedsecure.model import attach_lora, load_model_and_tokenizer
from fedsecure.training.local import evaluate, per_sequence_loss, train_local


def test_per_sequence_loss_is_the_mean_over_each_sequences_own_tokens():
    torch.manual_seed(0)
    seqs = [[1, 4, 5, 6, 7, 2], [1, 9, 2]]
    batch = collate(seqs, pad_id=0)
    logits = torch.randn(2, 6, 16)
    got = per_sequence_loss(logits, batch["labels"])
    for i, s in enumerate(seqs):
        n = len(s)
        want = F.cross_entropy(logits[i, : n - 1], torch.tensor(s[1:]))
        assert torch.allclose(got[i], want, atol=1e-6)


def test_a_records_loss_does_not_depend_on_its_batch_mates():
    # The DP sensitivity argument needs this: HF's batch-wide token mean would violate it.
    base, tok = load_model_and_tokenizer(ModelSettings())
    model = attach_lora(base, LoraSettings(r=4))
    a, b, c = [1, 50, 60, 70, 2], [1, 80, 2], [1] + list(range(100, 140)) + [2]
    with torch.no_grad():
        l_ab = per_sequence_loss(model(**{k: v for k, v in collate([a, b], 0).items() if k != "labels"}).logits,
                                 collate([a, b], 0)["labels"])
        l_ac = per_sequence_loss(model(**{k: v for k, v in collate([a, c], 0).items() if k != "labels"}).logits,
                                 collate([a, c], 0)["labels"])
    assert torch.allclose(l_ab[0], l_ac[0], atol=1e-5)


def test_local_training_lowers_held_out_loss(site_data):
    base, tok = load_model_and_tokenizer(ModelSettings())
    torch.manual_seed(0)
    model = attach_lora(base, LoraSettings(r=8))
    site = load_site(site_data / "site-0", tok, 64)
    before, tokens = evaluate(model, site.eval, pad_id=tok.pad_id)
    res = train_local(model, site.train, TrainSettings(local_steps=12, batch_size=16, learning_rate=1e-2),
                      pad_id=tok.pad_id, seed=0)
    after, _ = evaluate(model, site.eval, pad_id=tok.pad_id)
    assert res.steps == 12 and res.examples == 96 and tokens > 0
    assert after < before - 0.5, (before, after)
