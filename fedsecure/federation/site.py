"""Site side of a round: what the ClientApp in ``client/app.py`` does with each message.

The message is parsed and checked first (:mod:`fedsecure.federation.site_settings`: the site's own
settings, the run's request against the site's policy and limits). The run config, which the
coordinator sets, is a request: the training plan, the model, the transport, and privacy settings
that :func:`fedsecure.privacy.policy.resolve` may only tighten. A request the site will not honour is
refused with the key, both values and the fix; the refusal is written to the site's ledger and
reported to the coordinator, which audits it. Spend before release: the ledger entry is durable
before the update leaves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedsecure.attestation.protocol import (
    NONCE_BYTES,
    SECAGG_UPDATE_DIGEST,
    site_statement,
    update_digest_payload,
    update_digest_state,
)
from fedsecure.attestation.providers import load_or_create_ed25519, make_provider
from fedsecure.config import ModelSettings, SimulationConfig, SiteSettings
from fedsecure.data.dataset import SiteData, fingerprint, load_site
from fedsecure.data.tokenizer import TextTokenizer
from fedsecure.errors import DataError, FedSecureError
from fedsecure.federation import keys, site_events
from fedsecure.federation.records import from_array_record, to_array_record
from fedsecure.federation.secagg_site import keep_update
from fedsecure.federation.site_settings import (
    SiteRound,
    model_settings,
    noise_seed_for,
    parse_message,
    randomness_for,
    round_seed,
)
from fedsecure.model import adapter_delta, adapter_state, attach_lora, load_model_and_tokenizer, set_adapter_state
from fedsecure.observe.hardware import EnergyMeter
from fedsecure.privacy.dpconfig import DPConfig
from fedsecure.privacy.guard import DPStepPlan, Refusal, SitePrivacyGuard
from fedsecure.privacy.ledger import PrivacyLedger
from fedsecure.privacy.noise import Randomness
from fedsecure.privacy.policy import PolicyRefusal, resolve, site_delta
from fedsecure.training.dpsgd import train_private
from fedsecure.training.local import TrainResult, evaluate, train_local
from fedsecure.training.spawn import RankJob, run_ranks, world_size
from fedsecure.transport.session import fed_back, site_encode, site_receive

log = logging.getLogger(__name__)

#: Error code of a reply whose site could not do the work (bad data, bad adapter, ...).
ERR_SITE = 4001


@lru_cache(maxsize=2)
def _model(settings: ModelSettings) -> tuple[torch.nn.Module, TextTokenizer]:
    # The base model is loaded once per process; every message overwrites all LoRA weights
    # with the global adapter before use, so reusing the module between sites is safe.
    base, tokenizer = load_model_and_tokenizer(settings)
    return attach_lora(base, settings.lora), tokenizer


def _stamp(directory: str) -> tuple:
    stamp = []
    for split in ("train.jsonl", "eval.jsonl"):
        try:
            st = (Path(directory) / split).stat()
            stamp.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def _site_data(directory: str, tokenizer: TextTokenizer, max_length: int) -> SiteData:
    """The site's tokenized data, cached per process until a file changes (size or mtime)."""
    return _load_site_cached(directory, tokenizer, max_length, _stamp(directory))


@lru_cache(maxsize=16)
def _load_site_cached(directory: str, tokenizer: TextTokenizer, max_length: int, stamp: tuple) -> SiteData:
    return load_site(directory, tokenizer, max_length)


@lru_cache(maxsize=16)
def _fingerprint_cached(directory: str, stamp: tuple) -> str:
    train = Path(directory) / "train.jsonl"
    try:
        return fingerprint([train])
    except OSError as e:
        raise DataError(f"site data file {train} cannot be read ({e.strerror or e}). Fix: put the site's training "
                        "records there (one JSON object with a 'text' field per line).") from None


