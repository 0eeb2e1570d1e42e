"""Shared fixtures: small synthetic site data and small configs (CPU only, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedsecure.config import SimulationConfig  # noqa: E402
from fedsecure.data.synth import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic hospitals, 120 records each (96 train / 24 eval)."""
    d = tmp_path_factory.mktemp("sites")
    synthesize(d, sites=3, records_per_site=120, eval_fraction=0.2, seed=7)
    return d


def small_config(data_dir: Path | None = None, **sections: dict) -> SimulationConfig:
    """A quick config: 2 sites, 1 round, 4 local steps, DP on with a fixed noise seed; override by section."""
    base: dict = {
        "seed": 3,
        "federation": {"sites": 2, "rounds": 1},
        "data": {"dir": str(data_dir) if data_dir else None, "records_per_site": 60, "max_length": 64},
        "train": {"local_steps": 4, "batch_size": 8},
        # reproducible tests: a known noise seed (never in production, where OS entropy is used)
        "privacy": {"noise_seed": 5},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return SimulationConfig.from_mapping(base)
