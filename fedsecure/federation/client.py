"""Site side of a round: what the ClientApp in ``client/app.py`` does with each message."""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedsecure.attestation.protocol import (
    NONCE_BYTES,
    dp_config_document,
    site_statement,
    update_digest_payload,
    update_digest_state,
)
from fedsecure.attestation.providers import load_or_create_ed25519, make_provider
from fedsecure.config import ModelSettings, SimulationConfig
from fedsecure.data.dataset import SiteData, load_site, site_dir
from fedsecure.data.tokenizer import TextTokenizer
from fedsecure.errors import FedSecureError
from fedsecure.federation import keys
from fedsecure.federation.records import from_array_record, to_array_record
from fedsecure.model import adapter_delta, adapter_state, attach_lora, load_model_and_tokenizer, set_adapter_state
from fedsecure.privacy.dpsgd import DPStepPlan, train_private
from fedsecure.privacy.site import Refusal, SitePrivacyGuard
from fedsecure.storage import site_keyring
from fedsecure.training import evaluate, train_local
from fedsecure.transport.session import fed_back, load_residual, save_residual, site_encode, site_receive

log = logging.getLogger(__name__)

#: Error code of a reply whose site could not do the work (bad data, bad adapter, ...).
ERR_SITE = 4001


@lru_cache(maxsize=2)
def _model(settings: ModelSettings) -> tuple[torch.nn.Module, TextTokenizer]:
    # The base model is loaded once per process; every message overwrites all LoRA weights
    # with the global adapter before use, so reusing the module between sites is safe.
    base, tokenizer = load_model_and_tokenizer(settings)
    return attach_lora(base, settings.lora), tokenizer


def _site_data(directory: str, tokenizer: TextTokenizer, max_length: int) -> SiteData:
    """The site's tokenized data, cached per process until a file changes (size or mtime)."""
    stamp = []
    for split in ("train.jsonl", "eval.jsonl"):
        try:
            st = (Path(directory) / split).stat()
            stamp.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return _load_site_cached(directory, tokenizer, max_length, tuple(stamp))


@lru_cache(maxsize=16)
def _load_site_cached(directory: str, tokenizer: TextTokenizer, max_length: int, stamp: tuple) -> SiteData:
    return load_site(directory, tokenizer, max_length)


def site_identity(context: Context, cfg: SimulationConfig) -> tuple[str, Path]:
    """(site name, site data directory) from the node config."""
    nc = context.node_config
    if keys.NODE_DATA_DIR in nc:
        directory = Path(str(nc[keys.NODE_DATA_DIR]))
        return str(nc.get(keys.NODE_SITE_NAME, directory.name)), directory
    if keys.PARTITION_ID not in nc:
        raise FedSecureError("this node has neither 'data-dir' nor 'partition-id' in its node config. "
                             "Fix: start the SuperNode with --node-config 'data-dir=\"/path/to/site\"'.")
    if not cfg.data.dir:
        raise FedSecureError("data.dir is not set, so a simulated site cannot find its data. "
                             "Fix: set data.dir (fedsecure simulate does this for you).")
    pid = int(nc[keys.PARTITION_ID])
    return str(nc.get(keys.NODE_SITE_NAME, f"site-{pid}")), site_dir(cfg.data.dir, pid)


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A per-site, per-round seed that is the same on every engine (in-process, Ray, deployment)."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _prepare(msg: Message, context: Context):
    cfg = SimulationConfig.from_run_config(context.run_config)
    name, directory = site_identity(context, cfg)
    context.state.config_records[keys.SITE] = ConfigRecord({keys.SITE_NAME: name})
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model, tokenizer = _model(cfg.model)
    data = _site_data(str(directory), tokenizer, cfg.data.max_length)
    global_state = _receive_global(msg, context, cfg, model)
    set_adapter_state(model, global_state)
    return cfg, name, model, tokenizer, data, global_state


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


def _site_record(name: str, data: SiteData) -> ConfigRecord:
    return ConfigRecord({keys.SITE_NAME: name, keys.DATASET_FINGERPRINT: data.fingerprint})


def state_dir(context: Context, cfg: SimulationConfig, name: str) -> Path:
    """Where this site's ledger lives: node config, else privacy.state_dir/<site>, else <run-dir>/sites/<site>."""
    if keys.NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[keys.NODE_STATE_DIR]))
    if cfg.privacy.state_dir:
        return Path(cfg.privacy.state_dir) / name
    run_dir = context.run_config.get("run-dir")
    if not run_dir:
        raise FedSecureError("no place for the privacy ledger: set privacy.state_dir, or start the SuperNode "
                             "with --node-config 'state-dir=\"/secure/site-state\"'.")
    return Path(str(run_dir)) / "sites" / name


