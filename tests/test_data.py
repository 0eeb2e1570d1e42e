"""Site data: deterministic synthesis, measurably non-IID sites, strict JSONL reading."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedsecure.data.dataset import IGNORE_INDEX, collate, load_site, read_jsonl
from fedsecure.data.synth import synthesize
from fedsecure.data.tokenizer import bundled_tokenizer
from fedsecure.errors import DataError


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (synthesize(tmp_path / n, sites=2, records_per_site=30, seed=s)
               for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert (a[1] / "train.jsonl").read_bytes() == (b[1] / "train.jsonl").read_bytes()
    assert (a[1] / "train.jsonl").read_bytes() != (c[1] / "train.jsonl").read_bytes()


def test_held_out_split_sizes(site_data):
    for i in range(3):
        assert len(_records(site_data / f"site-{i}" / "train.jsonl")) == 96
        assert len(_records(site_data / f"site-{i}" / "eval.jsonl")) == 24


def _tv(p: Counter, q: Counter) -> float:
    keys = set(p) | set(q)
    n_p, n_q = sum(p.values()), sum(q.values())
    return 0.5 * sum(abs(p[k] / n_p - q[k] / n_q) for k in keys)


def _js(p: Counter, q: Counter) -> float:
    keys = set(p) | set(q)
    n_p, n_q = sum(p.values()), sum(q.values())
    out = 0.0
    for k in keys:
        a, b = p[k] / n_p, q[k] / n_q
        m = (a + b) / 2
        out += 0.5 * (a * math.log(a / m) if a else 0) + 0.5 * (b * math.log(b / m) if b else 0)
    return out


def test_sites_are_non_iid(site_data):
    tok = bundled_tokenizer()
    spec, unigram, lengths = [], [], []
    for i in range(3):
        recs = _records(site_data / f"site-{i}" / "train.jsonl")
        spec.append(Counter(r["specialty"] for r in recs))
        unigram.append(Counter(t for r in recs for t in tok.encode(r["text"], 10_000)))
        lengths.append(sum(len(r["text"]) for r in recs) / len(recs))
    # specialty mixes differ strongly between every pair of sites
    for i in range(3):
        for j in range(i + 1, 3):
            assert _tv(spec[i], spec[j]) > 0.4, (i, j, spec[i], spec[j])
    # vocabulary differs more between sites than between a site's own train and eval halves
    own = Counter(t for r in _records(site_data / "site-0" / "eval.jsonl") for t in tok.encode(r["text"], 10_000))
    assert _js(unigram[0], unigram[1]) > 2 * _js(unigram[0], own)
    # note length distributions differ (house style, number of findings)
    assert max(lengths) - min(lengths) > 10


@pytest.mark.parametrize(("content", "needle"), [
    ('{"text": "ok"}\n{"text": \n', ":2: not valid JSON"),
    ('{"text": "ok"}\n{"txt": "x"}\n', ':2: each record needs a non-empty string field "text"'),
    ('{"text": ""}\n', ':1: each record needs a non-empty string field "text"'),
    ('[1, 2]\n', ":1: each record needs"),
    ("\n\n", "no records"),
])
def test_malformed_jsonl_names_file_line_and_fix(tmp_path, content, needle):
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_site_directory_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="fedsecure data synth"):
        load_site(tmp_path / "site-9", bundled_tokenizer(), 64)


def test_collate_pads_right_and_masks_labels():
    batch = collate([[1, 5, 6, 2], [1, 7, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"][1, 3].item() == IGNORE_INDEX
    assert torch.equal(batch["labels"][0], batch["input_ids"][0])


def test_bundled_tokenizer_is_byte_level_and_round_trips():
    tok = bundled_tokenizer()
    assert tok.vocab_size == 1024 and tok.pad_id == 0
    ids = tok.encode("Pt is a 45 year old — ünïcode ✓", 1000)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(tok.encode("x" * 500, 32)) == 32


def test_dataset_fingerprint_depends_on_content(tmp_path):
    d1 = synthesize(tmp_path / "a", sites=1, records_per_site=10, seed=1)[0]
    d2 = synthesize(tmp_path / "b", sites=1, records_per_site=10, seed=2)[0]
    tok = bundled_tokenizer()
    f1, f1b, f2 = (load_site(d, tok, 64).fingerprint for d in (d1, d1, d2))
    assert f1 == f1b and f1 != f2 and len(f1) == 64
