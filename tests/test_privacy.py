"""Differential privacy: exact per-sample gradients, sound accounting, the ledger, fail-closed budgets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsecure.config import LoraSettings, ModelSettings, PrivacySettings, TrainSettings
from fedsecure.data.dataset import TokenizedDataset, collate
from fedsecure.errors import ConfigError, LedgerError
from fedsecure.model import adapter_state, attach_lora, load_model_and_tokenizer, set_adapter_state
from fedsecure.privacy.accounting import Spend, calibrate_noise, default_delta, epsilon_of
from fedsecure.privacy.guard import Approval, DPStepPlan, Refusal, SitePrivacyGuard
from fedsecure.privacy.ledger import PrivacyLedger, ledger_path
from fedsecure.privacy.policy import Terms
from fedsecure.training.dpsgd import train_private, unwrap, wrap
from fedsecure.training.local import per_sequence_loss

from .conftest import per_example_gradients

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("mode", ["ew", "hooks"])
def test_opacus_per_sample_gradients_match_per_example_autograd(mode):
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(ModelSettings())
    model = attach_lora(base, LoraSettings(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make every gradient path non-trivial
            p.data.normal_(0, 0.05)
    seqs = [[1, *torch.randint(3, 1000, (n,)).tolist(), 2] for n in (5, 14, 2, 9)]  # padded, variable length
    params = [p for p in model.parameters() if p.requires_grad]
    reference = per_example_gradients(model, seqs, params)
    gsm = wrap(model, mode)
    b = collate(seqs, 0)
    if mode == "ew":
        out = gsm(b["input_ids"], attention_mask=b["attention_mask"])
    else:
        out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    per_sequence_loss(out.logits, b["labels"]).mean().backward()
    try:
        for j, p in enumerate(params):
            assert p.grad_sample.shape[0] == len(seqs)
            for i in range(len(seqs)):
                torch.testing.assert_close(p.grad_sample[i], reference[i][j], rtol=1e-4, atol=1e-6)
    finally:
        unwrap(gsm, model)


# --------------------------------------------------------------------------- accounting
def _google_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
                                             steps))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), [
    (1.0, 0.01, 1000, 1e-5),
    (1.2, 16 / 192, 48, 1e-5),
    (0.8, 0.05, 200, 1e-6),
    (2.0, 0.1, 100, 1e-5),
    (1.0, 1.0, 10, 1e-5),  # no subsampling
])
def test_epsilon_agrees_with_google_dp_accounting(sigma, q, steps, delta):
    pld = _google_pld(sigma, q, steps, delta)
    prv = epsilon_of([Spend(sigma, q, steps)], delta, "prv")
    rdp = epsilon_of([Spend(sigma, q, steps)], delta, "rdp")
    # never below the independent PLD bound by more than the discretisation errors, and tight above it
    assert prv >= pld - 0.02, (prv, pld)
    assert prv <= pld * 1.05 + 0.02, (prv, pld)
    assert rdp >= pld - 0.02  # RDP is a looser, still valid, bound


def test_composition_of_rounds_equals_one_long_run():
    one = epsilon_of([Spend(1.1, 0.05, 300)], 1e-5)
    split = epsilon_of([Spend(1.1, 0.05, 100)] * 3, 1e-5)
    assert split == pytest.approx(one, rel=1e-9)
    assert epsilon_of([], 1e-5) == 0.0


@pytest.mark.parametrize("name", ["gdp", "gaussian"])
def test_gaussian_clt_accountant_is_refused(name):
    with pytest.raises(ConfigError, match="can under-report"):
        PrivacySettings(accountant=name).validate("privacy")
    with pytest.raises(ConfigError, match="can under-report"):
        epsilon_of([Spend(1.0, 0.1, 10)], 1e-5, name)


def test_default_delta():
    assert default_delta(1000) == 1e-5
    assert default_delta(192) == 1e-5
    assert default_delta(10) == 1e-5  # capped
    assert default_delta(1_000_000) == pytest.approx(1e-7)  # 1/(10 N) once N is large


@settings(max_examples=6, deadline=None)
@given(eps=st.floats(0.5, 8.0), q=st.floats(0.01, 0.3), steps=st.integers(5, 200),
       prior=st.sampled_from([0, 1]))
def test_calibrated_sigma_never_overshoots(eps, q, steps, prior):
    spent = [Spend(3.0, q, 20)] * prior
    sigma = calibrate_noise(epsilon_budget=eps, delta=1e-5, spent=spent, q=q, steps=steps, accountant="prv")
    if sigma is None:  # the prior spend alone may exceed a small target
        assert epsilon_of([*spent, Spend(64.0, q, steps)], 1e-5) > eps
        return
    reached = epsilon_of([*spent, Spend(sigma, q, steps)], 1e-5, "prv")
    assert reached <= eps
    assert reached >= eps - 0.05 or sigma == pytest.approx(0.3)  # and it does not waste budget


def test_calibration_reports_an_exhausted_budget():
    assert calibrate_noise(epsilon_budget=0.5, delta=1e-5, spent=[Spend(0.5, 0.5, 100)], q=0.1, steps=10) is None


# --------------------------------------------------------------------------- ledger
def _ledger(tmp_path, n=3, dataset="ab" * 32) -> PrivacyLedger:
    led = PrivacyLedger.open(tmp_path, dataset)
    for r in range(1, n + 1):
        spends = [*led.spends, Spend(1.0, 0.1, 10)]
        led.append(run_id="run", server_round=r, spend=Spend(1.0, 0.1, 10), delta=1e-5, accountant="prv",
                   max_grad_norm=1.0, epsilon_after=epsilon_of(spends, 1e-5), epsilon_budget=10.0)
    return led


def test_ledger_replays_and_continues(tmp_path):
    led = _ledger(tmp_path)
    again = PrivacyLedger.open(tmp_path, led.dataset)
    assert len(again.entries) == 3 and again.head == led.head
    assert again.epsilon(1e-5, "prv") == pytest.approx(epsilon_of([Spend(1.0, 0.1, 30)], 1e-5))
    assert oct(ledger_path(tmp_path, led.dataset).stat().st_mode & 0o777) == "0o600"


def _rewrite(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize(("damage", "needle"), [
    ("edit_sigma", "was edited"),
    ("drop_middle", "breaks the hash chain"),
    ("swap", "breaks the hash chain"),
    ("truncate", "not a valid entry"),
    ("rehash_sigma", "records epsilon"),
])
def test_a_tampered_ledger_stops_the_site(tmp_path, damage, needle):
    led = _ledger(tmp_path)
    path = led.path

    def edit(lines):
        if damage == "edit_sigma":
            e = json.loads(lines[0])
            e["sigma"] = 5.0
            lines[0] = json.dumps(e, sort_keys=True)
        elif damage == "drop_middle":
            del lines[1]
        elif damage == "swap":
            lines[1], lines[2] = lines[2], lines[1]
        elif damage == "truncate":
            lines[-1] = lines[-1][: len(lines[-1]) // 2]
        elif damage == "rehash_sigma":
            # a careful editor who raises sigma (to hide spend) and recomputes every hash
            from fedsecure.privacy.ledger import GENESIS, LedgerEntry
            prev, out = GENESIS, []
            for line in lines:
                e = json.loads(line)
                e["sigma"], e["prev"] = 4.0, prev
                e.pop("hash")
                e["hash"] = prev = LedgerEntry(**e, hash="").computed_hash()
                out.append(json.dumps(e, sort_keys=True))
            return out
        return lines

    _rewrite(path, edit)
    with pytest.raises(LedgerError) as e:
        PrivacyLedger.open(tmp_path, led.dataset)
    assert needle in str(e.value) and "restore" in str(e.value)


def test_ledger_of_another_dataset_is_not_accepted(tmp_path):
    led = _ledger(tmp_path, dataset="cd" * 32)
    other = ledger_path(tmp_path, "cd" * 32).read_text()
    ledger_path(tmp_path, "cdcdcdcdcdcdcdcdff").write_text(other)
    with pytest.raises(LedgerError, match="belongs to dataset"):
        PrivacyLedger.open(tmp_path, "cdcdcdcdcdcdcdcdff")
    assert led.entries


# --------------------------------------------------------------------------- the site guard
def _terms(**kw) -> Terms:
    base = dict(private=True, epsilon_budget=3.0, delta=1e-5, clip=1.0, sigma=None, min_sigma=0.3, accountant="prv",
                steps=10, batch_size=10)
    return Terms(**{**base, **kw})


def test_fixed_sigma_guard_refuses_exactly_the_overspending_round(tmp_path):
    q, steps = 0.1, 10
    eps2, eps3 = (epsilon_of([Spend(1.0, q, steps * r)], 1e-5) for r in (2, 3))
    budget = (eps2 + eps3) / 2
    guard = SitePrivacyGuard(_terms(epsilon_budget=budget, sigma=1.0), state_dir=tmp_path, dataset="ee" * 32,
                             num_records=100)
    for r in (1, 2):
        decision = guard.plan(server_round=r, rounds_total=5)
        assert isinstance(decision, Approval)
        guard.record(decision, run_id="t", server_round=r)
    decision = guard.plan(server_round=3, rounds_total=5)
    assert isinstance(decision, Refusal)
    assert decision.epsilon_if_trained == pytest.approx(eps3) and decision.epsilon_spent <= budget
    guard.refuse(decision.reason, run_id="t", server_round=3)
    ledger = PrivacyLedger.open(tmp_path, "ee" * 32)
    assert len(ledger.spends) == 2 and [e.kind for e in ledger.entries] == ["spend", "spend", "refusal"]
    assert ledger.entries[-1].reason == decision.reason and ledger.epsilon(1e-5, "prv") <= budget


def test_switching_accountants_never_lowers_the_epsilon_spent(tmp_path):
    rdp = SitePrivacyGuard(_terms(epsilon_budget=50.0, sigma=0.8, accountant="rdp"), state_dir=tmp_path,
                           dataset="aa" * 32, num_records=100)
    first = rdp.plan(server_round=1, rounds_total=2)
    rdp.record(first, run_id="r", server_round=1)
    prv = SitePrivacyGuard(_terms(epsilon_budget=50.0, sigma=0.8, accountant="prv"), state_dir=tmp_path,
                           dataset="aa" * 32, num_records=100)
    # PRV alone would count less for the same history; the site keeps the larger (RDP) bound
    history = [Spend(0.8, 0.1, 10)]
    assert epsilon_of(history, 1e-5, "prv") < epsilon_of(history, 1e-5, "rdp")
    assert prv.spent() == pytest.approx(epsilon_of(history, 1e-5, "rdp"))
    second = prv.plan(server_round=2, rounds_total=2)
    assert second.accountant == "rdp" and second.epsilon_after == pytest.approx(epsilon_of(history * 2, 1e-5, "rdp"))
    entry = prv.record(second, run_id="r", server_round=2)
    assert PrivacyLedger.open(tmp_path, "aa" * 32).epsilon(1e-5, "prv") == pytest.approx(entry.epsilon_after)


def test_a_sigma_below_the_policy_minimum_is_never_used(tmp_path):
    guard = SitePrivacyGuard(_terms(epsilon_budget=50.0, min_sigma=0.8), state_dir=tmp_path, dataset="bb" * 32,
                             num_records=100)
    decision = guard.plan(server_round=1, rounds_total=1, sigma_hint=0.4)  # e.g. a stored plan of a looser policy
    assert isinstance(decision, Approval) and decision.plan.sigma >= 0.8


# --------------------------------------------------------------------------- DP-SGD steps
def _tiny_training_setup():
    base, tok = load_model_and_tokenizer(ModelSettings())
    torch.manual_seed(0)
    model = attach_lora(base, LoraSettings(r=4))
    data = TokenizedDataset([[1, *range(10 + i, 20 + i), 2] for i in range(6)])
    return model, tok, data


def test_empty_poisson_batches_take_noise_only_steps():
    model, tok, data = _tiny_training_setup()
    before = adapter_state(model)
    res = train_private(model, data, TrainSettings(local_steps=3, batch_size=1, learning_rate=1e-2),
                        DPStepPlan(sigma=1.0, q=1e-9, steps=3, max_grad_norm=1.0), pad_id=0, randomness=5)
    after = adapter_state(model)
    assert math.isnan(res.loss)  # no record was ever sampled
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # but noise was applied
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks cleaned up


def test_noise_is_unpredictable_unless_seeded(monkeypatch):
    from fedsecure.privacy.noise import SystemRandomness

    model, tok, data = _tiny_training_setup()
    start = adapter_state(model)
    plan = DPStepPlan(sigma=1.0, q=0.5, steps=2, max_grad_norm=1.0)
    ts = TrainSettings(local_steps=2, batch_size=3, learning_rate=1e-2)
    results = []
    for source in (SystemRandomness(), SystemRandomness(), 7, 7):
        set_adapter_state(model, start)
        train_private(model, data, ts, plan, pad_id=0, randomness=source)
        results.append(adapter_state(model))
    k = next(iter(start))
    assert not np.array_equal(results[0][k], results[1][k])
    assert all(np.array_equal(results[2][x], results[3][x]) for x in start)
    # the secure path takes nothing from torch's generators: seeding (or breaking) them changes nothing
    monkeypatch.setattr(torch, "normal", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch RNG used")))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch RNG used")))
    set_adapter_state(model, start)
    train_private(model, data, ts, plan, pad_id=0, randomness=SystemRandomness())


def test_os_noise_has_the_calibrated_distribution():
    from scipy import stats

    from fedsecure.privacy.noise import SystemRandomness

    ref = torch.zeros(200_000, dtype=torch.float32)
    draws = SystemRandomness().gaussian(ref, std=2.5).double().numpy()
    assert abs(draws.mean()) < 4 * 2.5 / np.sqrt(draws.size)
    assert draws.std() == pytest.approx(2.5, rel=0.01)
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-4  # Gaussian, not merely the right variance
    mask = SystemRandomness().poisson_mask(100_000, 0.1)
    assert mask.dtype == torch.bool and abs(float(mask.double().mean()) - 0.1) < 0.005


# --------------------------------------------------------------------------- in the federation
from .conftest import site_ledger_entries, small_config  # noqa: E402


def _sim(cfg, run_dir, node_overrides=None):
    """Simulate in process; ``node_overrides`` maps a site index to node-config keys of its own settings."""
    from client.app import app as client_app
    from fedsecure.federation.inprocess import run_inprocess
    from fedsecure.launch.engines import node_configs, run_config
    from fedsecure.launch.simulate import prepare
    from server.app import app as server_app

    cfg, run = prepare(cfg, run_dir)
    nodes = node_configs(cfg, run.path)
    for i, extra in (node_overrides or {}).items():
        nodes[i].update(extra)
    run_inprocess(server_app, client_app, num_nodes=cfg.federation.sites, run_config=run_config(cfg, run.path),
                  node_configs=nodes)
    return run.read_summary()


def test_simulate_is_private_by_default_and_stays_within_budget(site_data, tmp_path):
    summary = _sim(small_config(site_data, federation={"rounds": 2}), tmp_path / "run")
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["record_level"] is True and privacy["accountant"] == "prv"
    for name in ("site-0", "site-1"):
        s = privacy["sites"][name]
        assert s["status"] == "active" and s["rounds_trained"] == [1, 2]
        assert 2.9 <= s["epsilon_spent"] <= 3.0  # calibrated to use, and never exceed, the budget
        assert s["delta"] == 1e-5 and s["sigma"] > 0.3 and s["steps_this_run"] == 8
    for name in ("site-0", "site-1"):
        assert len(site_ledger_entries(tmp_path / "run" / "sites" / name)) == 2
    assert "Privacy" in (tmp_path / "run" / "summary.md").read_text()
    assert summary["privacy"]["sites"]["site-0"]["epsilon_budget"] == 3.0


def _budget_for_two_rounds(q: float, steps: int) -> float:
    eps2, eps3 = (epsilon_of([Spend(1.0, q, steps * r)], 1e-5) for r in (2, 3))
    return (eps2 + eps3) / 2


def test_small_budget_site_is_retired_at_the_round_it_would_overspend(site_data, tmp_path):
    # fixed sigma; the run asks for no budget of its own (each site's), and site-1's own policy is small
    cfg = small_config(site_data, federation={"rounds": 4}, privacy={"noise_multiplier": 1.0, "delta": 1e-5},
                       site={"privacy": {"epsilon_budget": 50.0}})
    small = _budget_for_two_rounds(8 / 96, 4)
    summary = _sim(cfg, tmp_path / "run", {1: {"site.privacy.epsilon_budget": small}})
    s1 = summary["privacy"]["sites"]["site-1"]
    assert s1["status"] == "exhausted" and s1["rounds_trained"] == [1, 2] and s1["refused_rounds"] == [3]
    assert s1["epsilon_spent"] <= small
    assert summary["privacy"]["sites"]["site-0"]["rounds_trained"] == [1, 2, 3, 4]
    assert summary["rounds_completed"] == 4 and summary["stopped"] is None
    assert summary["rounds"][3]["refused"] == ["site-1"]
    # once retired, the site is not asked again
    assert 4 not in s1["refused_rounds"]


def test_run_ends_cleanly_when_every_site_is_exhausted(site_data, tmp_path):
    cfg = small_config(site_data, federation={"rounds": 4},
                       privacy={"noise_multiplier": 1.0, "epsilon_budget": _budget_for_two_rounds(8 / 96, 4),
                                "delta": 1e-5})
    summary = _sim(cfg, tmp_path / "run")
    assert summary["stopped"] == "privacy budget exhausted at too many sites"
    assert summary["rounds_completed"] == 2
    assert (tmp_path / "run" / "adapters" / "global-r0002.safetensors.sealed").is_file()
    assert not (tmp_path / "run" / "adapters" / "global-r0003.safetensors.sealed").exists()
    assert all(s["refused_rounds"] == [3] for s in summary["privacy"]["sites"].values())


def test_a_restarted_site_continues_its_epsilon(site_data, tmp_path):
    state = tmp_path / "state"
    cfg = small_config(site_data, privacy={"noise_multiplier": 1.5, "epsilon_budget": 20.0, "delta": 1e-5},
                       site={"state_dir": str(state), "privacy": {"epsilon_budget": 20.0}})
    first = _sim(cfg, tmp_path / "run1")["privacy"]["sites"]["site-0"]["epsilon_spent"]
    second = _sim(cfg, tmp_path / "run2")["privacy"]["sites"]["site-0"]["epsilon_spent"]
    assert second > first > 0
    assert second == pytest.approx(epsilon_of([Spend(1.5, 8 / 96, 8)], 1e-5), rel=1e-9)
    # a calibrated run on a dataset that already spent its budget trains nothing
    spent = small_config(site_data, privacy={"epsilon_budget": second * 0.99, "delta": 1e-5},
                         site={"state_dir": str(state), "privacy": {"epsilon_budget": 20.0}})
    summary = _sim(spent, tmp_path / "run3")
    assert summary["privacy"]["sites"]["site-0"]["refused_rounds"] == [1]
    assert summary["stopped"] == "privacy budget exhausted at too many sites"


def test_a_tampered_ledger_stops_that_site_with_a_clear_reason(site_data, tmp_path):
    state = tmp_path / "state"
    cfg = small_config(site_data, privacy={"noise_multiplier": 1.5, "epsilon_budget": 20.0},
                       site={"state_dir": str(state), "privacy": {"epsilon_budget": 20.0},
                             "storage": {"seal": False}})  # a plain ledger, edited by hand (sealed: test_storage)
    _sim(cfg, tmp_path / "run1")
    ledger = next((state / "site-0").glob("privacy-ledger-*.jsonl"))
    entry = json.loads(ledger.read_text().splitlines()[0])
    entry["sigma"] = 9.0
    ledger.write_text(json.dumps(entry, sort_keys=True) + "\n")
    summary = _sim(cfg, tmp_path / "run2")
    failures = summary["rounds"][1]["failures"]
    assert any("site-0" in k or "site-0" in v for k, v in failures.items())
    assert any("was edited" in v for v in failures.values())
    assert summary["privacy"]["sites"]["site-1"]["rounds_trained"] == [1]


def test_killing_a_site_between_training_and_sending_keeps_the_spend(site_data, tmp_path):
    cfg = small_config(site_data, federation={"sites": 1, "min_sites": 1},
                       privacy={"noise_multiplier": 1.0, "epsilon_budget": 20.0},
                       site={"state_dir": str(tmp_path / "state"), "privacy": {"epsilon_budget": 20.0}})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import fedsecure.federation.site as client
        def crash(*a, **k):   # the process dies after training, while the update is being encoded
            os._exit(17)
        client._encode_update = crash
        from fedsecure.config import SimulationConfig
        from tests.test_privacy import _sim
        cfg = SimulationConfig.from_mapping(json.loads(open({str(cfg_file)!r}).read()))
        _sim(cfg, {str(tmp_path / "run")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    entries = site_ledger_entries(tmp_path / "state" / "site-0")  # sealed, opened with the site's key
    assert len(entries) == 1 and entries[0]["server_round"] == 1 and entries[0]["sigma"] == 1.0
    assert not list((tmp_path / "run" / "adapters").glob("global-r0001*"))  # nothing was released


def test_client_level_dp_is_reported_separately(site_data, tmp_path):
    cfg = small_config(site_data, privacy={"client_dp": {"enabled": True, "clip": 0.5, "noise_multiplier": 2.0,
                                                         "noise_seed": 1}})
    summary = _sim(cfg, tmp_path / "run")
    cl = summary["privacy"]["client_level"]
    assert cl["enabled"] and cl["rounds"] == 1 and cl["q"] == [1.0]
    assert cl["epsilon"] == pytest.approx(epsilon_of([Spend(2.0, 1.0, 1)], 1e-5, "prv"))
    assert "Client-level DP at the coordinator" in (tmp_path / "run" / "privacy.md").read_text()


def test_client_level_dp_clips_each_site_update():
    from fedsecure.config import ClientDPSettings
    from fedsecure.privacy.client_dp import ClientLevelDP

    cdp = ClientLevelDP(ClientDPSettings(enabled=True, clip=1.0, noise_multiplier=1e-9), "prv", seed=0)
    big = {"w": np.array([30.0, 40.0], np.float32)}  # norm 50 -> clipped to 1
    small = {"w": np.array([0.3, 0.4], np.float32)}  # norm 0.5, kept
    out = cdp.aggregate([big, small], sampled=2, total=4)
    np.testing.assert_allclose(out["w"], (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 2, atol=1e-6)
    assert cdp.clipped_sites == 1 and cdp.spends == [Spend(1e-9, 0.5, 1)]


def test_a_pinned_dataset_id_keeps_charging_the_same_ledger_when_the_data_changes(site_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(site_data, data)
    state = tmp_path / "state"
    cfg = small_config(data, federation={"sites": 1}, privacy={"noise_multiplier": 1.5, "epsilon_budget": 20.0},
                       site={"state_dir": str(state), "privacy": {"epsilon_budget": 20.0}})
    nodes = {0: {"site.dataset_id": "st-agnes-notes"}}
    first = _sim(cfg, tmp_path / "run1", nodes)["privacy"]["sites"]["site-0"]["epsilon_spent"]
    with (data / "site-0" / "train.jsonl").open("a") as f:
        f.write('{"text": "one more patient note"}\n')  # the content fingerprint changes
    second_run = _sim(cfg, tmp_path / "run2", nodes)
    second = second_run["privacy"]["sites"]["site-0"]["epsilon_spent"]
    assert second > first
    assert second_run["rounds"][1]["sites_ok"] == 1
    records = [x for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines() if '"site-0"' in x]
    assert any('"records": 97' in x for x in records)  # the new record was seen: the cache noticed the change
    ledgers = [p.name for p in (state / "site-0").glob("privacy-ledger-*")]
    assert ledgers == ["privacy-ledger-st-agnes-notes.jsonl.sealed"]


def test_accounting_cost_is_bounded_whatever_the_plan():
    """A plan whose PRV grid would need gigabytes (measured: sigma 0.5, q = 1, 1000 steps took 8 GB and 58 s) is
    accounted with the RDP bound instead: sound, never below PRV's, and cheap."""
    import time

    from fedsecure.privacy.accounting import MAX_PRV_POINTS, _epsilon, prv_grid_points

    heavy = ((0.5, 1.0, 1000),)
    assert prv_grid_points(heavy, 1e-5) > MAX_PRV_POINTS
    _epsilon.cache_clear()
    start = time.perf_counter()
    eps = epsilon_of([Spend(0.5, 1.0, 1000)], 1e-5, "prv")
    assert time.perf_counter() - start < 5
    assert eps == epsilon_of([Spend(0.5, 1.0, 1000)], 1e-5, "rdp")
    light = ((1.2, 32 / 384, 48),)  # the demo's plan stays on PRV
    assert prv_grid_points(light, 1e-5) < MAX_PRV_POINTS
    assert epsilon_of([Spend(1.2, 32 / 384, 48)], 1e-5, "prv") < epsilon_of([Spend(1.2, 32 / 384, 48)], 1e-5, "rdp")


