"""A site's own settings and the parsed round: everything a message is checked against before any work.

A site trusts no one with its privacy. Everything it decides for itself (its privacy policy and
limits, where its state, keys and data live, its attestation provider, where its noise comes from)
is its own :class:`~fedsecure.config.SiteSettings`, read from the SuperNode's node config, which only
the site sets. The run config, which the coordinator sets, is a request (see
:mod:`fedsecure.privacy.policy`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message

from fedsecure.config import ModelSettings, SimulationConfig, SiteSettings
from fedsecure.data.dataset import site_dir
from fedsecure.errors import ConfigError, FedSecureError
from fedsecure.federation import keys
from fedsecure.privacy.noise import Randomness, SeededRandomness, SystemRandomness
from fedsecure.privacy.policy import PolicyRefusal, check_limits
from fedsecure.store.site_state import SiteState


def site_settings(context: Context) -> SiteSettings:
    """This site's own settings: from its node config (``site.*``, written by ``fedsecure client`` or the
    in-process engine). A node of Flower's Ray simulation engine, which cannot be given a node config,
    takes the simulated sites' settings from the run config: there one operator runs every party.
    """
    nc = context.node_config
    if any(str(k).startswith(keys.SITE_PREFIX) for k in nc):
        return SiteSettings.from_flat(nc)
    if keys.PARTITION_ID in nc:
        return _ray_site(context)
    raise FedSecureError("this node has no site configuration (no site.* keys in its node config). Fix: start the "
                         "site with `fedsecure client --config site.yaml`, which gives the SuperNode the site's own "
                         "privacy policy, data and state directories.")


def _ray_site(context: Context) -> SiteSettings:
    """A simulated site of Flower's Ray engine: the settings `fedsecure simulate` wrote into the run directory."""
    import yaml

    from fedsecure.config import SimulatedSites, from_mapping

    cfg = SimulationConfig.from_run_config(context.run_config)
    run_dir = Path(str(context.run_config.get("run-dir", "")))
    sites_file = run_dir / keys.SIMULATED_SITES
    if not cfg.data.dir or not sites_file.is_file():
        raise FedSecureError(f"this simulated node finds no site settings ({sites_file}). Fix: run simulations through "
                             "`fedsecure simulate --engine ray`, which writes them.")
    sites = from_mapping(SimulatedSites, yaml.safe_load(sites_file.read_text(encoding="utf-8")) or {}, "site.")
    sites.validate("site")
    pid = int(context.node_config[keys.PARTITION_ID])
    return sites.for_site(f"site-{pid}", site_dir(cfg.data.dir, pid), run_dir)


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A per-site, per-round seed that is the same on every engine (in-process, Ray, deployment)."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def randomness_for(site: SiteSettings, server_round: int) -> Randomness:
    """The OS's secure generator; a known seed only at a simulated site that asked for one."""
    seed = noise_seed_for(site, server_round)
    if seed is not None:
        warnings.warn("site.noise_seed is set: the DP noise and sampling are reproducible by anyone who knows the "
                      "seed, which voids the guarantee. Simulation and tests only.", stacklevel=2)
        return SeededRandomness(seed)
    return SystemRandomness()


def noise_seed_for(site: SiteSettings, server_round: int) -> int | None:
    """The round's noise seed of a simulated site that asked for one; None everywhere else."""
    if site.noise_seed is not None and site.simulated:
        return round_seed(site.noise_seed, server_round, str(site.name))
    return None


def model_settings(cfg: SimulationConfig, site: SiteSettings) -> ModelSettings:
    """The model to load: the run's, but a local model directory is the site's own copy, never a path that
    the coordinator chose (a simulated site may use the simulation's path).
    """
    if not cfg.model.path:
        return cfg.model
    if site.model_dir:
        return dataclasses.replace(cfg.model, path=site.model_dir, preset=None)
    if site.simulated:
        return cfg.model
    raise FedSecureError(f"the run trains a local model (model.path={cfg.model.path}) and this site has no copy "
                         "configured. Fix: set site.model_dir in site.yaml to this site's copy of that model.")


def _seeded_request(context: Context, site: SiteSettings) -> PolicyRefusal | None:
    """A deployed site refuses a run that tries to seed its noise."""
    if site.simulated:
        return None
    for key in ("privacy.noise_seed", "site.noise_seed"):
        value = context.run_config.get(key)
        if value not in (None, ""):
            return PolicyRefusal(key, f"{key}: the run asks for noise seeded with {value!r}; anyone who knows a "
                                      "seed can remove the noise, so this site draws its noise from the operating "
                                      "system's secure generator only. Fix: the coordinator removes the key.")
    return None


# ---------------------------------------------------------------------------- one message
@dataclasses.dataclass
class SiteRound:
    """What one message is about, parsed and checked before any heavy work; ``state`` loads the site's
    keyring at most once for the whole message.
    """

    cfg: SimulationConfig
    site: SiteSettings
    name: str
    server_round: int
    run_id: str
    refusal: PolicyRefusal | None
    state: SiteState


def parse_message(msg: Message, context: Context) -> SiteRound:
    """The run config (a request), this site's own settings and the round, checked; raises FedSecureError."""
    try:
        cfg = SimulationConfig.from_run_config(context.run_config)
    except ConfigError as e:
        raise FedSecureError(f"the run config is invalid: {e}") from None
    site = site_settings(context)
    name = str(site.name or f"node-{context.node_id}")
    context.state.config_records[keys.SITE] = ConfigRecord({keys.SITE_NAME: name})
    if not site.data_dir or not site.state_dir:
        raise FedSecureError(f"{name}: site.data_dir and site.state_dir must be set in the site's own config")
    rec = msg.content.config_records.get(keys.CONFIG)
    server_round = rec.get(keys.SERVER_ROUND) if rec is not None else None
    if isinstance(server_round, bool) or not isinstance(server_round, int) or not 0 <= server_round < 1 << 31:
        raise FedSecureError(f"the coordinator's message has no valid {keys.SERVER_ROUND} ({server_round!r})")
    run_id = f"{Path(str(context.run_config.get('run-dir', ''))).name}/{context.run_id}"
    refusal = _seeded_request(context, site) or check_limits(site.privacy, site.limits, cfg)
    return SiteRound(cfg, site, name, server_round, run_id, refusal, SiteState(site))
