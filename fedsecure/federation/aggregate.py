"""Who trains a round, and how checked updates become one: sampling through Flower, FedAvg in site order.

fedsecure drives its own round loop (per-round persistence, per-site metrics, evaluation of the
initial adapter, retirement, privacy reporting), so it takes from Flower's ``FedAvg`` exactly the two
things it needs: node sampling (:func:`flwr.serverapp.strategy.strategy_utils.sample_nodes`, waiting
for the minimum number of nodes) and the weighted mean, computed here the way
``aggregate_arrayrecords`` does it (float32, weight factors w / sum w) but over the checked numpy
deltas directly and in site-name order, so the global adapter does not depend on the order the
engine delivered the replies in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes


def sample_sites(grid: Grid, fraction: float, min_sites: int) -> list[int]:
    """Node ids asked this round: ``fraction`` of the connected nodes, at least ``min_sites`` (waits for them)."""
    num_nodes = int(len(list(grid.get_node_ids())) * fraction)
    node_ids, _ = sample_nodes(grid, min_sites, max(num_nodes, min_sites))
    return list(node_ids)


@dataclass(frozen=True)
class Update:
    """One site's checked contribution to a round."""

    site: str
    weight: int  # its training records (attested when attestation is on)
    delta: dict[str, np.ndarray]


def weighted_mean(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """FedAvg: sum of w_i / sum(w) x delta_i, accumulated in site-name order (float32, as Flower's FedAvg)."""
    ordered = sorted(updates, key=lambda u: u.site)
    total = sum(u.weight for u in ordered)
    out: dict[str, np.ndarray] = {}
    for u in ordered:
        factor = u.weight / total
        for name, raw in u.delta.items():
            value = np.asarray(raw, dtype=np.float32)
            if name not in out:
                out[name] = value * factor
            else:
                out[name] += value * factor
    return out


@dataclass
class RoundLog:
    """What the coordinator learned in one round, per site."""

    server_round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    attestation: dict[str, str] = field(default_factory=dict)  # site -> "verified (...)" | "rejected: ..."

    def site(self, name: str) -> dict[str, Any]:
        """The metrics row of site ``name`` for this round (created on first use)."""
        return self.sites.setdefault(name, {"round": self.server_round, "site": name})

    def held_out_loss(self) -> float | None:
        """Token-weighted held-out loss over the sites that evaluated, or None."""
        pairs = [(e["eval_loss"], e["eval_tokens"]) for e in self.sites.values() if e.get("eval_tokens")]
        tokens = sum(t for _, t in pairs)
        return sum(loss * t for loss, t in pairs) / tokens if tokens else None
