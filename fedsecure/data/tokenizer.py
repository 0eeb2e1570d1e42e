"""Tokenizers: the bundled byte-level BPE for the tiny presets, or a local model's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from fedsecure.errors import ModelError


@dataclass(frozen=True)
class TextTokenizer:
    """The little a site needs from a tokenizer: ``encode`` plus the special ids."""

    encode_fn: Callable[[str], list[int]]
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    name: str

    def encode(self, text: str, max_length: int) -> list[int]:
        """Token ids of ``text`` with BOS/EOS where the tokenizer has them, cut to ``max_length``."""
        ids = self.encode_fn(text)
        if self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids[:max_length]


BUNDLED_VOCAB_SIZE = 1024


@lru_cache(maxsize=1)
def bundled_tokenizer() -> TextTokenizer:
    """The byte-level BPE shipped in ``fedsecure/assets/tokenizer.json`` (no network)."""
    from tokenizers import Tokenizer

    path = resources.files("fedsecure") / "assets" / "tokenizer.json"
    tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    return TextTokenizer(encode_fn=lambda t: tok.encode(t).ids, vocab_size=tok.get_vocab_size(),
                         pad_id=tok.token_to_id("<pad>"), bos_id=tok.token_to_id("<s>"),
                         eos_id=tok.token_to_id("</s>"), name="fedsecure-bpe-1024")


@lru_cache(maxsize=4)
def local_tokenizer(model_dir: str) -> TextTokenizer:
    """The tokenizer saved beside a local Hugging Face model (``local_files_only``)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path {model_dir}: no usable tokenizer in that directory ({e}). "
                         "Fix: save the tokenizer beside the model (tokenizer.save_pretrained(dir)).") from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return TextTokenizer(encode_fn=lambda t: tok(t, add_special_tokens=False)["input_ids"],
                         vocab_size=len(tok), pad_id=pad, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                         name=Path(model_dir).name)
