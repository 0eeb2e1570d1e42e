"""Optional client-level DP at the coordinator: a second, separately reported guarantee.

Each accepted site update (its adapter delta, all tensors as one vector) is clipped to L2 norm
``S``; the clipped updates are summed, N(0, σ_c²S²) noise is added, and the sum is divided by
the number of sites asked to train this round (a fixed denominator, so one site's presence
changes the average by at most S / m). Weights by record count are *not* used here: they would
make one site's influence data-dependent.

Accounting: one Gaussian release per round, subsampled with q = sites asked / sites in the
federation, composed over rounds with the same accountant as the sites (PRV or RDP). With
``fraction_train = 1`` (every site every round) q = 1 and there is no amplification to argue
about; for q < 1 the Poisson-sampling bound is the usual approximation of fixed-size sampling
(as in TensorFlow Federated's DP-FedAvg).

With secure aggregation the coordinator cannot clip or noise one site's update: the sites do both
(:mod:`fedsecure.privacy.distributed`, the distributed discrete Gaussian), and each released round is
recorded here by :meth:`ClientLevelDP.record_distributed` as its zCDP ρ, for the number of sites whose noise
the sum holds.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedsecure.config import ClientDPSettings
from fedsecure.privacy import distributed
from fedsecure.privacy.accounting import Spend, epsilon_of


class ClientLevelDP:
    """Client-level DP at the coordinator: clip each site's update, noise the sum, account the rounds."""
    def __init__(self, settings: ClientDPSettings, accountant: str, seed: int | None = None) -> None:
        self.settings = settings
        self.accountant = accountant
        self.rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self.spends: list[Spend] = []
        self.distributed: list[dict] = []  # one entry a released round with noise added at the sites
        self.clipped_sites = 0
        self.updates_seen = 0

    def aggregate(self, deltas: list[dict[str, np.ndarray]], *, sampled: int, total: int) -> dict[str, np.ndarray]:
        """Clip each delta to S, sum, add noise, divide by ``sampled``; record the release."""
        s = self.settings.clip
        keys = sorted(deltas[0])
        acc = {k: np.zeros_like(deltas[0][k], dtype=np.float64) for k in keys}
        for d in deltas:
            norm = float(np.sqrt(sum(float(np.sum(np.square(d[k], dtype=np.float64))) for k in keys)))
            scale = min(1.0, s / norm) if norm > 0 else 1.0
            self.clipped_sites += int(scale < 1.0)
            self.updates_seen += 1
            for k in keys:
                acc[k] += d[k].astype(np.float64) * scale
        std = self.settings.noise_multiplier * s
        out = {k: ((acc[k] + self.rng.normal(0.0, std, size=acc[k].shape)) / sampled).astype(np.float32)
               for k in keys}
        self.spends.append(Spend(self.settings.noise_multiplier, min(1.0, sampled / total), 1))
        return out

    def record_distributed(self, rho: float, *, sites: int, sampled: int, sigma: float, gamma: float,
                           l2: float) -> None:
        """Record a round whose noise the sites added (distributed discrete Gaussian), released with ``sites``
        sites' inputs and noise in its sum.
        """
        self.distributed.append({"rho": float(rho), "sites_in_sum": int(sites), "sites_asked": int(sampled),
                                 "sigma_site": float(sigma), "gamma": float(gamma), "l2_bound": float(l2)})
        self.updates_seen += int(sites)

    def epsilon(self) -> float:
        """ε of every release so far (client-level guarantee); for distributed noise the larger of dp-accounting's
        and Opacus' conversion of the summed ρ.
        """
        if self.distributed:
            rhos = [r["rho"] for r in self.distributed]
            return max(distributed.epsilon(rhos, self.settings.delta),
                       distributed.independent_epsilon(rhos, self.settings.delta))
        return epsilon_of(self.spends, self.settings.delta, self.accountant)

    def summary(self) -> dict:
        """The client-level guarantee for the privacy report."""
        if self.distributed:
            rhos = [r["rho"] for r in self.distributed]
            by_dp_accounting = distributed.epsilon(rhos, self.settings.delta)  # each conversion once
            by_opacus = distributed.independent_epsilon(rhos, self.settings.delta)
            return {"enabled": True, "unit": "one site's entire contribution to a round",
                    "mechanism": "distributed discrete Gaussian: each site clips, rounds and adds its share of the "
                                 "noise; secure aggregation releases only the sum",
                    "epsilon": max(by_dp_accounting, by_opacus), "delta": self.settings.delta,
                    "clip": self.settings.clip, "noise_multiplier": self.settings.noise_multiplier,
                    "rounds": len(self.distributed),
                    "q": None, "accountant": "zCDP (Kairouz, Liu & Steinke 2021, Prop. 14), composed by dp-accounting "
                                             "RdpAccountant; no amplification by sampling claimed",
                    "zcdp_rho": float(sum(rhos)),
                    "epsilon_dp_accounting": by_dp_accounting, "epsilon_opacus": by_opacus,
                    "trust": "holds if every site in a sum added its share of the noise; sites that collude with "
                             "the coordinator can remove their own shares",
                    "per_round": list(self.distributed), "updates_seen": self.updates_seen}
        return {"enabled": True, "unit": "one site's entire contribution to a round",
                "mechanism": "Gaussian added by the coordinator to the sum of the clipped updates",
                "epsilon": self.epsilon() if self.spends else 0.0, "delta": self.settings.delta,
                "clip": self.settings.clip, "noise_multiplier": self.settings.noise_multiplier,
                "rounds": len(self.spends), "q": [s.q for s in self.spends][-1:] or None,
                "accountant": self.accountant, "updates_clipped": self.clipped_sites,
                "updates_seen": self.updates_seen}
