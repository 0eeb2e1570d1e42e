"""A site's own settings: its privacy policy and limits, storage, attestation provider, directories.

In deployment they come from the site's ``site.yaml`` through the SuperNode's node config; in
simulation from the ``site:`` section, one copy per simulated site. A run config never holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsecure.config.checks import ACCOUNTANTS, PROVIDERS, check_accountant, finite, require
from fedsecure.config.loading import flatten, from_mapping, to_dict, unflatten
from fedsecure.config.parallel import NcclSettings, SiteTraining
from fedsecure.config.run import StorageSettings
from fedsecure.errors import ConfigError


@dataclass(frozen=True)
class SitePolicy:
    """A site's own privacy policy. It is authoritative: the run config (the coordinator's request) may
    only ask for less privacy loss, and anything looser is refused at the site.
    """

    dp_required: bool = True  # false: this site may train without DP when the run asks (reported non-private)
    epsilon_budget: float = 3.0  # budget of each dataset over all runs that ever use it
    delta: float | None = None  # None = min(1e-5, 1/(10 N)); always below 1/N (N = training records)
    min_sigma: float = 0.5  # smallest noise multiplier the site accepts (also bounds the accountant's cost)
    max_clip: float = 10.0  # largest per-record clipping bound C
    accountants: tuple[str, ...] = ACCOUNTANTS  # accountants the site accepts
    max_steps_per_round: int = 1000  # DP-SGD steps one message may ask for
    max_batch_size: int = 1024  # expected records sampled per step
    require_secure_aggregation: bool = False  # true: this site's update leaves only masked (secure aggregation)
    secagg_min_sites: int = 2  # the fewest sites a secure-aggregation round may sum (with 2, each learns the other)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(finite(self.epsilon_budget) and 0 < self.epsilon_budget <= 100, f"{prefix}.epsilon_budget",
                 self.epsilon_budget, "must be a finite number in (0, 100], e.g. 3")
        if self.delta is not None:
            require(finite(self.delta) and 0 < self.delta < 1e-2, f"{prefix}.delta", self.delta,
                     "must be in (0, 0.01) and below 1/N for N training records (e.g. 1e-5); null picks "
                     "min(1e-5, 1/(10 N))")
        require(finite(self.min_sigma) and 0.3 <= self.min_sigma <= 50, f"{prefix}.min_sigma", self.min_sigma,
                 "must be in [0.3, 50]: below 0.3 a few steps spend a budget and accounting gets costly")
        require(finite(self.max_clip) and self.max_clip > 0, f"{prefix}.max_clip", self.max_clip,
                 "must be a finite number > 0, e.g. 10")
        require(len(self.accountants) > 0, f"{prefix}.accountants", list(self.accountants),
                 f"must list at least one of {', '.join(ACCOUNTANTS)}")
        for name in self.accountants:
            check_accountant(name, f"{prefix}.accountants")
        require(1 <= self.max_steps_per_round <= 100_000, f"{prefix}.max_steps_per_round", self.max_steps_per_round,
                 "must be in [1, 100000]")
        require(1 <= self.max_batch_size <= 1_000_000, f"{prefix}.max_batch_size", self.max_batch_size,
                 "must be in [1, 1000000]")
        require(2 <= self.secagg_min_sites <= 1000, f"{prefix}.secagg_min_sites", self.secagg_min_sites,
                 "must be in [2, 1000]")


@dataclass(frozen=True)
class SiteLimits:
    """What one coordinator message may make the site allocate (bounded cost)."""

    max_seq_len: int = 4096  # data.max_length the run may ask for (tokens per record)
    max_lora_rank: int = 256  # model.lora.r the run may ask for

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(8 <= self.max_seq_len <= 1 << 20, f"{prefix}.max_seq_len", self.max_seq_len, "must be in [8, 1048576]")
        require(1 <= self.max_lora_rank <= 65536, f"{prefix}.max_lora_rank", self.max_lora_rank,
                 "must be in [1, 65536]")


@dataclass(frozen=True)
class SiteAttestation:
    """Where the site's TEE evidence comes from: chosen by the site, never by the coordinator."""

    provider: str = "software"  # software (dev/simulation, warns) | tdx | sev-snp | nvidia-gpu | command
    command: tuple[str, ...] = ()  # command provider: argv, "{report_data}" becomes the hex report data
    configfs_root: str = "/sys/kernel/config/tsm/report"

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(self.provider in PROVIDERS, f"{prefix}.provider", self.provider,
                 f"must be one of {', '.join(PROVIDERS)}")
        if self.provider == "command":
            require(bool(self.command), f"{prefix}.command", list(self.command),
                     "must name the attestation tool and its arguments when provider is command")


