"""Typed, validated configuration.

YAML files in ``configs/`` are parsed once, where an app starts, into frozen dataclasses.
Validation is strict: an unknown key, a wrong type or an out-of-range value raises
:class:`~fedsecure.errors.ConfigError` with the dotted key, the value found and the fix.

Flower's run config is flat (``dict[str, bool | int | float | str]``), so a config travels to
the ServerApp and ClientApp as dotted keys (``"model.lora.r" = 8``) through
:meth:`SimulationConfig.to_run_config` / :meth:`SimulationConfig.from_run_config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from fedsecure.errors import ConfigError

T = TypeVar("T")

PRESETS = ("deepseek-v3-tiny", "deepseek-v2-tiny", "r1-distill-qwen-tiny")
#: Privacy accountants a site may use: PRV (tightest sound bound) and RDP. The Gaussian/CLT accountant is refused.
ACCOUNTANTS = ("prv", "rdp")
#: Attestation evidence providers a site may use (``fedsecure.attestation.providers``).
PROVIDERS = ("software", "tdx", "sev-snp", "nvidia-gpu", "command")


def check_accountant(name: str, key: str = "privacy.accountant") -> str:
    """``name`` if it is a sound accountant we support; else a ConfigError naming ``key`` and the fix."""
    if name in ("gdp", "gaussian", "clt"):
        raise ConfigError(f"{key}: {name!r} (the Gaussian/CLT accountant) can under-report epsilon "
                          "and is refused. Fix: use 'prv' (default, tightest sound bound) or 'rdp'.")
    if name not in ACCOUNTANTS:
        raise ConfigError(f"{key}: expected one of {', '.join(ACCOUNTANTS)}; found {name!r}.")
    return name


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape. ``targets`` empty means the architecture's default set."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def validate(self, prefix: str) -> None:
        _require(self.r >= 1, f"{prefix}.r", self.r, "must be a positive integer, e.g. 8")
        _require(self.alpha >= 1, f"{prefix}.alpha", self.alpha, "must be a positive integer, e.g. 16")
        _require(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class ModelSettings:
    """Which base model: a built-in tiny ``preset`` or a local Hugging Face ``path``."""

    preset: str | None = "deepseek-v3-tiny"
    path: str | None = None
    seed: int = 0  # initialisation seed of a preset's random base weights
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self, prefix: str) -> None:
        if self.path is None and self.preset is None:
            raise ConfigError(f"{prefix}: set either 'preset' (one of {', '.join(PRESETS)}) or 'path' "
                              "(a local Hugging Face model directory).")
        if self.path is None:
            _require(self.preset in PRESETS, f"{prefix}.preset", self.preset,
                     f"must be one of {', '.join(PRESETS)}, or set {prefix}.path to a local model directory")
        self.lora.validate(f"{prefix}.lora")


@dataclass(frozen=True)
class DataSettings:
    """Site datasets. ``dir`` holds ``site-<i>/train.jsonl`` and ``site-<i>/eval.jsonl``;
    when it is null, ``fedsecure simulate`` synthesises data into the run directory."""

    dir: str | None = None
    records_per_site: int = 480
    eval_fraction: float = 0.2
    max_length: int = 96

    def validate(self, prefix: str) -> None:
        _require(self.records_per_site >= 4, f"{prefix}.records_per_site", self.records_per_site,
                 "must be at least 4")
        _require(0.0 < self.eval_fraction < 1.0, f"{prefix}.eval_fraction", self.eval_fraction,
                 "must be in (0, 1), e.g. 0.2")
        _require(8 <= self.max_length <= 32768, f"{prefix}.max_length", self.max_length,
                 "must be in [8, 32768] tokens")


@dataclass(frozen=True)
class TrainSettings:
    """Local training at each site, per round."""

    local_steps: int = 16
    batch_size: int = 32
    learning_rate: float = 1e-2
    weight_decay: float = 0.0

    def validate(self, prefix: str) -> None:
        _require(self.local_steps >= 1, f"{prefix}.local_steps", self.local_steps, "must be >= 1")
        _require(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        _require(_finite(self.learning_rate) and 0.0 < self.learning_rate < 10.0, f"{prefix}.learning_rate",
                 self.learning_rate, "must be in (0, 10), e.g. 3e-3")
        _require(_finite(self.weight_decay) and self.weight_decay >= 0.0, f"{prefix}.weight_decay", self.weight_decay,
                 "must be a finite number >= 0")


@dataclass(frozen=True)
class FederationSettings:
    """How many sites, and which engine runs them in simulation."""

    sites: int = 3
    rounds: int = 3
    engine: Literal["inprocess", "ray"] = "inprocess"
    fraction_train: float = 1.0
    min_sites: int = 1
    round_timeout_s: float = 3600.0
    join_timeout_s: float = 600.0  # at start, wait this long for all `sites` to connect (then go on with min_sites)
    max_site_records: int = 10_000_000  # a reply claiming more training records (its FedAvg weight) is rejected
    max_update_norm: float | None = None  # optional L2 cap on one site's update (the per-value bound always applies)

    def validate(self, prefix: str) -> None:
        _require(_finite(self.join_timeout_s) and self.join_timeout_s >= 0, f"{prefix}.join_timeout_s",
                 self.join_timeout_s, "must be a finite number >= 0 seconds")
        _require(1 <= self.sites <= 1000, f"{prefix}.sites", self.sites, "must be in [1, 1000]")
        _require(1 <= self.rounds <= 100000, f"{prefix}.rounds", self.rounds, "must be >= 1")
        _require(0.0 < self.fraction_train <= 1.0, f"{prefix}.fraction_train", self.fraction_train,
                 "must be in (0, 1]")
        _require(1 <= self.min_sites <= self.sites, f"{prefix}.min_sites", self.min_sites,
                 f"must be in [1, {prefix}.sites]")
        _require(_finite(self.round_timeout_s) and self.round_timeout_s > 0, f"{prefix}.round_timeout_s",
                 self.round_timeout_s, "must be a finite number > 0")
        _require(1 <= self.max_site_records <= 1 << 40, f"{prefix}.max_site_records", self.max_site_records,
                 "must be in [1, 2^40]")
        if self.max_update_norm is not None:
            _require(_finite(self.max_update_norm) and self.max_update_norm > 0, f"{prefix}.max_update_norm",
                     self.max_update_norm, "must be a finite number > 0, or null for no cap")


@dataclass(frozen=True)
class ClientDPSettings:
    """Optional client-level DP at the coordinator: clip each site's update, noise the sum."""

    enabled: bool = False
    clip: float = 1.0  # S: L2 bound on one site's adapter delta
    noise_multiplier: float = 1.0  # sigma_c: noise std is sigma_c * S on the sum
    delta: float = 1e-5
    noise_seed: int | None = None  # ONLY for reproducible tests of the coordinator's noise

    def validate(self, prefix: str) -> None:
        _require(_finite(self.clip) and self.clip > 0, f"{prefix}.clip", self.clip, "must be a finite number > 0")
        _require(_finite(self.noise_multiplier) and self.noise_multiplier > 0, f"{prefix}.noise_multiplier",
                 self.noise_multiplier, "must be a finite number > 0")
        _require(_finite(self.delta) and 0 < self.delta < 1, f"{prefix}.delta", self.delta, "must be in (0, 1)")


