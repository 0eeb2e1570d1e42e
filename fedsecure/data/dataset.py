"""Site datasets: JSONL files of ``{"text": ...}`` records, one record = one patient document.

A record is the privacy unit, so a site's dataset is a list of independent token sequences;
batches are padded on the right with ``attention_mask`` 0 and label -100 on padding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsecure.data.tokenizer import TextTokenizer
from fedsecure.errors import DataError

IGNORE_INDEX = -100
MAX_RECORD_BYTES = 1 << 20  # a single clinical note over 1 MiB is almost surely a broken file


def read_jsonl(path: str | Path) -> list[str]:
    """Texts of a JSONL file; every line must be an object with a non-empty string ``text``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file {p} does not exist. Fix: point data.dir at a folder with "
                        "site-<i>/train.jsonl and site-<i>/eval.jsonl, or run `fedsecure data synth`.")
    texts: list[str] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if len(raw) > MAX_RECORD_BYTES:
                raise DataError(f"{p}:{lineno}: record is {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte limit.")
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e}). Fix: one JSON object per line, "
                                'like {"text": "..."}.') from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
                raise DataError(f'{p}:{lineno}: each record needs a non-empty string field "text".')
            texts.append(rec["text"])
    if not texts:
        raise DataError(f"{p}: no records. A site needs at least one record to train or evaluate.")
    return texts


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the files' bytes: identifies a dataset independently of any run."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Token id sequences, one per record."""

    sequences: list[list[int]]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> list[int]:
        return self.sequences[i]

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: TextTokenizer, max_length: int) -> TokenizedDataset:
        """Tokenize ``texts`` (truncated to ``max_length``); sequences under 2 tokens are dropped."""
        seqs = [tokenizer.encode(t, max_length) for t in texts]
        return cls([s for s in seqs if len(s) >= 2] or seqs)

    @property
    def num_tokens(self) -> int:
        """Tokens over all sequences."""
        return sum(len(s) for s in self.sequences)


def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Labels equal inputs, with -100 where there is padding."""
    n = len(sequences)
    width = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class SiteData:
    """A site's training and held-out datasets, tokenized."""

    train: TokenizedDataset
    eval: TokenizedDataset
    fingerprint: str
    path: Path


def site_dir(data_dir: str | Path, partition_id: int) -> Path:
    """``<data_dir>/site-<i>``: the data folder of simulated site ``i``."""
    return Path(data_dir) / f"site-{partition_id}"


def load_site(directory: str | Path, tokenizer: TextTokenizer, max_length: int) -> SiteData:
    """A site's training and held-out splits, tokenized (DataError names a missing or broken file)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"site data directory {d} does not exist. Fix: create it with "
                        "`fedsecure data synth --sites N --out DIR` or set data.dir to the right folder.")
    train_p, eval_p = d / "train.jsonl", d / "eval.jsonl"
    train = TokenizedDataset.from_texts(read_jsonl(train_p), tokenizer, max_length)
    held = TokenizedDataset.from_texts(read_jsonl(eval_p), tokenizer, max_length)
    return SiteData(train=train, eval=held, fingerprint=fingerprint([train_p]), path=d)