@dataclass(frozen=True)
class SiteSettings:
    """Everything a site decides for itself. In deployment it comes from the site's ``site.yaml`` through the
    SuperNode's node config; in simulation the engine builds one per simulated site. Nothing here is ever
    read from the run config (the coordinator's), except at a node of Flower's own simulation engine.
    """

    name: str | None = None
    data_dir: str | None = None
    state_dir: str | None = None  # ledgers, node key, residuals (persist across runs)
    dataset_id: str | None = None  # stable ledger key; None = the dataset's content fingerprint
    model_dir: str | None = None  # this site's copy of the model when the run names a local model directory
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    simulated: bool = False  # set only by fedsecure's simulation engines
    noise_seed: int | None = None  # simulated sites only: reproducible tests; a deployed site refuses it
    worker_socket: str | None = None  # the site's warm worker (set by fedsecure client)
    secagg_roster: str | None = None  # secure aggregation: YAML of site name -> node public key (the site's own)
    privacy: SitePolicy = field(default_factory=SitePolicy)
    limits: SiteLimits = field(default_factory=SiteLimits)
    storage: StorageSettings = field(default_factory=StorageSettings)
    attestation: SiteAttestation = field(default_factory=SiteAttestation)
    training: SiteTraining = field(default_factory=SiteTraining)
    nccl: NcclSettings = field(default_factory=NcclSettings)

    def validate(self, prefix: str = "site") -> SiteSettings:
        """Check every field (a noise seed only at a simulated site); returns ``self``."""
        require(self.threads >= 0, f"{prefix}.threads", self.threads, "must be >= 0 (0 = torch default)")
        if self.noise_seed is not None and not self.simulated:
            raise ConfigError(f"{prefix}.noise_seed: a deployed site draws its noise from the operating system's "
                              "secure generator; a noise seed would let anyone who knows it remove the noise. "
                              "Fix: remove it (it is a simulation-only testing aid).")
        self.privacy.validate(f"{prefix}.privacy")
        self.limits.validate(f"{prefix}.limits")
        self.storage.validate(f"{prefix}.storage")
        self.attestation.validate(f"{prefix}.attestation")
        self.training.validate(f"{prefix}.training")
        self.training.check_private(f"{prefix}.training", self.privacy.dp_required)
        self.nccl.validate(f"{prefix}.nccl")
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
    ``site.yaml`` would hold in deployment. The run's ``privacy`` section can only tighten them.
    """

    state_dir: str | None = None  # each site's state in <state_dir>/<site>; None = <run-dir>/sites/<site> (fresh)
    threads: int = 0
    noise_seed: int | None = None  # ONLY for reproducible tests: a known seed lets anyone remove the noise
    privacy: SitePolicy = field(default_factory=SitePolicy)
    limits: SiteLimits = field(default_factory=SiteLimits)
    storage: StorageSettings = field(default_factory=StorageSettings)
    attestation: SiteAttestation = field(default_factory=SiteAttestation)
    training: SiteTraining = field(default_factory=SiteTraining)
    nccl: NcclSettings = field(default_factory=NcclSettings)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(self.threads >= 0, f"{prefix}.threads", self.threads, "must be >= 0 (0 = torch default)")
        self.privacy.validate(f"{prefix}.privacy")
        self.limits.validate(f"{prefix}.limits")
        self.storage.validate(f"{prefix}.storage")
        self.attestation.validate(f"{prefix}.attestation")
        self.training.validate(f"{prefix}.training")
        self.training.check_private(f"{prefix}.training", self.privacy.dp_required)
        self.nccl.validate(f"{prefix}.nccl")

    def for_site(self, name: str, data_dir: str | Path, run_dir: str | Path, roster: str | None = None
                 ) -> SiteSettings:
        """The settings of simulated site ``name`` (``roster``: the secure-aggregation roster simulate wrote)."""
        root = Path(self.state_dir) if self.state_dir else Path(run_dir) / "sites"
        return SiteSettings(name=name, data_dir=str(data_dir), state_dir=str(root / name), threads=self.threads,
                            simulated=True, secagg_roster=roster, noise_seed=self.noise_seed, privacy=self.privacy,
                            limits=self.limits,
                            storage=self.storage, attestation=self.attestation, training=self.training,
                            nccl=self.nccl).validate()

