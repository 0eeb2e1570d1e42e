"""Site side of a round: what the ClientApp in ``client/app.py`` does with each message."""

from __future__ import annotations

import hashlib
import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedsecure.config import ModelSettings, SimulationConfig
from fedsecure.data.dataset import SiteData, load_site, site_dir
from fedsecure.data.tokenizer import TextTokenizer
from fedsecure.errors import FedSecureError
from fedsecure.federation import keys
from fedsecure.federation.records import from_array_record, to_array_record
from fedsecure.model import adapter_delta, adapter_state, attach_lora, load_model_and_tokenizer, set_adapter_state
from fedsecure.training import evaluate, train_local

log = logging.getLogger(__name__)

#: Error code of a reply whose site could not do the work (bad data, bad adapter, ...).
ERR_SITE = 4001


@lru_cache(maxsize=2)
def _model(settings: ModelSettings) -> tuple[torch.nn.Module, TextTokenizer]:
    # The base model is loaded once per process; every message overwrites all LoRA weights
    # with the global adapter before use, so reusing the module between sites is safe.
    base, tokenizer = load_model_and_tokenizer(settings)
    return attach_lora(base, settings.lora), tokenizer


@lru_cache(maxsize=16)
def _site_data(directory: str, tokenizer: TextTokenizer, max_length: int) -> SiteData:
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
    global_state = from_array_record(msg.content[keys.ARRAYS])
    set_adapter_state(model, global_state)
    return cfg, name, model, tokenizer, data, global_state


def _error_reply(msg: Message, context: Context, what: str, e: Exception) -> Message:
    """An error reply whose reason names the site, so the coordinator can say who failed and why."""
    known = context.state.config_records.get(keys.SITE)
    name = str(known[keys.SITE_NAME]) if known else f"node {context.node_id}"
    log.error("%s: %s failed: %s", name, what, e)
    return Message(Error(code=ERR_SITE, reason=f"{name}: {e}"), reply_to=msg)


def _site_record(name: str, data: SiteData) -> ConfigRecord:
    return ConfigRecord({keys.SITE_NAME: name, keys.DATASET_FINGERPRINT: data.fingerprint})


def handle_train(msg: Message, context: Context) -> Message:
    """Set the global adapter, train locally, reply with the adapter delta and metrics."""
    try:
        cfg, name, model, tokenizer, data, global_state = _prepare(msg, context)
        server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
        seed = round_seed(cfg.seed, server_round, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            result = train_local(model, data.train, cfg.train, pad_id=tokenizer.pad_id, seed=seed)
        delta = adapter_delta(adapter_state(model), global_state)
    except FedSecureError as e:
        return _error_reply(msg, context, "train", e)
    metrics = MetricRecord({keys.NUM_EXAMPLES: result.examples, keys.TRAIN_LOSS: result.loss,
                            keys.STEPS: result.steps, keys.SECONDS: result.seconds})
    content = RecordDict({keys.ARRAYS: to_array_record(delta), keys.METRICS: metrics,
                          keys.SITE: _site_record(name, data)})
    return Message(content, reply_to=msg)


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
