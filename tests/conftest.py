"""Shared fixtures: small synthetic site data and small configs (CPU only, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the audit hook of tests/net.py in this process too (inactive until a test sets FEDSECURE_NET_LOG)
__import__("runpy").run_path(str(Path(__file__).resolve().parent / "netguard" / "sitecustomize.py"))

from fedsecure.config import SimulationConfig  # noqa: E402
from fedsecure.data.synth import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic hospitals, 120 records each (96 train / 24 eval)."""
    d = tmp_path_factory.mktemp("sites")
    synthesize(d, sites=3, records_per_site=120, eval_fraction=0.2, seed=7)
    return d


def small_config(data_dir: Path | None = None, **sections: dict) -> SimulationConfig:
    """A quick config: 2 sites, 1 round, 4 local steps, DP on with a fixed noise seed; override by section
    (the ``site`` section's ``privacy`` is merged one level deeper, so a test can raise one policy key)."""
    base: dict = {
        "seed": 3,
        "federation": {"sites": 2, "rounds": 1},
        "data": {"dir": str(data_dir) if data_dir else None, "records_per_site": 60, "max_length": 64},
        # the random preset and the learning rate these tests were calibrated with (the shipped defaults, the
        # pretrained base and lr 0.005, are exercised by the demo and deployment tests)
        "model": {"preset": "deepseek-v3-tiny"},
        "train": {"local_steps": 4, "batch_size": 8, "learning_rate": 0.01},
        # reproducible tests: simulated sites with a known noise seed (a deployed site refuses one and draws
        # its noise from the operating system's secure generator)
        "site": {"noise_seed": 5},
    }
    for name, values in sections.items():
        if name == "site" and "privacy" in values:
            values = {**values, "privacy": {**base["site"].get("privacy", {}), **values["privacy"]}}
        base.setdefault(name, {}).update(values)
    return SimulationConfig.from_mapping(base)


def per_example_gradients(model, seqs: list[list[int]], params: list) -> list[list]:
    """Each record's gradient by plain autograd, one record at a time: the reference for per-sample gradients."""
    from fedsecure.data.dataset import collate
    from fedsecure.training.local import per_sequence_loss

    reference = []
    for s in seqs:
        b = collate([s], 0)
        model.zero_grad()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        per_sequence_loss(out.logits, b["labels"]).sum().backward()
        reference.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    return reference


def global_adapter(run_dir: Path, server_round: int):
    """The sealed global adapter of a finished run, opened with the run's coordinator keyring."""
    from fedsecure.crypto import read_keyring_file
    from fedsecure.store.rundir import RunDir

    ring_file = Path(run_dir) / "keys" / "coordinator.keyring.json"
    ring = read_keyring_file(ring_file) if ring_file.exists() else None
    return RunDir(run_dir, ring).load_global_adapter(server_round)


def site_ledger_entries(site_state: Path) -> list[dict]:
    """A site's ledger entries (sealed or not), opened with the site's own keyring."""
    import json

    from fedsecure.crypto import open_bytes, read_keyring_file

    site_state = Path(site_state)
    files = list(site_state.glob("privacy-ledger-*"))
    assert len(files) == 1, files
    if files[0].name.endswith(".sealed"):
        ring = read_keyring_file(site_state.parent / "keys" / f"{site_state.name}.keyring.json")
        text = open_bytes(files[0], ring)[0].decode()
    else:
        text = files[0].read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]
