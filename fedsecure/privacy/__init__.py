"""Differential privacy at a site: accounting, calibration, the privacy ledger and DP-SGD."""

from fedsecure.privacy.accounting import (
    ACCOUNTANTS,
    Spend,
    calibrate_noise,
    default_delta,
    epsilon_of,
)

__all__ = ["ACCOUNTANTS", "Spend", "calibrate_noise", "default_delta", "epsilon_of"]
