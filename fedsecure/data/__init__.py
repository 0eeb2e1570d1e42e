"""Site datasets: JSONL records, tokenization, and synthetic clinical notes."""

