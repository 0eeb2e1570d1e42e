"""Conversions between adapter states (name -> numpy array) and Flower records."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An adapter state as a Flower ArrayRecord (float32, contiguous)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A Flower ArrayRecord as an adapter state (name -> numpy array)."""
    return {k: record[k].numpy() for k in record}
