"""Typed, validated configuration (the bottom layer: it imports nothing of fedsecure but :mod:`fedsecure.errors`).

YAML files in ``configs/`` are parsed once, where an app starts, into frozen dataclasses; each section
validates itself. Validation is strict: an unknown key, a wrong type or an out-of-range value raises
:class:`~fedsecure.errors.ConfigError` with the dotted key, the value found and the fix.

- :mod:`~fedsecure.config.run`: the run's sections (what a federation run asks for).
- :mod:`~fedsecure.config.site`: a site's own settings (its privacy policy, limits, storage, attestation).
- :mod:`~fedsecure.config.simulation`: :class:`SimulationConfig`, one run with all sections.
- :mod:`~fedsecure.config.loading`: YAML, dotted overrides, the flat dotted form Flower's configs need.
- :mod:`~fedsecure.config.checks`: the names every section checks against (presets, accountants, providers).
"""

from fedsecure.config.checks import (
    ACCOUNTANTS,
    DTYPES,
    PRESETS,
    PROVIDERS,
    QUANTIZATIONS,
    check_accountant,
    finite,
    require,
)
from fedsecure.config.loading import flatten, from_mapping, parse_override, read_yaml, set_dotted, to_dict, unflatten
from fedsecure.config.run import (
    AttestationSettings,
    ClientDPSettings,
    DataSettings,
    FederationSettings,
    LoraSettings,
    MetricsSettings,
    ModelSettings,
    PrivacySettings,
    StorageSettings,
    TensorRule,
    TrainSettings,
    TransportSettings,
    parse_tensor_rules,
)
from fedsecure.config.simulation import SimulationConfig, load_config
from fedsecure.config.site import SimulatedSites, SiteAttestation, SiteLimits, SitePolicy, SiteSettings

__all__ = [
    "ACCOUNTANTS", "DTYPES", "PRESETS", "PROVIDERS", "QUANTIZATIONS", "AttestationSettings", "ClientDPSettings",
    "DataSettings",
    "FederationSettings", "LoraSettings", "MetricsSettings", "ModelSettings", "PrivacySettings", "SimulatedSites",
    "SimulationConfig",
    "SiteAttestation", "SiteLimits", "SitePolicy", "SiteSettings", "StorageSettings", "TensorRule", "TrainSettings",
    "TransportSettings", "check_accountant", "finite", "flatten", "from_mapping", "load_config", "parse_override",
    "parse_tensor_rules", "read_yaml", "require", "set_dotted", "to_dict", "unflatten",
]