# ---------------------------------------------------------------------------- one message
def _load(r: SiteRound, msg: Message, context: Context):
    if r.site.threads:
        torch.set_num_threads(r.site.threads)
    settings = model_settings(r.cfg, r.site)
    if _world(r) > 1:  # the ranks train on the accelerators; the worker's copy only keeps the adapter's books
        settings = dataclasses.replace(settings, device="cpu")
    model, tokenizer = _model(settings)
    data = _site_data(str(r.site.data_dir), tokenizer, r.cfg.data.max_length)
    global_state = _receive_global(msg, context, r.cfg, model)
    set_adapter_state(model, global_state)
    return model, tokenizer, data, global_state


def _receive_global(msg: Message, context: Context, cfg: SimulationConfig, model: torch.nn.Module):
    """The global adapter: plain arrays, or the encoded downlink applied to what this site holds."""
    if keys.ARRAYS in msg.content:
        return from_array_record(msg.content[keys.ARRAYS])
    rec = msg.content[keys.CONFIG]
    if keys.DOWNLINK not in rec:
        raise FedSecureError("the coordinator sent neither an adapter nor an encoded update")
    held = from_array_record(context.state[keys.STATE_VIEW]) if keys.STATE_VIEW in context.state else None
    view = site_receive(rec[keys.DOWNLINK], str(rec[keys.DOWNLINK_BASE]), held, adapter_state(model), cfg.transport)
    context.state[keys.STATE_VIEW] = to_array_record(view)
    return view


def _error_reply(msg: Message, context: Context, what: str, e: Exception) -> Message:
    """An error reply whose reason names the site, so the coordinator can say who failed and why."""
    known = context.state.config_records.get(keys.SITE)
    name = str(known[keys.SITE_NAME]) if known else f"node {context.node_id}"
    log.error("%s: %s failed: %s", name, what, e)
    return Message(Error(code=ERR_SITE, reason=f"{name}: {e}"), reply_to=msg)


def _site_record(r: SiteRound) -> ConfigRecord:
    return ConfigRecord({keys.SITE_NAME: r.name, keys.DATASET_FINGERPRINT: _content_fingerprint(r.site)})


def _content_fingerprint(site: SiteSettings) -> str:
    return _fingerprint_cached(str(site.data_dir), _stamp(str(site.data_dir)))


def dataset_key(site: SiteSettings) -> str:
    """The ledger's key: a stable id the site pins (so an edited or extended dataset keeps charging the same
    ledger), or the content fingerprint of its training file.
    """
    return site.dataset_id or _content_fingerprint(site)


def _event(r: SiteRound, event: str, **fields) -> None:
    site_events.record(r.state.root, event, run=r.run_id, round=r.server_round, rounds=r.cfg.federation.rounds,
                       **fields)


