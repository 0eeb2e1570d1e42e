"""The site owns its privacy: a dishonest coordinator of our own (Flower Messages built by hand, driving the real
ClientApp of ``client/app.py`` with a deployed site's node config) cannot switch DP off, seed the noise, raise
the budget, lower sigma, blow up the cost, replay a round, move the ledger or run a command at the site. Every
refusal says why, is in the site's ledger, and no release ever exceeds the site's own policy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsecure.config import SimulationConfig, SitePolicy, SiteSettings
from fedsecure.data.dataset import fingerprint
from fedsecure.data.synth import synthesize
from fedsecure.errors import ConfigError
from fedsecure.federation import keys
from fedsecure.federation.records import to_array_record
from fedsecure.privacy.ledger import PrivacyLedger
from fedsecure.privacy.policy import PolicyRefusal, resolve
from fedsecure.store.keyrings import site_keyring

pytestmark = pytest.mark.filterwarnings("ignore::fedsecure.attestation.verify.SoftwareAttestationWarning")

POLICY = SitePolicy(epsilon_budget=3.0, delta=1e-5, min_sigma=0.5, max_steps_per_round=50, max_batch_size=64)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """One deployed hospital (its own settings in its node config), the round-0 adapter, an honest run config."""
    from fedsecure.model import initial_adapter

    root = tmp_path_factory.mktemp("hospital")
    synthesize(root / "data", sites=1, records_per_site=120, eval_fraction=0.2, seed=3)
    site = SiteSettings(name="hospital-a", data_dir=str(root / "data" / "site-0"), state_dir=str(root / "state"),
                        privacy=POLICY).validate()
    honest = SimulationConfig.from_mapping({"seed": 1, "federation": {"sites": 1, "rounds": 50},
                                            "data": {"max_length": 48}, "train": {"local_steps": 2, "batch_size": 8}})
    return root, site, initial_adapter(honest.model, honest.seed), {**honest.to_run_config(),
                                                                     "run-dir": "/runs/hostile"}


class Coordinator:
    """A coordinator that is not ours: it sends whatever run config it likes."""

    def __init__(self, site: SiteSettings, adapter, run_config: dict) -> None:
        self.site, self.adapter, self.base = site, adapter, run_config
        self.context = Context(run_id=77, node_id=5, node_config=site.to_flat(), state=RecordDict(),
                               run_config=dict(run_config))

    def train(self, server_round: int, **hostile) -> Message:
        from client.app import app

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 77, 0, 1
        self.context.run_config = {**self.base, **hostile}
        msg = Message(RecordDict({keys.ARRAYS: to_array_record(self.adapter),
                                  keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})}),
                      dst_node_id=5, message_type="train")
        return app(msg, self.context)


def _refusal(reply: Message) -> str:
    assert not reply.has_error(), reply.error.reason
    privacy = reply.content[keys.PRIVACY]
    assert privacy[keys.STATUS] == keys.STATUS_REFUSED, dict(privacy)
    assert keys.ARRAYS not in reply.content and keys.UPDATE not in reply.content  # nothing released
    return str(privacy[keys.REASON])


def _ledger(site: SiteSettings) -> PrivacyLedger:
    dataset = fingerprint([Path(str(site.data_dir)) / "train.jsonl"])
    return PrivacyLedger.open(str(site.state_dir), dataset, ring=site_keyring(site))


@pytest.mark.slow
def test_a_dishonest_coordinator_cannot_weaken_the_sites_privacy(hospital, tmp_path):
    root, site, adapter, run_config = hospital
    c = Coordinator(site, adapter, run_config)
    marker = tmp_path / "pwned"
    refusals: list[str] = []

    def refused(server_round: int, needle: str, **hostile) -> None:
        reason = _refusal(c.train(server_round, **hostile))
        assert needle in reason, reason
        assert "Fix:" in reason
        refusals.append(reason)

    refused(1, "privacy.enabled: the run asks for false (no differential privacy) but this site allows only "
               "private training (site.privacy.dp_required: true)", **{"privacy.enabled": False})
    refused(1, "privacy.noise_seed: the run asks for noise seeded with 1234", **{"privacy.noise_seed": 1234})
    refused(1, "site.noise_seed: the run asks for noise seeded with 7", **{"site.noise_seed": 7})
    refused(1, "privacy.epsilon_budget: the run asks for 100 but this site allows at most 3 "
               "(site.privacy.epsilon_budget)", **{"privacy.epsilon_budget": 100.0})
    refused(1, "privacy.delta: the run asks for 0.0099 but this site allows at most 1e-05",
            **{"privacy.delta": 0.0099})
    refused(1, "privacy.max_grad_norm: the run asks for 50 but this site allows at most 10",
            **{"privacy.max_grad_norm": 50.0})
    start = time.perf_counter()
    refused(1, "privacy.noise_multiplier: the run asks for 0.003 but this site allows at least 0.5",
            **{"privacy.noise_multiplier": 0.003})
    refused(1, "train.local_steps: the run asks for 100000 but this site allows at most 50",
            **{"train.local_steps": 100000})
    refused(1, "train.batch_size: the run asks for 100000", **{"train.batch_size": 100000})
    refused(1, "model.lora.r: the run asks for 100000 but this site allows at most 256", **{"model.lora.r": 100000})
    refused(1, "data.max_length: the run asks for 32768 but this site allows at most 4096",
            **{"data.max_length": 32768})
    assert time.perf_counter() - start < 10  # refused before any accountant run or allocation
    # an accountant that can under-report is not even a valid request
    reply = c.train(1, **{"privacy.accountant": "gdp"})
    assert reply.has_error() and "can under-report" in reply.error.reason

    # honest rounds train; a replay of one is refused; keys the site owns are never taken from the run config
    hostile_owned = {"site.dataset_id": "fresh-budget", "site.state_dir": str(tmp_path / "elsewhere"),
                     "privacy.state_dir": str(tmp_path / "elsewhere"), "storage.key_provider": "command",
                     "storage.key_command": f"touch {marker}", "attestation.provider": "command",
                     "attestation.command": f"touch,{marker}", "site.privacy.epsilon_budget": 1000.0,
                     "site.training.processes": 8, "site.training.gradient_compression": "powersgd",
                     "site.training.round_timeout_s": 1e9, "site.nccl.socket_ifname": "attacker0",
                     "site.nccl.profile": "tcp"}
    trained = [c.train(1), c.train(2, **hostile_owned), c.train(3, **{"privacy.accountant": "rdp"})]
    refused(1, "round 1 of run hostile/77 was already trained and released: a replayed message is not trained")
    assert not marker.exists() and not (tmp_path / "elsewhere").exists()
    from fedsecure.training import spawn

    assert not spawn._POOLS  # the run's site.training keys started no rank: the site trained in its one process

    # no release ever exceeds the site's own policy
    epsilons = []
    for reply in trained:
        assert not reply.has_error(), reply.error.reason
        m = reply.content[keys.METRICS]
        assert reply.content[keys.PRIVACY][keys.STATUS] == keys.STATUS_TRAINED
        assert m[keys.DP_EPSILON] <= POLICY.epsilon_budget and m[keys.DP_DELTA] <= 1e-5
        assert m[keys.DP_SIGMA] >= POLICY.min_sigma and m[keys.DP_MAX_GRAD_NORM] <= POLICY.max_clip
        epsilons.append(m[keys.DP_EPSILON])
    assert epsilons == sorted(epsilons)  # one dataset, one ledger: the spend only grows (also across accountants)

    ledger = _ledger(site)
    assert [e.kind for e in ledger.entries].count("spend") == 3
    assert [e.reason for e in ledger.refusals] == refusals  # every refusal, with its reason, in order
    assert all(e.epsilon_after <= POLICY.epsilon_budget for e in ledger.entries if e.kind == "spend")
    assert len(list(Path(str(site.state_dir)).glob("privacy-ledger-*"))) == 1


def test_a_seed_or_a_policy_from_the_run_config_is_refused_by_construction():
    with pytest.raises(ConfigError, match="a deployed site draws its noise from the operating system's secure"):
        SiteSettings(name="a", noise_seed=3, simulated=False).validate()
    flat = SiteSettings(name="a", privacy=POLICY).validate().to_flat()
    assert SiteSettings.from_flat(flat).privacy == POLICY
    with pytest.raises(ConfigError, match="site.privacy.epsilon_budgetn: unknown site setting"):
        SiteSettings.from_flat({**flat, "site.privacy.epsilon_budgetn": 9.0})
    # the run config carries no site setting, so nothing a coordinator sends can be taken for one
    rc = SimulationConfig().to_run_config()
    assert not [k for k in rc if k.startswith("site.") or k in ("privacy.noise_seed", "privacy.state_dir")]
    assert SimulationConfig.from_run_config({**rc, "site.privacy.epsilon_budget": 99.0}) == SimulationConfig()
    for key, value in {"site.training.processes": 8, "site.training.gradient_compression": "powersgd",
                       "site.nccl.profile": "tcp", "site.nccl.ib_gid_index": 0}.items():
        assert SimulationConfig.from_run_config({**rc, key: value}) == SimulationConfig()
    # a site's ranks and NCCL settings come from its node config alone
    own = SiteSettings.from_flat({**flat, "site.training.processes": 2})
    assert own.training.processes == 2 and own.training.gradient_compression == "none"


@pytest.mark.parametrize(("request_", "needle"), [
    ({"privacy": {"epsilon_budget": 3.0}}, None),
    ({"privacy": {"epsilon_budget": 2.0, "delta": 1e-6, "noise_multiplier": 0.9}}, None),
    ({"privacy": {"enabled": False}}, "privacy.enabled"),
    ({"privacy": {"epsilon_budget": 3.01}}, "privacy.epsilon_budget"),
    ({"privacy": {"delta": 2e-5}}, "privacy.delta"),
    ({"privacy": {"noise_multiplier": 0.49}}, "privacy.noise_multiplier"),
    ({"privacy": {"max_grad_norm": 10.5}}, "privacy.max_grad_norm"),
    ({"privacy": {"accountant": "rdp"}}, "privacy.accountant"),
    ({"train": {"local_steps": 51}}, "train.local_steps"),
])
def test_the_request_can_only_tighten_the_policy(request_, needle):
    policy = SitePolicy(epsilon_budget=3.0, delta=1e-5, min_sigma=0.5, accountants=("prv",), max_steps_per_round=50)
    terms = resolve(policy, SiteSettings().limits, SimulationConfig.from_mapping(request_), 1000)
    if needle is None:
        assert not isinstance(terms, PolicyRefusal)
        req = SimulationConfig.from_mapping(request_).privacy
        assert terms.epsilon_budget == (req.epsilon_budget or 3.0) and terms.delta == (req.delta or 1e-5)
        assert terms.private and terms.min_sigma == 0.5
    else:
        assert isinstance(terms, PolicyRefusal) and terms.key == needle and terms.reason.startswith(needle)


def test_delta_must_be_below_one_over_the_records_at_the_site():
    terms = resolve(SitePolicy(delta=0.008), SiteSettings().limits, SimulationConfig(), 160)
    assert isinstance(terms, PolicyRefusal) and "delta 0.008 is not below 1/N = 1/160" in terms.reason
    default = resolve(SitePolicy(), SiteSettings().limits, SimulationConfig(), 160)
    assert default.delta == 1e-5  # min(1e-5, 1/(10 N))
    small = resolve(SitePolicy(), SiteSettings().limits, SimulationConfig(), 1_000_000)
    assert small.delta == pytest.approx(1e-7)


def test_a_non_private_release_makes_the_datasets_epsilon_infinite(tmp_path):
    led = PrivacyLedger.open(tmp_path, "ab" * 32)
    led.append_non_private(run_id="r", server_round=1, steps=4, epsilon_budget=3.0)
    again = PrivacyLedger.open(tmp_path, "ab" * 32)
    assert again.epsilon(1e-5, "prv") == math.inf and again.entries[0].kind == "non-private"
    assert again.entries[0].epsilon_after is None  # unbounded, written as JSON null (canonical JSON has no inf)
    assert b"Infinity" not in again.path.read_bytes()
    # and no budget can be kept for it afterwards: the guard refuses every DP round of that dataset
    from fedsecure.privacy.guard import Refusal, SitePrivacyGuard
    from fedsecure.privacy.policy import Terms

    terms = Terms(private=True, epsilon_budget=100.0, delta=1e-5, clip=1.0, sigma=None, min_sigma=0.5,
                  accountant="prv", steps=4, batch_size=8)
    decision = SitePrivacyGuard(terms, state_dir=tmp_path, dataset="ab" * 32, num_records=96).plan(
        server_round=2, rounds_total=2)
    assert isinstance(decision, Refusal) and "released without differential privacy" in decision.reason


@pytest.mark.slow
def test_the_site_loads_its_keyring_once_per_message(hospital, tmp_path, monkeypatch):
    """One train message touches the ledger (read, append), the error-feedback residual (read, write) and the
    node key; the site's keyring is loaded once for all of it (with the passphrase provider, one scrypt run)."""
    import fedsecure.store.keyrings as keyrings
    from fedsecure.crypto import keys as crypto_keys

    root, site, adapter, run_config = hospital
    monkeypatch.setenv("FEDSECURE_PASSPHRASE", "correct horse battery staple")
    own = SiteSettings(**{**vars(site), "state_dir": str(tmp_path / "state"),
                          "storage": type(site.storage)(key_provider="passphrase")}).validate()
    loads, scrypts = [], []
    real_load, real_scrypt = keyrings.load_keyring, crypto_keys.keyring_from_passphrase
    monkeypatch.setattr(keyrings, "load_keyring", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(crypto_keys, "keyring_from_passphrase",
                        lambda *a, **k: scrypts.append(1) or real_scrypt(*a, **k))
    top_k = {"transport.uplink_dither": 0.0, "transport.policy": "", "transport.uplink_topk": 0.05}
    c = Coordinator(own, adapter, run_config)
    for server_round in (1, 2):
        reply = c.train(server_round, **top_k)
        assert not reply.has_error(), reply.error.reason
        assert reply.content[keys.PRIVACY][keys.STATUS] == keys.STATUS_TRAINED
    assert len(loads) == 2 and len(scrypts) == 2  # once per message
    assert (tmp_path / "state" / "uplink-residual.safetensors.sealed").exists()  # the residual was kept, sealed
