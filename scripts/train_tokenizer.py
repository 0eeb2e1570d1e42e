"""Train the bundled byte-level BPE tokenizer once; the result is committed.

    python scripts/train_tokenizer.py  # writes fedsecure/assets/tokenizer.json

Byte-level, so any UTF-8 text encodes (nothing is ever <unk>); trained on the synthetic
clinical corpus so the tiny presets see short sequences.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fedsecure.data.synth import corpus

VOCAB_SIZE = 1024
SPECIALS = ["<pad>", "<s>", "</s>"]


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    out = Path(__file__).resolve().parents[1] / "fedsecure" / "assets" / "tokenizer.json"
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
