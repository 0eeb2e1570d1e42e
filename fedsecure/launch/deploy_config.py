"""Deployment configs: ``configs/coordinator.yaml`` (``fedsecure server``) and ``configs/site.yaml``
(``fedsecure client``). Relative paths are relative to the config file. Validation is strict and
every error names the key and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsecure.config import MetricsSettings, SimulationConfig, SiteSettings, from_mapping
from fedsecure.errors import ConfigError

_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _read(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror}). Fix: pass the path of an existing config file.") \
            from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (not UTF-8). Fix: pass the YAML config file.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}). Fix: correct the file.") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: must be a mapping of sections. Fix: start from the template (configs/coordinator.yaml "
                          "for `fedsecure server`, configs/site.yaml for `fedsecure client`).")
    return doc, p.resolve().parent


def _path(base: Path, value: Any, key: str, *, must_exist: bool = True,
          fix: str = "run `fedsecure certs init` or correct the path") -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a path, got {value!r}. Fix: set {key} in the config.")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    if must_exist and not p.exists():
        raise ConfigError(f"{key}: {p} does not exist. Fix: {fix}.")
    return p


def _section(doc: dict[str, Any], name: str, known: set[str], src: Path) -> dict[str, Any]:
    sec = doc.get(name)
    if not isinstance(sec, dict):
        other = {"server": ("site", "a site's config (for `fedsecure client`)", "coordinator"),
                 "site": ("server", "the coordinator's config (for `fedsecure server`)", "site")}[name]
        if isinstance(doc.get(other[0]), dict):
            raise ConfigError(f"{src} is {other[1]}, not a {other[2]} config. Fix: pass the {other[2]}'s config "
                              f"(template: configs/{other[2]}.yaml).")
        raise ConfigError(f"{src}: the '{name}' section is missing. Fix: see the template "
                          f"configs/{'coordinator' if name == 'server' else 'site'}.yaml.")
    unknown = sorted(set(sec) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key. Known keys here: "
                          f"{', '.join(f'{name}.{k}' for k in sorted(known))}.")
    return sec


def _port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{key}: {value!r} is not a TCP port. Fix: use a number in 1..65535.")
    return value


#: run-config keys that name files or folders (resolved against the coordinator config's folder)
_RUN_PATHS = ("attestation.policy", "model.path", "data.dir", "storage.keyring", "runs_dir",
              "federation.secure_aggregation.roster")


def _resolve_paths(doc: dict[str, Any], base: Path) -> None:
    """Make every relative path in ``doc`` (a coordinator config without ``server``) absolute against ``base``:
    the ServerApp runs in another working directory, so a relative path would name another file there.
    """
    for dotted in _RUN_PATHS:
        *parents, leaf = dotted.split(".")
        node: Any = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            p = Path(node[leaf]).expanduser()
            node[leaf] = str(p if p.is_absolute() else (base / p).resolve())


@dataclass(frozen=True)
class CoordinatorConfig:
    """``coordinator.yaml``: where the coordinator serves, its TLS material, the sites' keys, the run."""
    run_dir: Path
    host: str
    port: int
    tls_ca: Path
    tls_cert: Path
    tls_key: Path
    sites: dict[str, Path]  # site name -> its SuperNode authentication public key (OpenSSH)
    federation: SimulationConfig
    source: Path

    @property
    def address(self) -> str:
        """``host:port`` the SuperLink serves."""
        return f"{self.host}:{self.port}"


def load_coordinator_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> CoordinatorConfig:
    """Read and check ``coordinator.yaml`` (paths relative to the file); applies dotted ``overrides``."""
    from fedsecure.config import set_dotted

    doc, base = _read(path)
    src = Path(path)
    sec = _section(doc, "server", {"run_dir", "host", "port", "tls_ca", "tls_cert", "tls_key", "sites"}, src)
    sites = sec.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise ConfigError("server.sites: must map each site name to its SuperNode public key file "
                          "(auth.pub from `fedsecure certs init --site NAME`).")
    rest = {k: v for k, v in doc.items() if k != "server"}
    if "site" in rest or any(str(k).startswith("site.") for k in (overrides or {})):
        raise ConfigError("site: a coordinator config holds no site settings: each hospital's privacy policy, "
                          "storage and attestation provider are its own (site.yaml). Fix: remove the site section; "
                          "ask for tighter privacy with the privacy section instead.")
    _resolve_paths(rest, base)  # relative to the config file, like every path in it
    for key, value in (overrides or {}).items():  # --set values are the caller's: relative to its directory
        set_dotted(rest, key, str(Path(value).expanduser().resolve())
                   if key in _RUN_PATHS and isinstance(value, str) and value else value)
    rest.setdefault("federation", {})
    if not isinstance(rest["federation"], dict):
        raise ConfigError("federation: must be a mapping.")
    rest["federation"]["sites"] = len(sites)
    federation = from_mapping(SimulationConfig, rest).validate()
    dc = CoordinatorConfig(
        run_dir=_path(base, sec.get("run_dir", "runs/consortium"), "server.run_dir", must_exist=False),
        host=str(sec.get("host", "127.0.0.1")), port=_port(sec.get("port", 9093), "server.port"),
        tls_ca=_path(base, sec.get("tls_ca"), "server.tls_ca"), tls_cert=_path(base, sec.get("tls_cert"),
                                                                                 "server.tls_cert"),
        tls_key=_path(base, sec.get("tls_key"), "server.tls_key"),
        sites={str(n): _path(base, p, f"server.sites.{n}") for n, p in sites.items()},
        federation=federation, source=src)
    _check_policy(federation)
    return dc