def handle_train(msg: Message, context: Context) -> Message:
    """Check the budget, train (DP-SGD), charge the ledger, then reply with the adapter delta."""
    try:
        cfg, name, model, tokenizer, data, global_state = _prepare(msg, context)
        server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
        seed = round_seed(cfg.seed, server_round, name)
        attester = _attester(msg, context, cfg, name)
        run_id = f"{Path(str(context.run_config.get('run-dir', ''))).name}/{context.run_id}"
        if not cfg.privacy.enabled:
            log.warning("%s: differential privacy is OFF: this update is not private. Simulation only.", name)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                result = train_local(model, data.train, cfg.train, pad_id=tokenizer.pad_id, seed=seed)
            delta_state = adapter_delta(adapter_state(model), global_state)
            privacy, dp_metrics = ConfigRecord({keys.STATUS: keys.STATUS_NON_PRIVATE}), {}
            dp_config = dp_config_document(enabled=False)
        else:
            # The ledger is keyed by the dataset, not the run: by its content fingerprint, or by a
            # stable id the site pins in its node config (so an edited or extended dataset keeps
            # charging the same ledger instead of starting a fresh budget).
            dataset_key = str(context.node_config.get(keys.NODE_DATASET_ID, data.fingerprint))
            site_state = state_dir(context, cfg, name)
            guard = SitePrivacyGuard(cfg.privacy, state_dir=site_state, dataset=dataset_key,
                                     num_records=len(data.train), node_config=context.node_config,
                                     ring=site_keyring(cfg, site_state, name, context.node_config))
            stored = context.state.config_records.get(keys.STATE_PLAN)
            decision = guard.plan(server_round=server_round, rounds_total=cfg.federation.rounds,
                                  local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size,
                                  sigma_hint=float(stored["sigma"]) if stored else None)
            if isinstance(decision, Refusal):
                log.warning("%s: refusing round %d: %s", name, server_round, decision.reason)
                return Message(_refusal_content(name, data, guard, decision), reply_to=msg)
            context.state.config_records[keys.STATE_PLAN] = ConfigRecord({"sigma": decision.plan.sigma})
            if cfg.privacy.noise_seed is not None:
                warnings.warn("privacy.noise_seed is set: the DP noise and sampling are reproducible by anyone who "
                              "knows the seed, which voids the guarantee. Use it for tests only.", stacklevel=1)
            noise_seed = None if cfg.privacy.noise_seed is None else round_seed(cfg.privacy.noise_seed,
                                                                                 server_round, name)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                result = train_private(model, data.train, cfg.train, decision.plan, pad_id=tokenizer.pad_id,
                                       seed=noise_seed, grad_sample_mode=cfg.privacy.grad_sample_mode)
            delta_state = adapter_delta(adapter_state(model), global_state)
            # Spend before release: the entry is on disk (fsynced) before the update can leave.
            entry = guard.record(decision, run_id=run_id, server_round=server_round)
            privacy = _privacy_record(guard, keys.STATUS_TRAINED)
            dp_metrics = _dp_metrics(guard, entry.epsilon_after, decision.plan)
            dp_config = _dp_config(guard, decision.plan, entry.epsilon_after, cfg)
        update = _encode_update(context, cfg, name, run_id, delta_state, seed ^ 0xC0DEC)
        attestation = _attest(attester, dp_config, update, delta_state)
    except FedSecureError as e:
        return _error_reply(msg, context, "train", e)
    metrics = MetricRecord({keys.NUM_EXAMPLES: result.examples, keys.TRAIN_LOSS: result.loss,
                            keys.STEPS: result.steps, keys.SECONDS: result.seconds, **dp_metrics})
    content = RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(name, data), keys.PRIVACY: privacy})
    if update is None:
        content[keys.ARRAYS] = to_array_record(delta_state)
    else:
        content[keys.UPDATE] = ConfigRecord({keys.PAYLOAD: update})
    if attestation is not None:
        content[keys.ATTESTATION] = attestation
    return Message(content, reply_to=msg)


def _dp_config(guard: SitePrivacyGuard, plan: DPStepPlan, epsilon_spent: float, cfg: SimulationConfig) -> str:
    """The DP settings of this round, as the site attests them (the coordinator checks them against policy)."""
    return dp_config_document(enabled=True, epsilon_budget=guard.epsilon_budget, delta=guard.delta,
                              sigma=plan.sigma, q=plan.q, steps=plan.steps,
                              max_grad_norm=guard.settings.max_grad_norm, accountant=guard.accountant,
                              epsilon_spent=epsilon_spent, grad_sample_mode=cfg.privacy.grad_sample_mode)