@dataclass(frozen=True)
class PrivacySettings:
    """What the run asks of every site's record-level DP-SGD (Opacus).

    These are requests: each site's own policy (:class:`SitePolicy`) is authoritative, and a request
    looser than it (DP off, a larger epsilon or delta, a smaller sigma, a larger clip, another
    accountant) is refused by the site with the key, both values and the fix.
    """

    enabled: bool = True  # false asks for non-private training: only sites whose own policy allows it comply
    epsilon: float | None = None  # None = each site's own budget (site.privacy.max_epsilon); else at most that
    delta: float | None = None  # None = each site's own delta; else at most that
    max_grad_norm: float = 1.0  # C: per-record L2 clipping bound (at most the site's max_clip)
    noise_multiplier: float | None = None  # sigma; None = calibrated by each site from its remaining budget
    accountant: str = "prv"  # prv (default, tightest sound) | rdp; the Gaussian/CLT accountant is refused
    grad_sample_mode: str = "ew"  # Opacus per-sample gradients: ew (fastest exact here) | hooks
    client_dp: ClientDPSettings = field(default_factory=ClientDPSettings)

    def validate(self, prefix: str) -> None:
        if self.epsilon is not None:
            _require(_finite(self.epsilon) and 0 < self.epsilon <= 100, f"{prefix}.epsilon", self.epsilon,
                     "must be in (0, 100], e.g. 3, or null for each site's own budget")
        if self.delta is not None:
            _require(_finite(self.delta) and 0 < self.delta < 1e-2, f"{prefix}.delta", self.delta,
                     "must be in (0, 0.01) and well below 1/records; null uses each site's own delta")
        _require(_finite(self.max_grad_norm) and self.max_grad_norm > 0, f"{prefix}.max_grad_norm",
                 self.max_grad_norm, "must be a finite number > 0, e.g. 1.0")
        if self.noise_multiplier is not None:
            _require(_finite(self.noise_multiplier) and self.noise_multiplier > 0, f"{prefix}.noise_multiplier",
                     self.noise_multiplier, "must be a finite number > 0, or null to calibrate it from the budget")
        check_accountant(self.accountant, f"{prefix}.accountant")
        _require(self.grad_sample_mode in ("ew", "hooks"), f"{prefix}.grad_sample_mode", self.grad_sample_mode,
                 "must be ew or hooks (both exact for LoRA on the DeepSeek presets)")
        self.client_dp.validate(f"{prefix}.client_dp")