def _check_policy(cfg: SimulationConfig) -> None:
    """Read the attestation policy now, so a missing or malformed one stops ``fedsecure server`` at once with
    its own message (the ServerApp would fail later, in Flower's log).
    """
    if not cfg.attestation.enabled:
        return
    if not cfg.attestation.policy:
        raise ConfigError("attestation.policy is not set. Fix: point it at the consortium's policy file (for "
                          "development: `fedsecure attest dev-policy --out policy.yaml` accepts software "
                          "evidence from this build), or set attestation.enabled: false")
    from fedsecure.attestation.policy import load_policy

    if not Path(cfg.attestation.policy).is_file():
        raise ConfigError(f"attestation.policy: {cfg.attestation.policy} does not exist (relative paths are "
                          "relative to the coordinator config). Fix: correct the path, or create a development "
                          f"policy with `fedsecure attest dev-policy --out {cfg.attestation.policy}`")
    load_policy(cfg.attestation.policy)  # AttestationError / ConfigError name the problem


@dataclass(frozen=True)
class SiteConfig:
    """``site.yaml``: how to reach the coordinator, plus the site's own settings (:class:`SiteSettings`)."""

    superlink: str
    tls_ca: Path
    auth_key: Path
    runtime_port: int
    settings: SiteSettings
    source: Path
    warm_worker: bool = True
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings(port=SITE_METRICS_PORT))

    @property
    def name(self) -> str:
        """The site's name."""
        return str(self.settings.name)

    @property
    def data_dir(self) -> Path:
        """The site's data folder."""
        return Path(str(self.settings.data_dir))

    @property
    def state_dir(self) -> Path:
        """The site's state folder (ledgers, keys, residuals)."""
        return Path(str(self.settings.state_dir))

    @property
    def node_config(self) -> dict[str, bool | int | float | str]:
        """What the SuperNode hands every ClientApp: the site's own settings, which no run config can change."""
        return self.settings.to_flat()


#: keys of earlier site.yaml files, and where they live now
_MOVED = {"epsilon": "site.privacy.epsilon_budget", "delta": "site.privacy.delta",
          "attestation_provider": "site.attestation.provider", "keyring": "site.storage.keyring"}
_SITE_KEYS = {"name", "superlink", "tls_ca", "auth_key", "data_dir", "state_dir", "runtime_port", "dataset_id",
              "model_dir", "threads", "warm_worker", "privacy", "limits", "storage", "attestation", "metrics",
              "secagg_roster", "training", "nccl"}
SITE_METRICS_PORT = 9465  # the coordinator's default is 9464: both fit on one host