def handle_train(msg: Message, context: Context) -> Message:
    """Check the request against the site's policy and budget, train (DP-SGD), charge the ledger, then reply."""
    r: SiteRound | None = None
    try:
        r = parse_message(msg, context)
        dataset = dataset_key(r.site)
        if r.refusal is not None:  # the sizes or the noise seed: refused before anything is loaded
            return _refuse(msg, r, dataset, r.refusal.reason)
        attester = _attester(msg, r.site, r.name)
        model, tokenizer, data, global_state = _load(r, msg, context)
        terms = resolve(r.site.privacy, r.site.limits, r.cfg, len(data.train))
        if isinstance(terms, PolicyRefusal):
            return _refuse(msg, r, dataset, terms.reason, len(data.train))
        seed = round_seed(r.cfg.seed, r.server_round, r.name)
        if not terms.private:
            log.warning("%s: differential privacy is OFF (the site's own policy allows it): this update is not "
                        "private", r.name)
            ledger = PrivacyLedger.open(r.state.root, dataset, files=r.state.files)
            meter = EnergyMeter().start()
            result = _train(r, model, tokenizer, data, global_state, seed, None, None)
            delta_state = adapter_delta(adapter_state(model), global_state)
            ledger.append_non_private(run_id=r.run_id, server_round=r.server_round, steps=result.steps,
                                      epsilon_budget=r.site.privacy.epsilon_budget)
            _event(r, site_events.NON_PRIVATE, records=len(data.train), steps=result.steps, loss=result.loss,
                   seconds=result.seconds, energy_j=meter.joules())
            privacy = ConfigRecord({keys.STATUS: keys.STATUS_NON_PRIVATE})
            dp_metrics: dict[str, float | int] = {}
            dp_config = DPConfig(enabled=False, records=len(data.train)).to_json()
        else:
            guard = SitePrivacyGuard(terms, state_dir=r.state.root, dataset=dataset, num_records=len(data.train),
                                     files=r.state.files)
            if guard.ledger.trained(r.run_id, r.server_round):
                return _refuse(msg, r, dataset, f"round {r.server_round} of run {r.run_id} was already "
                               "trained and released: a replayed message is not trained again. Fix: a coordinator "
                               "sends each round once (a restarted run is a new Flower run)", len(data.train),
                               guard=guard)
            stored = context.state.config_records.get(keys.STATE_PLAN)
            decision = guard.plan(server_round=r.server_round, rounds_total=r.cfg.federation.rounds,
                                  sigma_hint=float(stored["sigma"]) if stored else None)
            if isinstance(decision, Refusal):
                log.warning("%s: refusing round %d: %s", r.name, r.server_round, decision.reason)
                guard.refuse(f"budget exhausted: {decision.reason}", run_id=r.run_id, server_round=r.server_round)
                _event(r, site_events.EXHAUSTED, epsilon=decision.epsilon_spent, budget=decision.epsilon_budget,
                       reason=decision.reason)
                return Message(_exhausted_content(r, guard, decision), reply_to=msg)
            if stored is None:  # the run's first round here: is it spending what earlier runs left?
                warning = guard.remnant(decision, server_round=r.server_round, rounds_total=r.cfg.federation.rounds)
                if warning is not None:
                    log.warning("%s: %s", r.name, warning)
                    _event(r, site_events.REMNANT, reason=warning)
            context.state.config_records[keys.STATE_PLAN] = ConfigRecord({"sigma": decision.plan.sigma})
            randomness = randomness_for(r.site, r.server_round)
            meter = EnergyMeter().start()
            result = _train(r, model, tokenizer, data, global_state, seed, decision.plan, randomness)
            delta_state = adapter_delta(adapter_state(model), global_state)
            # Spend before release: the entry is on disk (fsynced) before the update can leave.
            entry = guard.record(decision, run_id=r.run_id, server_round=r.server_round)
            privacy = _privacy_record(guard, keys.STATUS_TRAINED)
            dp_metrics = _dp_metrics(guard, entry.epsilon_after, decision.plan)
            dp_config = _dp_config(guard, decision.plan, entry.epsilon_after, r.cfg, randomness, len(data.train))
            _event(r, site_events.TRAINED, records=len(data.train), steps=result.steps, loss=result.loss,
                   sigma=decision.plan.sigma, epsilon=entry.epsilon_after, budget=guard.epsilon_budget,
                   seconds=result.seconds, energy_j=meter.joules())
        masked = r.cfg.federation.secure_aggregation.enabled
        if masked:  # the update leaves only masked, in the round's secure-aggregation messages
            keep_update(context, r.run_id, r.server_round, delta_state)
        update = None if masked else _encode_update(r, delta_state, seed ^ 0xC0DEC)
        attestation = _attest(attester, dp_config, update, delta_state, masked)
    except FedSecureError as e:
        if r is not None:
            _event(r, site_events.FAILED, reason=str(e))
        return _error_reply(msg, context, "train", e)
    metrics = MetricRecord({keys.NUM_EXAMPLES: result.examples, keys.TRAIN_LOSS: result.loss,
                            keys.STEPS: result.steps, keys.SECONDS: result.seconds, **dp_metrics})
    content = RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(r), keys.PRIVACY: privacy})
    if update is not None:
        content[keys.UPDATE] = ConfigRecord({keys.PAYLOAD: update})
    elif not masked:
        content[keys.ARRAYS] = to_array_record(delta_state)
    if attestation is not None:
        content[keys.ATTESTATION] = attestation
    return Message(content, reply_to=msg)


def _world(r: SiteRound) -> int:
    return world_size(r.site.training, model_settings(r.cfg, r.site).device)