@dataclass(frozen=True)
class StorageSettings:
    """Encryption at rest of everything that holds weights or training state (adapters, ledgers)."""

    seal: bool = True
    key_provider: Literal["file", "env", "passphrase", "command"] = "file"
    keyring: str | None = None  # file provider: keyring path; None = <run-dir>/keys/<party>.keyring.json
    key_command: str | None = None  # command provider: prints the keyring JSON
    chunk_size: int = 1 << 20

    def validate(self, prefix: str) -> None:
        _require(4096 <= self.chunk_size <= 64 << 20, f"{prefix}.chunk_size", self.chunk_size,
                 "must be in [4096, 67108864] bytes")
        if self.key_provider == "command":
            _require(bool(self.key_command), f"{prefix}.key_command", self.key_command,
                     "must name the program that prints the keyring when key_provider is command")


# ---------------------------------------------------------------------------- the site's own settings
@dataclass(frozen=True)
class SitePolicy:
    """A site's own privacy policy. It is authoritative: the run config (the coordinator's request) may
    only ask for less privacy loss, and anything looser is refused at the site."""

    dp_required: bool = True  # false: this site may train without DP when the run asks (reported non-private)
    max_epsilon: float = 3.0  # budget of each dataset over all runs that ever use it
    max_delta: float | None = None  # None = min(1e-5, 1/(10 N)); always below 1/N (N = training records)
    min_sigma: float = 0.5  # smallest noise multiplier the site accepts (also bounds the accountant's cost)
    max_clip: float = 10.0  # largest per-record clipping bound C
    accountants: tuple[str, ...] = ACCOUNTANTS  # accountants the site accepts
    max_steps_per_round: int = 1000  # DP-SGD steps one message may ask for
    max_batch_size: int = 1024  # expected records sampled per step

    def validate(self, prefix: str) -> None:
        _require(_finite(self.max_epsilon) and 0 < self.max_epsilon <= 100, f"{prefix}.max_epsilon",
                 self.max_epsilon, "must be a finite number in (0, 100], e.g. 3")
        if self.max_delta is not None:
            _require(_finite(self.max_delta) and 0 < self.max_delta < 1e-2, f"{prefix}.max_delta", self.max_delta,
                     "must be in (0, 0.01) and below 1/N for N training records (e.g. 1e-5); null picks "
                     "min(1e-5, 1/(10 N))")
        _require(_finite(self.min_sigma) and 0.3 <= self.min_sigma <= 50, f"{prefix}.min_sigma", self.min_sigma,
                 "must be in [0.3, 50]: below 0.3 a few steps spend a budget and accounting gets costly")
        _require(_finite(self.max_clip) and self.max_clip > 0, f"{prefix}.max_clip", self.max_clip,
                 "must be a finite number > 0, e.g. 10")
        _require(len(self.accountants) > 0, f"{prefix}.accountants", list(self.accountants),
                 f"must list at least one of {', '.join(ACCOUNTANTS)}")
        for name in self.accountants:
            check_accountant(name, f"{prefix}.accountants")
        _require(1 <= self.max_steps_per_round <= 100_000, f"{prefix}.max_steps_per_round", self.max_steps_per_round,
                 "must be in [1, 100000]")
        _require(1 <= self.max_batch_size <= 1_000_000, f"{prefix}.max_batch_size", self.max_batch_size,
                 "must be in [1, 1000000]")