def _site_metrics(raw: Any) -> MetricsSettings:
    """``site.metrics``: the site's own Prometheus endpoint (its supervisor serves it; off by default)."""
    if raw is None:
        return MetricsSettings(port=SITE_METRICS_PORT)
    if not isinstance(raw, dict):
        raise ConfigError(f"site.metrics: {raw!r} must be a mapping. Fix: e.g. metrics: {{enabled: true, port: "
                          f"{SITE_METRICS_PORT}}}")
    extra = sorted(set(raw) - {"enabled", "host", "port"})
    if extra:
        raise ConfigError(f"site.metrics.{extra[0]}: unknown key. A site's endpoint takes enabled, host and port; "
                          "a site that runs InfluxDB reads it with Telegraf's inputs.prometheus.")
    m = from_mapping(MetricsSettings, {"port": SITE_METRICS_PORT, **raw}, "site.metrics.")
    m.validate("site.metrics")
    return m


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check ``site.yaml``, including the site's privacy policy against its data (delta < 1/N)."""
    from fedsecure.data.dataset import read_jsonl
    from fedsecure.launch.certs import SITE_NAME
    from fedsecure.privacy.policy import check_delta

    doc, base = _read(path)
    src = Path(path)
    if "site" not in doc:
        _section(doc, "site", _SITE_KEYS, src)  # names the coordinator's config, or the missing section
    unknown = sorted(set(doc) - {"site"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section. Fix: a site config holds one 'site' section.")
    raw = doc.get("site")
    if isinstance(raw, dict):
        for old, new in _MOVED.items():
            if old in raw:
                raise ConfigError(f"site.{old}: this key moved to {new} (the site's own policy). Fix: see "
                                  "configs/site.yaml.")
    sec = _section(doc, "site", _SITE_KEYS, src)
    name = sec.get("name")
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise ConfigError(f"site.name: {name!r} must be 1-63 letters, digits, '.', '_' or '-'.")
    superlink = str(sec.get("superlink", ""))
    if not _HOSTPORT.match(superlink):
        raise ConfigError(f"site.superlink: {superlink!r} is not host:port. Fix: e.g. coordinator.example.org:9093.")
    privacy = sec.get("privacy")
    if not isinstance(privacy, dict) or "epsilon_budget" not in privacy or "delta" not in privacy:
        raise ConfigError("site.privacy: the site's own privacy policy must set epsilon_budget and delta (this "
                          "site's budget for each dataset, over every run). Fix: e.g. privacy: {epsilon_budget: 3.0, "
                          "delta: 1.0e-5} (see configs/site.yaml).")
    if privacy.get("delta") is None:
        raise ConfigError("site.privacy.delta: must be a number below 1/N (N = this site's training records), "
                          "e.g. 1.0e-5. Fix: set it in site.yaml.")
    data_dir = _path(base, sec.get("data_dir"), "site.data_dir", fix="create the folder and put the site's "
                     "train.jsonl and eval.jsonl there (one JSON object with a 'text' field per line); for a trial, "
                     "`fedsecure data synth --sites N --out DIR` writes synthetic ones to DIR/site-<i>")
    records = {}
    for split in ("train.jsonl", "eval.jsonl"):
        if not (data_dir / split).is_file():
            raise ConfigError(f"site.data_dir: {data_dir / split} is missing. Fix: put the site's records there "
                              "(one JSON object with a 'text' field per line).")
        records[split] = len(read_jsonl(data_dir / split))  # DataError names an empty or broken file
    rest = {k: sec[k] for k in ("dataset_id", "threads", "privacy", "limits", "storage", "attestation", "training",
                                "nccl") if k in sec}
    storage = dict(rest.get("storage") or {})
    if storage.get("keyring") is not None:
        storage["keyring"] = str(_path(base, storage["keyring"], "site.storage.keyring", must_exist=False))
    rest["storage"] = storage
    model_dir = None
    if sec.get("model_dir") is not None:
        model_dir = str(_path(base, sec["model_dir"], "site.model_dir", fix="point it at this site's copy of the "
                              "model (a Hugging Face model directory)"))
    if sec.get("secagg_roster") is not None:
        rest["secagg_roster"] = str(_path(base, sec["secagg_roster"], "site.secagg_roster", fix="put the "
                                          "consortium's secure-aggregation roster there (site name -> node key)"))
    state_dir = _path(base, sec.get("state_dir"), "site.state_dir", must_exist=False)
    settings = from_mapping(SiteSettings, {**rest, "name": name, "data_dir": str(data_dir),
                                           "state_dir": str(state_dir), "model_dir": model_dir}, "site.").validate()
    bad = check_delta(float(settings.privacy.delta or 0), records["train.jsonl"], "site.privacy.delta")
    if bad is not None:
        raise ConfigError(bad)
    return SiteConfig(superlink=superlink, tls_ca=_path(base, sec.get("tls_ca"), "site.tls_ca"),
                      auth_key=_path(base, sec.get("auth_key"), "site.auth_key"),
                      runtime_port=_port(sec.get("runtime_port", 9094), "site.runtime_port"), settings=settings,
                      source=src, warm_worker=_bool(sec.get("warm_worker", True), "site.warm_worker"),
                      metrics=_site_metrics(sec.get("metrics")))


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} must be true or false.")
    return value


def write_node_config(path: Path, node: Mapping[str, str | int | float | bool]) -> Path:
    """Write the SuperNode's node config as a TOML file (0600): flower-supernode takes ``--node-config FILE.toml``,
    and a file needs no shell quoting, whatever the values hold.
    """
    from fedsecure._durable import atomic_write

    lines = []
    for k, v in node.items():
        if isinstance(v, bool):
            value = "true" if v else "false"
        elif isinstance(v, (int, float)):
            if not math.isfinite(v):
                raise ConfigError(f"node config {k}: {v!r} is not a finite number")
            value = repr(v)
        else:
            value = json.dumps(str(v))  # a JSON string is a valid TOML basic string
        lines.append(f"{json.dumps(k)} = {value}\n")
    atomic_write(path, "".join(lines).encode("utf-8"), mode=0o600)
    return path
