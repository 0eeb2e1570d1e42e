"""Deployment configs: ``configs/coordinator.yaml`` (``fedsecure server``) and ``configs/site.yaml``
(``fedsecure client``). Relative paths are relative to the config file. Validation is strict and
every error names the key and the fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsecure.config import SimulationConfig, from_mapping
from fedsecure.errors import ConfigError

_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _read(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror}). Fix: pass the path of an existing config file.") \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}). Fix: correct the file.") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: must be a mapping of sections. Fix: see configs/{p.name}.")
    return doc, p.resolve().parent


def _path(base: Path, value: Any, key: str, *, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a path, got {value!r}. Fix: set {key} in the config.")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    if must_exist and not p.exists():
        raise ConfigError(f"{key}: {p} does not exist. Fix: run `fedsecure certs init` or correct the path.")
    return p


def _section(doc: dict[str, Any], name: str, known: set[str], src: Path) -> dict[str, Any]:
    sec = doc.get(name)
    if not isinstance(sec, dict):
        raise ConfigError(f"{src}: the '{name}' section is missing. Fix: see configs/{src.name}.")
    unknown = sorted(set(sec) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key. Known keys here: "
                          f"{', '.join(f'{name}.{k}' for k in sorted(known))}.")
    return sec


def _port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{key}: {value!r} is not a TCP port. Fix: use a number in 1..65535.")
    return value


@dataclass(frozen=True)
class CoordinatorConfig:
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
        return f"{self.host}:{self.port}"


def load_coordinator_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> CoordinatorConfig:
    from fedsecure.config import set_dotted

    doc, base = _read(path)
    src = Path(path)
    sec = _section(doc, "server", {"run_dir", "host", "port", "tls_ca", "tls_cert", "tls_key", "sites"}, src)
    sites = sec.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise ConfigError("server.sites: must map each site name to its SuperNode public key file "
                          "(auth.pub from `fedsecure certs init --site NAME`).")
    rest = {k: v for k, v in doc.items() if k != "server"}
    for key, value in (overrides or {}).items():
        set_dotted(rest, key, value)
    rest.setdefault("federation", {})
    if not isinstance(rest["federation"], dict):
        raise ConfigError("federation: must be a mapping.")
    rest["federation"]["sites"] = len(sites)
    federation = from_mapping(SimulationConfig, rest).validate()
    return CoordinatorConfig(
        run_dir=_path(base, sec.get("run_dir", "runs/consortium"), "server.run_dir", must_exist=False),
        host=str(sec.get("host", "127.0.0.1")), port=_port(sec.get("port", 9093), "server.port"),
        tls_ca=_path(base, sec.get("tls_ca"), "server.tls_ca"), tls_cert=_path(base, sec.get("tls_cert"),
                                                                                 "server.tls_cert"),
        tls_key=_path(base, sec.get("tls_key"), "server.tls_key"),
        sites={str(n): _path(base, p, f"server.sites.{n}") for n, p in sites.items()},
        federation=federation, source=src)


@dataclass(frozen=True)
class SiteConfig:
    name: str
    superlink: str
    tls_ca: Path
    auth_key: Path
    data_dir: Path
    state_dir: Path
    runtime_port: int
    node_config: dict[str, str | float]
    source: Path
    warm_worker: bool = True


def load_site_config(path: str | Path) -> SiteConfig:
    from fedsecure.attestation.providers import PROVIDERS
    from fedsecure.deploy.certs import SITE_NAME

    doc, base = _read(path)
    src = Path(path)
    unknown = sorted(set(doc) - {"site"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section. Fix: a site config holds one 'site' section.")
    sec = _section(doc, "site", {"name", "superlink", "tls_ca", "auth_key", "data_dir", "state_dir", "runtime_port",
                                 "epsilon", "delta", "dataset_id", "attestation_provider", "keyring",
                                 "warm_worker"}, src)
    name = sec.get("name")
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise ConfigError(f"site.name: {name!r} must be 1-63 letters, digits, '.', '_' or '-'.")
    superlink = str(sec.get("superlink", ""))
    if not _HOSTPORT.match(superlink):
        raise ConfigError(f"site.superlink: {superlink!r} is not host:port. Fix: e.g. coordinator.example.org:9093.")
    data_dir = _path(base, sec.get("data_dir"), "site.data_dir")
    for split in ("train.jsonl", "eval.jsonl"):
        if not (data_dir / split).is_file():
            raise ConfigError(f"site.data_dir: {data_dir / split} is missing. Fix: put the site's records there "
                              "(one JSON object with a 'text' field per line).")
    state_dir = _path(base, sec.get("state_dir"), "site.state_dir", must_exist=False)
    node: dict[str, str | float] = {"site-name": name, "data-dir": str(data_dir), "state-dir": str(state_dir)}
    for key, node_key in (("epsilon", "privacy.epsilon"), ("delta", "privacy.delta")):
        v = sec.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"site.{key}: {v!r} is not a positive number.")
            node[node_key] = float(v)
    if sec.get("dataset_id") is not None:
        node["dataset-id"] = str(sec["dataset_id"])
    provider = sec.get("attestation_provider", "software")
    if provider not in PROVIDERS:
        raise ConfigError(f"site.attestation_provider: {provider!r} must be one of {', '.join(PROVIDERS)}.")
    node["attestation-provider"] = provider
    if sec.get("keyring") is not None:
        node["keyring"] = str(_path(base, sec["keyring"], "site.keyring", must_exist=False))
    return SiteConfig(name=name, superlink=superlink, tls_ca=_path(base, sec.get("tls_ca"), "site.tls_ca"),
                      auth_key=_path(base, sec.get("auth_key"), "site.auth_key"), data_dir=data_dir,
                      state_dir=state_dir, runtime_port=_port(sec.get("runtime_port", 9094), "site.runtime_port"),
                      node_config=node, source=src, warm_worker=_bool(sec.get("warm_worker", True),
                                                                        "site.warm_worker"))


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} must be true or false.")
    return value


def node_config_arg(node: Mapping[str, str | float]) -> str:
    """flower-supernode's --node-config: space-separated key=value, strings double-quoted (TOML style)."""
    parts = []
    for k, v in node.items():
        if isinstance(v, str):
            if '"' in v or "\\" in v:
                raise ConfigError(f"node config value for {k} may not contain quotes or backslashes: {v!r}")
            parts.append(f'{k}="{v}"')
        else:
            parts.append(f"{k}={v!r}")
    return " ".join(parts)