@dataclass(frozen=True)
class SiteLimits:
    """What one coordinator message may make the site allocate (bounded cost)."""

    max_seq_len: int = 4096  # data.max_length the run may ask for (tokens per record)
    max_lora_rank: int = 256  # model.lora.r the run may ask for

    def validate(self, prefix: str) -> None:
        _require(8 <= self.max_seq_len <= 1 << 20, f"{prefix}.max_seq_len", self.max_seq_len, "must be in [8, 1048576]")
        _require(1 <= self.max_lora_rank <= 65536, f"{prefix}.max_lora_rank", self.max_lora_rank,
                 "must be in [1, 65536]")


@dataclass(frozen=True)
class SiteAttestation:
    """Where the site's TEE evidence comes from: chosen by the site, never by the coordinator."""

    provider: str = "software"  # software (dev/simulation, warns) | tdx | sev-snp | nvidia-gpu | command
    command: tuple[str, ...] = ()  # command provider: argv, "{report_data}" becomes the hex report data
    configfs_root: str = "/sys/kernel/config/tsm/report"

    def validate(self, prefix: str) -> None:
        _require(self.provider in PROVIDERS, f"{prefix}.provider", self.provider,
                 f"must be one of {', '.join(PROVIDERS)}")
        if self.provider == "command":
            _require(bool(self.command), f"{prefix}.command", list(self.command),
                     "must name the attestation tool and its arguments when provider is command")


@dataclass(frozen=True)
class SiteSettings:
    """Everything a site decides for itself. In deployment it comes from the site's ``site.yaml`` through the
    SuperNode's node config; in simulation the engine builds one per simulated site. Nothing here is ever
    read from the run config (the coordinator's), except at a node of Flower's own simulation engine."""

    name: str | None = None
    data_dir: str | None = None
    state_dir: str | None = None  # ledgers, node key, residuals (persist across runs)
    dataset_id: str | None = None  # stable ledger key; None = the dataset's content fingerprint
    model_dir: str | None = None  # this site's copy of the model when the run names a local model directory
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    simulated: bool = False  # set only by fedsecure's simulation engines
    noise_seed: int | None = None  # simulated sites only: reproducible tests; a deployed site refuses it
    worker_socket: str | None = None  # the site's warm worker (set by fedsecure client)
    privacy: SitePolicy = field(default_factory=SitePolicy)
    limits: SiteLimits = field(default_factory=SiteLimits)
    storage: StorageSettings = field(default_factory=StorageSettings)
    attestation: SiteAttestation = field(default_factory=SiteAttestation)

    def validate(self, prefix: str = "site") -> SiteSettings:
        _require(self.threads >= 0, f"{prefix}.threads", self.threads, "must be >= 0 (0 = torch default)")
        if self.noise_seed is not None and not self.simulated:
            raise ConfigError(f"{prefix}.noise_seed: a deployed site draws its noise from the operating system's "
                              "secure generator; a noise seed would let anyone who knows it remove the noise. "
                              "Fix: remove it (it is a simulation-only testing aid).")
        self.privacy.validate(f"{prefix}.privacy")
        self.limits.validate(f"{prefix}.limits")
        self.storage.validate(f"{prefix}.storage")
        self.attestation.validate(f"{prefix}.attestation")
        return self

    def to_flat(self, prefix: str = "site.") -> dict[str, bool | int | float | str]:
        """As flat ``site.*`` keys (a SuperNode's node config, or Flower's run config)."""
        return flatten(to_dict(self), prefix)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], prefix: str = "site.") -> SiteSettings:
        """Inverse of :meth:`to_flat`; keys without ``prefix`` are ignored, unknown ``site.*`` keys refused."""
        own = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        known = set(flatten(to_dict(cls()), ""))
        unknown = sorted(set(own) - known)
        if unknown:
            raise ConfigError(f"{prefix}{unknown[0]}: unknown site setting. Known: "
                              f"{', '.join(prefix + k for k in sorted(known))}.")
        return from_mapping(cls, unflatten(own, cls)).validate(prefix.rstrip("."))


