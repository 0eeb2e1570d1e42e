"""fedsecure: federated, differentially private LoRA fine-tuning of DeepSeek models across hospitals.

Importing fedsecure turns off every phone-home of the libraries it runs, before any of them is imported: nothing
but the federation's own traffic leaves a hospital (README, "What leaves the building"). Flower reads
``FLWR_TELEMETRY_ENABLED`` once, when ``flwr.supercore.telemetry`` is imported; where that already happened (a
Flower process that imports our app), the module's flag is switched off too. The processes fedsecure starts get
the same variables (:func:`fedsecure.launch.engines.flower_env`).
"""

import os as _os
import sys as _sys

#: Variables that switch off usage telemetry and hub access of the libraries fedsecure runs. Forced, not defaulted:
#: a site's environment must not be able to turn them back on by accident.
NO_PHONE_HOME = {
    "FLWR_TELEMETRY_ENABLED": "0",  # Flower: anonymous usage events to telemetry.flower.ai
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray (Flower's simulation engine): usage statistics to Anyscale
    "HF_HUB_DISABLE_TELEMETRY": "1",  # Hugging Face hub: telemetry
    "HF_HUB_OFFLINE": "1",  # models are built from a config or loaded local_files_only; never fetched
    "TRANSFORMERS_OFFLINE": "1",
}
_os.environ.update(NO_PHONE_HOME)
if "flwr.supercore.telemetry" in _sys.modules:
    _sys.modules["flwr.supercore.telemetry"].FLWR_TELEMETRY_ENABLED = "0"
