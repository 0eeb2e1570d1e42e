"""The coordinator trusts no site's reply: every field it uses is checked, a bad reply is rejected with an audited
reason, the run goes on, and the global adapter stays finite and bounded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsecure.config import SimulationConfig
from fedsecure.errors import ReplyRejected
from fedsecure.federation import keys
from fedsecure.federation.intake import (
    ADAM_STEP_BOUND,
    adam_movement,
    check_update,
    parse_train_reply,
    update_bound,
)
from fedsecure.federation.records import to_array_record

from .conftest import global_adapter, small_config

CFG = SimulationConfig()
DELTA = {"a.lora_A.weight": np.full((4, 8), 1e-3, np.float32), "a.lora_B.weight": np.full((8, 4), -1e-3, np.float32)}


def _trained(**metrics) -> RecordDict:
    m = {keys.NUM_EXAMPLES: 96, keys.TRAIN_LOSS: 6.5, keys.STEPS: 16, keys.SECONDS: 1.5, keys.DP_EPSILON: 1.2,
         keys.DP_EPSILON_BUDGET: 3.0, keys.DP_DELTA: 1e-5, keys.DP_SIGMA: 1.1, keys.DP_Q: 0.08, keys.DP_STEPS: 16,
         keys.DP_MAX_GRAD_NORM: 1.0, **metrics}
    return RecordDict({
        keys.METRICS: MetricRecord({k: v for k, v in m.items() if v is not None}),
        keys.SITE: ConfigRecord({keys.SITE_NAME: "site-1", keys.DATASET_FINGERPRINT: "ab" * 32}),
        keys.PRIVACY: ConfigRecord({keys.STATUS: keys.STATUS_TRAINED, keys.ACCOUNTANT: "prv",
                                    keys.LEDGER_HEAD: "cd" * 32, keys.LEDGER_ENTRIES: 3, keys.REASON: ""}),
        keys.UPDATE: ConfigRecord({keys.PAYLOAD: b"FSUPD..."})})


def test_an_honest_reply_is_read_field_by_field():
    tr = parse_train_reply(_trained(), CFG)
    assert (tr.status, tr.site, tr.records, tr.steps, tr.payload) == ("trained", "site-1", 96, 16, b"FSUPD...")
    assert tr.dp["epsilon"] == 1.2 and tr.dp["sigma"] == 1.1 and tr.statement is None
    assert parse_train_reply(_trained(**{keys.TRAIN_LOSS: math.nan}), CFG).train_loss is None  # no record sampled


def _second_array_record(content: RecordDict) -> RecordDict:
    content["more-arrays"] = ArrayRecord({"x": torch.zeros(2)})
    return content


@pytest.mark.parametrize(("content", "needle"), [
    (_trained(**{keys.NUM_EXAMPLES: 0}), "num-examples = 0 is not an integer in [1, 10000000]"),
    (_trained(**{keys.NUM_EXAMPLES: math.inf}), "num-examples = inf is not an integer"),
    (_trained(**{keys.NUM_EXAMPLES: 1e30}), "num-examples = 1e+30 is not an integer"),
    (_trained(**{keys.NUM_EXAMPLES: 10**12}), "num-examples = 1000000000000 is not an integer in [1, 10000000]"),
    (_trained(**{keys.NUM_EXAMPLES: [1, 2]}), "num-examples = [1, 2] is not an integer"),
    (_trained(extra=1.0), "the metrics of a 'trained' reply has unexpected 'extra'"),
    (_trained(**{keys.DP_SIGMA: None}), "missing 'dp.sigma'"),
    (_trained(**{keys.TRAIN_LOSS: math.inf}), "train-loss = inf is not finite"),
    (_trained(**{keys.DP_EPSILON: math.nan}), "dp.epsilon is NaN"),
    (_trained(**{keys.DP_Q: 3.0}), "dp.q = 3 is out of range [0, 1]"),
    (_second_array_record(_trained()), "the reply has unexpected 'more-arrays'"),
])
def test_a_hostile_reply_is_rejected_with_its_reason(content, needle):
    with pytest.raises(ReplyRejected) as e:
        parse_train_reply(content, CFG)
    assert needle in str(e.value)


def test_hostile_record_shapes_are_rejected():
    both = _trained()
    both[keys.ARRAYS] = to_array_record(DELTA)
    bad_status = _trained()
    bad_status[keys.PRIVACY] = ConfigRecord({**dict(bad_status[keys.PRIVACY]), keys.STATUS: "trusted"})
    bad_head = _trained()
    bad_head[keys.PRIVACY] = ConfigRecord({**dict(bad_head[keys.PRIVACY]), keys.LEDGER_HEAD: "zz"})
    wrong_kind = _trained()
    wrong_kind[keys.METRICS] = ConfigRecord({keys.NUM_EXAMPLES: 96})
    for content, needle in [(both, "exactly one update"), (bad_status, "unknown privacy status 'trusted'"),
                            (bad_head, "ledger-head = 'zz' is not a valid value"),
                            (wrong_kind, "'metrics' is a ConfigRecord, not a MetricRecord")]:
        with pytest.raises(ReplyRejected, match=needle):
            parse_train_reply(content, CFG)


def test_update_values_are_bounded_by_what_adamw_can_move():
    state = {k: np.zeros_like(v) for k, v in DELTA.items()}
    check_update(DELTA, CFG, 1, state)  # honest magnitudes pass
    huge = {k: np.full_like(v, 3e38) for k, v in DELTA.items()}
    with pytest.raises(ReplyRejected, match=r"reaches 3e\+38, over .* the most 16 AdamW steps at learning rate "):
        check_update(huge, CFG, 1, state)
    with pytest.raises(ReplyRejected, match="NaN or infinite"):
        check_update({**DELTA, "a.lora_B.weight": np.full((8, 4), np.nan, np.float32)}, CFG, 1, state)
    capped = SimulationConfig.from_mapping({"federation": {"max_update_norm": 1e-3}})
    with pytest.raises(ReplyRejected, match="L2 norm .* over federation.max_update_norm"):
        check_update(DELTA, capped, 1, state)


def test_the_adamw_bound_holds_for_adversarial_gradients_and_is_not_loose():
    """Gradients chosen to push Adam hardest (growing like (b2 / b1)^t, where Cauchy-Schwarz is tight), plus
    random, constant and spiking ones: no coordinate moves further than the bound, and the worst comes within 2%
    of it (the bound is exact, not a loose constant)."""
    steps, lr = 16, 0.01
    cfg = SimulationConfig.from_mapping({"train": {"local_steps": steps, "learning_rate": lr},
                                         "transport": {"enabled": False}})
    bound = update_bound(cfg, 1, {"w": np.zeros(1, np.float32)}, "w")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    schedules = {"constant": lambda t: torch.ones(64), "random": lambda t: torch.randn(64, generator=gen) * 1e3,
                 "growing": lambda t: torch.full((64,), (0.999 / 0.9) ** t), "spike": lambda t: torch.full(
                     (64,), 1e-6 if t < steps - 1 else 1e6)}
    for grads in schedules.values():
        w = torch.zeros(64, requires_grad=True)
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
        for t in range(steps):
            opt.zero_grad()
            w.grad = grads(t).float()
            opt.step()
        worst = max(worst, float(w.detach().abs().max()))
    assert worst <= bound
    assert worst >= bound / 1.01 / 1.02  # (bound carries a 1% margin)
    assert ADAM_STEP_BOUND == pytest.approx(7.27, abs=0.01)
    assert adam_movement(1) == pytest.approx(1.0) and adam_movement(100_000) / 100_000 == pytest.approx(7.27, rel=0.01)


@pytest.mark.slow
def test_hostile_sites_neither_stop_the_run_nor_move_the_global_adapter(site_data, tmp_path, monkeypatch):
    """Five sites, each lying in one field the coordinator uses; site-0 is honest. The run completes, each lie is
    rejected and audited for its own reason, and only site-0's update moves the global adapter."""
    import client.app as client_app
    from fedsecure.data.synth import synthesize
    from fedsecure.federation.site import handle_train
    from fedsecure.launch.simulate import simulate
    from fedsecure.transport.session import site_encode

    def hostile(msg, context):
        reply = handle_train(msg, context)
        site = int(context.node_config.get("partition-id", -1))
        if reply.has_error() or site == 0:
            return reply
        m = dict(reply.content[keys.METRICS])
        if site == 1:
            m[keys.NUM_EXAMPLES] = 0
        elif site == 2:
            m[keys.NUM_EXAMPLES] = math.inf
        elif site == 3:
            m["made-up"] = 1.0
        reply.content[keys.METRICS] = MetricRecord(m)
        held = {k: v.numpy() for k, v in context.state[keys.STATE_VIEW].items()}  # the site's adapter
        if site == 4:  # large, through the codec
            cfg = SimulationConfig.from_run_config(context.run_config)
            big = {k: np.full_like(v, 1e6) for k, v in held.items()}
            reply.content[keys.UPDATE] = ConfigRecord({keys.PAYLOAD: site_encode(big, None, cfg.transport, 1)[0]})
        if site == 5:  # finite but huge (3e38), as plain arrays instead of the encoded update
            del reply.content[keys.UPDATE]
            reply.content[keys.ARRAYS] = to_array_record({k: np.full_like(v, 3e38) for k, v in held.items()})
        return reply

    data = tmp_path / "data"
    synthesize(data, sites=6, records_per_site=40, eval_fraction=0.2, seed=5)
    monkeypatch.setattr(client_app, "handle_train", hostile)
    cfg = small_config(data, federation={"sites": 6, "rounds": 2}, train={"local_steps": 2},
                       attestation={"enabled": False})  # the coordinator's own checks, not the signatures
    summary = simulate(cfg, run_dir=tmp_path / "run")
    assert summary["rounds_completed"] == 2 and summary["stopped"] is None
    expected = {"site-1": "num-examples = 0 is not an integer", "site-2": "num-examples = inf is not an integer",
                "site-3": "unexpected 'made-up'", "site-4": "the most 2 AdamW steps at learning rate 0.01 can move it",
                "site-5": "reaches 3e+38, over"}
    for rnd in summary["rounds"][1:]:
        assert rnd["sites_ok"] == 1
        for name, needle in expected.items():
            assert needle in rnd["failures"][name], (name, rnd["failures"][name])
    events = [json.loads(x) for x in (tmp_path / "run" / "audit.log").read_text().splitlines()]
    rejected = sorted((e["round"], e["site"]) for e in events if e["event"] == "update.rejected")
    assert rejected == sorted((r, s) for r in (1, 2) for s in expected)
    assert all(e["sites"] == ["site-0"] for e in events if e["event"] == "round.aggregated")
    final = global_adapter(tmp_path / "run", 2)
    first = global_adapter(tmp_path / "run", 0)
    for name, v in final.items():
        assert np.all(np.isfinite(v))
        assert np.max(np.abs(v - first[name])) <= 2 * update_bound(cfg, 1, first, name)