def _train(r: SiteRound, model: torch.nn.Module, tokenizer: TextTokenizer, data: SiteData, global_state,
           seed: int, plan: DPStepPlan | None, randomness: Randomness | None) -> TrainResult:
    """This round's local training: in this process, or in ``site.training.processes`` ranks (the model then
    takes the adapter rank 0 returns). A rank that fails raises before anything is spent or released.
    """
    world = _world(r)
    if world > 1:
        ms = model_settings(r.cfg, r.site)
        job = RankJob(model=ms, data_dir=str(r.site.data_dir), max_length=r.cfg.data.max_length, train=r.cfg.train,
                      plan=plan, seed=seed, grad_sample_mode=r.cfg.privacy.grad_sample_mode)
        out = run_ranks(job, global_state, world=world, training=r.site.training, nccl=r.site.nccl,
                        randomness=randomness, noise_seed=noise_seed_for(r.site, r.server_round),
                        threads=r.site.threads, device=ms.device)
        set_adapter_state(model, out.state)
        if plan is not None and out.noise_draws[1:] != [0] * (world - 1):  # one draw per step, on rank 0
            raise FedSecureError(f"ranks other than 0 drew noise ({out.noise_draws}): nothing is released")
        return out.result
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if plan is None:
            return train_local(model, data.train, r.cfg.train, pad_id=tokenizer.pad_id, seed=seed)
        return train_private(model, data.train, r.cfg.train, plan, pad_id=tokenizer.pad_id, randomness=randomness,
                             grad_sample_mode=r.cfg.privacy.grad_sample_mode)


def _refuse(msg: Message, r: SiteRound, dataset: str, reason: str, num_records: int | None = None,
            guard: SitePrivacyGuard | None = None) -> Message:
    """Refuse this round: record why in the site's ledger (nothing is spent), and tell the coordinator."""
    log.warning("%s: refusing round %d: %s", r.name, r.server_round, reason)
    _event(r, site_events.REFUSED, reason=reason)
    if guard is not None:
        entry = guard.refuse(reason, run_id=r.run_id, server_round=r.server_round)
    else:
        policy = r.site.privacy
        accountant = policy.accountants[0]
        delta = site_delta(policy, num_records or 1)
        ledger = PrivacyLedger.open(r.state.root, dataset, files=r.state.files)
        entry = ledger.append_refusal(run_id=r.run_id, server_round=r.server_round, reason=reason, delta=delta,
                                      accountant=accountant, epsilon_spent=ledger.epsilon(delta, accountant),
                                      epsilon_budget=policy.epsilon_budget)
    privacy = ConfigRecord({keys.STATUS: keys.STATUS_REFUSED, keys.ACCOUNTANT: entry.accountant,
                            keys.LEDGER_HEAD: entry.hash, keys.LEDGER_ENTRIES: entry.seq + 1, keys.REASON: reason})
    metrics = MetricRecord({keys.NUM_EXAMPLES: 0})
    return Message(RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(r), keys.PRIVACY: privacy}),
                   reply_to=msg)


def _dp_config(guard: SitePrivacyGuard, plan: DPStepPlan, epsilon_spent: float, cfg: SimulationConfig,
               randomness: Randomness, records: int) -> str:
    """The DP settings of this round, as the site attests them (the coordinator checks them against policy)."""
    return DPConfig(enabled=True, records=records, epsilon_budget=guard.epsilon_budget, delta=guard.delta,
                    sigma=plan.sigma, q=plan.q, steps=plan.steps, max_grad_norm=plan.max_grad_norm,
                    accountant=guard.accountant, epsilon_spent=epsilon_spent,
                    grad_sample_mode=cfg.privacy.grad_sample_mode, noise=randomness.name).to_json()


