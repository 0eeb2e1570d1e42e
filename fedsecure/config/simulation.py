"""``SimulationConfig``: one federation run, all sections; ``configs/simulation.yaml`` is the template."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsecure.config.loading import flatten, from_mapping, read_yaml, to_dict, unflatten
from fedsecure.config.run import (
    AttestationSettings,
    DataSettings,
    FederationSettings,
    MetricsSettings,
    ModelSettings,
    PrivacySettings,
    StorageSettings,
    TrainSettings,
    TransportSettings,
)
from fedsecure.config.site import SimulatedSites
from fedsecure.errors import ConfigError


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
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    site: SimulatedSites = field(default_factory=SimulatedSites)  # the simulated sites' own settings

    def validate(self) -> SimulationConfig:
        """Check every section; returns ``self`` (ConfigError names the first problem)."""
        self.federation.validate("federation")
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.privacy.validate("privacy")
        self.storage.validate("storage")
        self.transport.validate("transport")
        self.attestation.validate("attestation")
        self.metrics.validate("metrics")
        self.site.validate("site")
        if self.train.gradient_checkpointing and self.privacy.enabled and self.privacy.grad_sample_mode != "hooks":
            raise ConfigError("train.gradient_checkpointing is on with privacy.grad_sample_mode = "
                              f"{self.privacy.grad_sample_mode}: Opacus' ew mode computes no per-sample gradient when "
                              "layers are recomputed in the backward pass. Fix: set privacy.grad_sample_mode: hooks "
                              "(exact with checkpointing), or turn train.gradient_checkpointing off")
        return self

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> SimulationConfig:
        """Build and validate from a nested mapping (a parsed YAML file)."""
        return from_mapping(cls, data or {}).validate()

    def to_dict(self) -> dict[str, Any]:
        """As nested dicts (what ``config.yaml`` holds)."""
        return to_dict(self)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten into Flower's run config: dotted keys, ``None`` as ``""``, tuples comma-joined.

        The simulated sites' own settings (``site``) never travel in the run config, which is the
        coordinator's: each site gets its own through its node config.
        """
        doc = self.to_dict()
        doc.pop("site")
        return flatten(doc)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SimulationConfig:
        """Inverse of :meth:`to_run_config`; keys not owned by this config (and any ``site.*``) are ignored."""
        doc = unflatten({k: v for k, v in run_config.items() if not str(k).startswith("site.")}, cls)
        return cls.from_mapping(doc)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> SimulationConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply dotted overrides, validate."""
    return SimulationConfig.from_mapping(read_yaml(path, overrides))