def _attester(msg: Message, context: Context, cfg: SimulationConfig, name: str):
    """(nonce, provider, node key) when the coordinator sent a challenge, else None. Built before training,
    so a misconfigured provider fails before any privacy budget is spent."""
    nonce = msg.content[keys.CONFIG].get(keys.ATTEST_NONCE)
    if nonce is None:
        return None
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise FedSecureError("the coordinator's attestation nonce is malformed")
    site_state = state_dir(context, cfg, name)
    provider_name = str(context.node_config.get(keys.NODE_ATTEST_PROVIDER, cfg.attestation.provider))
    provider = make_provider(provider_name, state_dir=site_state, command=cfg.attestation.command,
                             configfs_root=cfg.attestation.configfs_root)
    return nonce, provider, load_or_create_ed25519(site_state / "attestation" / "node-key.pem")


def _attest(attester, dp_config: str, update: bytes | None, delta_state) -> ConfigRecord | None:
    """Answer the challenge: evidence bound to the nonce, our node key, DP settings and code; the node key
    signs the update."""
    if attester is None:
        return None
    nonce, provider, node_key = attester
    digest = update_digest_state(delta_state) if update is None else update_digest_payload(update)
    return ConfigRecord(site_statement(provider, node_key, nonce, dp_config, digest))


def _encode_update(context: Context, cfg: SimulationConfig, name: str, run_id: str, delta,
                   seed: int) -> bytes | None:
    """Compress the (already DP-noised) delta; the error-feedback residual stays sealed at the site."""
    if not cfg.transport.enabled:
        return None
    residual, ring, site_state = None, None, None
    if fed_back(cfg.transport, delta):  # top-k or round-to-nearest somewhere: keep what it leaves out
        site_state = state_dir(context, cfg, name)
        ring = site_keyring(cfg, site_state, name, context.node_config)
        residual = load_residual(site_state, ring, run_id, delta)
    payload, new_residual = site_encode(delta, residual, cfg.transport, seed)
    if site_state is not None:
        save_residual(site_state, ring, run_id, new_residual)
    return payload


def _privacy_record(guard: SitePrivacyGuard, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({keys.STATUS: status, keys.ACCOUNTANT: guard.accountant, keys.LEDGER_HEAD: guard.ledger.head,
                         keys.LEDGER_ENTRIES: len(guard.ledger.entries), keys.REASON: reason})


def _dp_metrics(guard: SitePrivacyGuard, epsilon: float, plan: DPStepPlan | None) -> dict[str, float | int]:
    return {keys.DP_EPSILON: epsilon, keys.DP_EPSILON_BUDGET: guard.epsilon_budget, keys.DP_DELTA: guard.delta,
            keys.DP_SIGMA: plan.sigma if plan else 0.0, keys.DP_Q: plan.q if plan else 0.0,
            keys.DP_STEPS: plan.steps if plan else 0, keys.DP_MAX_GRAD_NORM: guard.settings.max_grad_norm}


def _refusal_content(name: str, data: SiteData, guard: SitePrivacyGuard, refusal: Refusal) -> RecordDict:
    """The structured "budget exhausted" answer: privacy numbers, no arrays, nothing trained."""
    metrics = MetricRecord({keys.NUM_EXAMPLES: 0, **_dp_metrics(guard, refusal.epsilon_spent, None),
                            "dp.epsilon-if-trained": refusal.epsilon_if_trained
                            if math.isfinite(refusal.epsilon_if_trained) else -1.0})
    return RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(name, data),
                       keys.PRIVACY: _privacy_record(guard, keys.STATUS_EXHAUSTED, refusal.reason)})


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Held-out loss of the global adapter on this site's eval split."""
    try:
        cfg, name, model, tokenizer, data, _ = _prepare(msg, context)
        start = time.perf_counter()
        loss, tokens = evaluate(model, data.eval, pad_id=tokenizer.pad_id)
        seconds = time.perf_counter() - start
    except FedSecureError as e:
        return _error_reply(msg, context, "evaluate", e)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(data.eval), keys.EVAL_LOSS: loss, keys.EVAL_TOKENS: tokens,
                            keys.SECONDS: seconds})
    return Message(RecordDict({keys.METRICS: metrics, keys.SITE: _site_record(name, data)}), reply_to=msg)