@dataclass(frozen=True)
class SimulatedSites:
    """The simulated sites' own settings (``site:`` in configs/simulation.yaml): what each hospital's
    ``site.yaml`` would hold in deployment. The run's ``privacy`` section can only tighten them."""

    state_dir: str | None = None  # each site's state in <state_dir>/<site>; None = <run-dir>/sites/<site> (fresh)
    threads: int = 0
    noise_seed: int | None = None  # ONLY for reproducible tests: a known seed lets anyone remove the noise
    privacy: SitePolicy = field(default_factory=SitePolicy)
    limits: SiteLimits = field(default_factory=SiteLimits)
    storage: StorageSettings = field(default_factory=StorageSettings)
    attestation: SiteAttestation = field(default_factory=SiteAttestation)

    def validate(self, prefix: str) -> None:
        _require(self.threads >= 0, f"{prefix}.threads", self.threads, "must be >= 0 (0 = torch default)")
        self.privacy.validate(f"{prefix}.privacy")
        self.limits.validate(f"{prefix}.limits")
        self.storage.validate(f"{prefix}.storage")
        self.attestation.validate(f"{prefix}.attestation")

    def for_site(self, name: str, data_dir: str | Path, run_dir: str | Path) -> SiteSettings:
        """The settings of simulated site ``name``."""
        root = Path(self.state_dir) if self.state_dir else Path(run_dir) / "sites"
        return SiteSettings(name=name, data_dir=str(data_dir), state_dir=str(root / name), threads=self.threads,
                            simulated=True, noise_seed=self.noise_seed, privacy=self.privacy, limits=self.limits,
                            storage=self.storage, attestation=self.attestation).validate()


@dataclass(frozen=True)
class TransportSettings:
    """How adapters travel: deltas, error feedback, top-k, blockwise int8/int4 or dithered quantization, zstd."""

    enabled: bool = True
    uplink_bits: int = 4  # site -> coordinator when uplink_dither is 0: 32 (float32), 8 or 4 (blockwise)
    uplink_topk: float = 1.0  # share of each tensor's entries kept (top-k by magnitude, with error feedback)
    uplink_dither: float = 1.0  # > 0: dithered quantization, step = this x the tensor's RMS (replaces uplink_bits)
    downlink_bits: int = 8  # coordinator -> site, delta against the adapter the site already holds
    downlink_topk: float = 1.0
    downlink_dither: float = 0.0
    error_feedback: bool = True  # carry what compression dropped into the next round (sealed at rest)
    stochastic_rounding: bool = True  # unbiased quantization
    zstd_level: int = 3  # 0 = off
    # per-tensor uplink overrides "glob=bits/topk" (bits 32 | 8 | 4 | d<step>), first match wins; LoRA's A
    # matrices are far less sensitive to quantization error than its B matrices (BENCHMARKS.md)
    policy: tuple[str, ...] = ("*lora_A*=d3/1.0",)
    max_update_bytes: int = 64 << 20  # larger updates are rejected before anything is decompressed

    def validate(self, prefix: str) -> None:
        for key in ("uplink_bits", "downlink_bits"):
            _require(getattr(self, key) in (32, 8, 4), f"{prefix}.{key}", getattr(self, key), "must be 32, 8 or 4")
        for key in ("uplink_topk", "downlink_topk"):
            _require(0 < getattr(self, key) <= 1, f"{prefix}.{key}", getattr(self, key), "must be in (0, 1]")
        for key in ("uplink_dither", "downlink_dither"):
            _require(0 <= getattr(self, key) <= 1000, f"{prefix}.{key}", getattr(self, key),
                     "must be in [0, 1000] (quantization step in units of the tensor's RMS; 0 = off)")
        _require(0 <= self.zstd_level <= 22, f"{prefix}.zstd_level", self.zstd_level, "must be in [0, 22]")
        _require(self.max_update_bytes >= 1024, f"{prefix}.max_update_bytes", self.max_update_bytes, "must be >= 1024")
        from fedsecure.transport.codec import CodecPolicy

        try:
            CodecPolicy.parse_overrides(self.policy)
        except ValueError as e:
            raise ConfigError(f"{prefix}.policy: {e}") from None