def test_the_accountant_registry_serves_exactly_the_accountants_the_config_accepts():
    from fedsecure.config import ACCOUNTANTS
    from fedsecure.privacy.accounting import REGISTRY, register_accountant

    assert tuple(REGISTRY) == ACCOUNTANTS
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("prv", REGISTRY["prv"])


def test_the_dp_config_document_is_typed_and_strict():
    from fedsecure.privacy.dpconfig import DPConfig, DPConfigError

    doc = DPConfig(enabled=True, records=96, epsilon_budget=3.0, delta=1e-5, sigma=1.2, q=0.08, steps=16,
                   max_grad_norm=1.0, accountant="prv", epsilon_spent=2.5, grad_sample_mode="ew", noise="os-csprng")
    assert DPConfig.from_json(doc.to_json()) == doc
    assert doc.to_json().startswith('{"accountant":"prv"')  # canonical: sorted, compact
    assert DPConfig(enabled=False, records=96).to_json() == '{"enabled":false,"records":96}'
    for bad, needle in [("[1]", "not a JSON object"), ('{"records": 3}', "with 'enabled'"),
                        ('{"enabled": true, "epsilon": 3}', "unknown fields epsilon"),
                        ('{"enabled": true, "sigma": "1"}', "sigma is not valid"),
                        ('{"enabled": true, "records": 1.5}', "records is not valid"),
                        ('{"enabled": true, "delta": NaN}', "delta is not valid")]:
        with pytest.raises(DPConfigError, match=needle):
            DPConfig.from_json(bad)
