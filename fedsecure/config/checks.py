"""The facts every config section checks against, and the one way a check fails (key, value, rule)."""

from __future__ import annotations

import math
from typing import Any

from fedsecure.errors import ConfigError

PRESETS = ("deepseek-v3-tiny-clinical", "deepseek-v3-tiny", "deepseek-v2-tiny", "r1-distill-qwen-tiny")
#: Privacy accountants a site may use: PRV (tightest sound bound) and RDP. The Gaussian/CLT accountant is refused.
ACCOUNTANTS = ("prv", "rdp")
#: dtypes of the frozen base model (model.dtype)
DTYPES = ("float32", "bfloat16", "float16")
#: quantization of the frozen base's Linear weights (model.quantization)
QUANTIZATIONS = ("none", "int8", "nf4")
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


def finite(value: float) -> bool:
    """Whether ``value`` is a real, finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)



def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise a ConfigError naming ``key``, the ``rule`` it breaks and the ``value`` found, unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {rule}; found {value!r}.")