def _attester(msg: Message, site: SiteSettings, name: str):
    """(nonce, provider, node key) when the coordinator sent a challenge, else None. Built before training,
    so a misconfigured provider fails before any privacy budget is spent. The provider is the site's own.
    """
    nonce = msg.content[keys.CONFIG].get(keys.ATTEST_NONCE)
    if nonce is None:
        return None
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise FedSecureError("the coordinator's attestation nonce is malformed")
    state = Path(str(site.state_dir))
    att = site.attestation
    provider = make_provider(att.provider, state_dir=state, command=att.command, configfs_root=att.configfs_root)
    return nonce, provider, load_or_create_ed25519(state / "attestation" / "node-key.pem")


def _attest(attester, dp_config: str, update: bytes | None, delta_state, masked: bool = False
            ) -> ConfigRecord | None:
    """Answer the challenge: evidence bound to the nonce, our node key, DP settings and code; the node key
    signs the update (under secure aggregation, a fixed digest: the masked vector is signed when it is sent).
    """
    if attester is None:
        return None
    nonce, provider, node_key = attester
    if masked:
        digest = SECAGG_UPDATE_DIGEST
    else:
        digest = update_digest_state(delta_state) if update is None else update_digest_payload(update)
    return ConfigRecord(site_statement(provider, node_key, nonce, dp_config, digest))


def _encode_update(r: SiteRound, delta, seed: int) -> bytes | None:
    """Compress the (already DP-noised) delta; the error-feedback residual stays sealed at the site."""
    ts = r.cfg.transport
    if not ts.enabled:
        return None
    fed = bool(fed_back(ts, delta))  # top-k or round-to-nearest somewhere: keep what it leaves out
    residual = r.state.load_residual(r.run_id, delta) if fed else None
    payload, new_residual = site_encode(delta, residual, ts, seed)
    if fed:
        r.state.save_residual(r.run_id, new_residual)
    return payload


def _privacy_record(guard: SitePrivacyGuard, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({keys.STATUS: status, keys.ACCOUNTANT: guard.accountant, keys.LEDGER_HEAD: guard.ledger.head,
                         keys.LEDGER_ENTRIES: len(guard.ledger.entries), keys.REASON: reason})


def _dp_metrics(guard: SitePrivacyGuard, epsilon: float, plan: DPStepPlan | None) -> dict[str, float | int]:
    return {keys.DP_EPSILON: epsilon, keys.DP_EPSILON_BUDGET: guard.epsilon_budget, keys.DP_DELTA: guard.delta,
            keys.DP_SIGMA: plan.sigma if plan else 0.0, keys.DP_Q: plan.q if plan else 0.0,
            keys.DP_STEPS: plan.steps if plan else 0,
            keys.DP_MAX_GRAD_NORM: plan.max_grad_norm if plan else guard.terms.clip}


def _exhausted_content(r: SiteRound, guard: SitePrivacyGuard, refusal: Refusal) -> RecordDict:
    """The structured "budget exhausted" answer: privacy numbers, no arrays, nothing trained."""
    metrics = MetricRecord({keys.NUM_EXAMPLES: 0, **_dp_metrics(guard, refusal.epsilon_spent, None),
                            keys.DP_EPSILON_IF_TRAINED: refusal.epsilon_if_trained
                            if math.isfinite(refusal.epsilon_if_trained) else -1.0})
    return RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(r),
                       keys.PRIVACY: _privacy_record(guard, keys.STATUS_EXHAUSTED, refusal.reason)})


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Held-out loss of the global adapter on this site's eval split."""
    r: SiteRound | None = None
    try:
        r = parse_message(msg, context)
        if r.refusal is not None:
            raise FedSecureError(f"refused: {r.refusal.reason}")
        model, tokenizer, data, _ = _load(r, msg, context)
        start = time.perf_counter()
        loss, tokens = evaluate(model, data.eval, pad_id=tokenizer.pad_id)
        seconds = time.perf_counter() - start
    except FedSecureError as e:
        if r is not None:
            _event(r, site_events.FAILED, reason=f"evaluation: {e}")
        return _error_reply(msg, context, "evaluate", e)
    _event(r, site_events.EVALUATED, loss=loss, records=len(data.eval))
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(data.eval), keys.EVAL_LOSS: loss, keys.EVAL_TOKENS: tokens,
                            keys.SECONDS: seconds})
    return Message(RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(r)}), reply_to=msg)