@dataclass(frozen=True)
class AttestationSettings:
    """TEE attestation of every update (coordinator side): the sites' providers are their own (``site.attestation``)."""

    enabled: bool = True
    policy: str | None = None  # coordinator: policy file; None in `fedsecure simulate` = generated for this build

    def validate(self, prefix: str) -> None:
        if self.policy is not None:
            _require(bool(self.policy.strip()), f"{prefix}.policy", self.policy, "must be a file path or null")


@dataclass(frozen=True)
class SimulationConfig:
    """Everything one federation run needs; ``configs/simulation.yaml`` is the template."""

    seed: int = 42
    runs_dir: str = "runs"
    federation: FederationSettings = field(default_factory=FederationSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    attestation: AttestationSettings = field(default_factory=AttestationSettings)
    site: SimulatedSites = field(default_factory=SimulatedSites)  # the simulated sites' own settings

    def validate(self) -> SimulationConfig:
        self.federation.validate("federation")
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.privacy.validate("privacy")
        self.storage.validate("storage")
        self.transport.validate("transport")
        self.attestation.validate("attestation")
        self.site.validate("site")
        return self

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> SimulationConfig:
        return from_mapping(cls, data or {}).validate()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten into Flower's run config: dotted keys, ``None`` as ``""``, tuples comma-joined.

        The simulated sites' own settings (``site``) never travel in the run config, which is the
        coordinator's: each site gets its own through its node config."""
        doc = self.to_dict()
        doc.pop("site")
        return flatten(doc)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SimulationConfig:
        """Inverse of :meth:`to_run_config`; keys not owned by this config (and any ``site.*``) are ignored."""
        doc = unflatten({k: v for k, v in run_config.items() if not str(k).startswith("site.")}, cls)
        return cls.from_mapping(doc)


# ---------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                cls: type[T] = SimulationConfig) -> T:  # type: ignore[assignment]
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist. Fix: pass an existing YAML file "
                              "(see configs/simulation.yaml).")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not a text file (not UTF-8). Fix: pass a YAML config such as "
                              "configs/simulation.yaml.") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}). Fix: pass a readable YAML "
                              "file.") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}: "
                              f"{getattr(e, 'problem', e)}. Fix the syntax and retry.") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys at the top level, "
                              f"found {type(loaded).__name__}.")
        data = loaded
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return cls.from_mapping(data)  # type: ignore[attr-defined]


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML, so ``8`` is an int and ``null`` is None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. model.lora.r=4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; a number is meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------- validation
def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}; found {value!r}.")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of strings"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}; found {value!r}.")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings; found {value!r}.")
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping of keys); found {value!r}.")
        return from_mapping(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false; found {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer; found {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number; found {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string; found {value!r}.")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key.{hint} Known keys here: "
                              f"{', '.join(prefix + k for k in known)}.")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in known if name in data}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested mapping to dotted keys: ``None`` becomes ``""``, lists are comma-joined."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif value is None:
            out[name] = ""
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(value)
        else:
            out[name] = value
    return out


def unflatten(run_config: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """Rebuild the nested mapping for ``cls`` from dotted keys; ``""`` for an optional is None."""
    out: dict[str, Any] = {}

    def walk(tp: type, prefix: str, node: dict[str, Any]) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            key, hint = f"{prefix}{f.name}", hints[f.name]
            if dataclasses.is_dataclass(hint):
                child: dict[str, Any] = {}
                walk(hint, f"{key}.", child)
                if child:
                    node[f.name] = child
            elif key in run_config:
                value = run_config[key]
                optional = type(None) in get_args(hint)
                if value == "" and optional:
                    value = None
                node[f.name] = value

    walk(cls, "", out)
    return out
