"""The run's sections: what a federation run asks for (model, data, training, privacy requests, storage of the
coordinator, transport, attestation). Each section validates itself; errors name the key, value and fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from fedsecure.config.checks import DTYPES, PRESETS, QUANTIZATIONS, check_accountant, finite, require
from fedsecure.errors import ConfigError


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape. ``targets`` empty means the architecture's default set."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(self.r >= 1, f"{prefix}.r", self.r, "must be a positive integer, e.g. 8")
        require(self.alpha >= 1, f"{prefix}.alpha", self.alpha, "must be a positive integer, e.g. 16")
        require(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class ModelSettings:
    """Which base model: a built-in tiny ``preset`` or a local Hugging Face ``path``."""

    preset: str | None = "deepseek-v3-tiny-clinical"  # the shipped pretrained base
    path: str | None = None
    seed: int = 0  # initialisation seed of a preset's random base weights
    device: str = "auto"  # auto (the first CUDA device if there is one, else cpu) | cpu | cuda | cuda:N
    dtype: str = "float32"  # the frozen base: float32 | bfloat16 | float16; LoRA and its optimizer stay float32
    quantization: str = "none"  # the frozen base's Linear weights: none | int8 | nf4 (bitsandbytes)
    quantize_attention: bool = False  # false: attention projections stay in `dtype` (only the MLPs are quantized)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        if self.path is None and self.preset is None:
            raise ConfigError(f"{prefix}: set either 'preset' (one of {', '.join(PRESETS)}) or 'path' "
                              "(a local Hugging Face model directory).")
        if self.path is None:
            require(self.preset in PRESETS, f"{prefix}.preset", self.preset,
                     f"must be one of {', '.join(PRESETS)}, or set {prefix}.path to a local model directory")
        require(re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,2})?", str(self.device)) is not None, f"{prefix}.device",
                self.device, "must be auto, cpu, cuda or cuda:N")
        require(self.dtype in DTYPES, f"{prefix}.dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        require(self.quantization in QUANTIZATIONS, f"{prefix}.quantization", self.quantization,
                f"must be one of {', '.join(QUANTIZATIONS)}")
        if self.quantization != "none":
            require(self.dtype != "float16" or self.quantization == "int8", f"{prefix}.dtype", self.dtype,
                    "must be float32 or bfloat16 with nf4 (its compute dtype)")
        self.lora.validate(f"{prefix}.lora")


@dataclass(frozen=True)
class DataSettings:
    """Site datasets. ``dir`` holds ``site-<i>/train.jsonl`` and ``site-<i>/eval.jsonl``;
    when it is null, ``fedsecure simulate`` synthesises data into the run directory.
    """

    dir: str | None = None
    records_per_site: int = 480
    eval_fraction: float = 0.2
    max_length: int = 96

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(self.records_per_site >= 4, f"{prefix}.records_per_site", self.records_per_site,
                 "must be at least 4")
        require(0.0 < self.eval_fraction < 1.0, f"{prefix}.eval_fraction", self.eval_fraction,
                 "must be in (0, 1), e.g. 0.2")
        require(8 <= self.max_length <= 32768, f"{prefix}.max_length", self.max_length,
                 "must be in [8, 32768] tokens")


@dataclass(frozen=True)
class TrainSettings:
    """Local training at each site, per round."""

    local_steps: int = 16
    batch_size: int = 64
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False  # recompute each layer in backward (needs privacy.grad_sample_mode: hooks)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(self.local_steps >= 1, f"{prefix}.local_steps", self.local_steps, "must be >= 1")
        require(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        require(finite(self.learning_rate) and 0.0 < self.learning_rate < 10.0, f"{prefix}.learning_rate",
                 self.learning_rate, "must be in (0, 10), e.g. 3e-3")
        require(finite(self.weight_decay) and self.weight_decay >= 0.0, f"{prefix}.weight_decay", self.weight_decay,
                 "must be a finite number >= 0")


@dataclass(frozen=True)
class SecureAggregationSettings:
    """Secure aggregation (fedsecure.secagg): the coordinator learns only the weighted sum of the updates."""

    enabled: bool = False
    dropouts: int = 1  # sites that may drop out of a round's protocol; threshold = sampled - dropouts (a majority)
    levels: int = 4  # codes per side of zero: each value quantized with step = its update bound / levels
    roster: str | None = None  # site name -> node public key (YAML); None in `fedsecure simulate` = generated
    phase_timeout_s: float = 300.0  # each phase's wait for the sites' replies (no training happens in a phase)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(0 <= self.dropouts <= 1000, f"{prefix}.dropouts", self.dropouts, "must be in [0, 1000]")
        require(1 <= self.levels <= 127, f"{prefix}.levels", self.levels,
                 "must be in [1, 127] (4 sends each value about as finely as the default dithered codec)")
        require(finite(self.phase_timeout_s) and self.phase_timeout_s > 0, f"{prefix}.phase_timeout_s",
                 self.phase_timeout_s, "must be a finite number > 0 seconds")


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
    secure_aggregation: SecureAggregationSettings = field(default_factory=SecureAggregationSettings)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(finite(self.join_timeout_s) and self.join_timeout_s >= 0, f"{prefix}.join_timeout_s",
                 self.join_timeout_s, "must be a finite number >= 0 seconds")
        require(1 <= self.sites <= 1000, f"{prefix}.sites", self.sites, "must be in [1, 1000]")
        require(1 <= self.rounds <= 100000, f"{prefix}.rounds", self.rounds, "must be >= 1")
        require(0.0 < self.fraction_train <= 1.0, f"{prefix}.fraction_train", self.fraction_train,
                 "must be in (0, 1]")
        require(1 <= self.min_sites <= self.sites, f"{prefix}.min_sites", self.min_sites,
                 f"must be in [1, {prefix}.sites]")
        require(finite(self.round_timeout_s) and self.round_timeout_s > 0, f"{prefix}.round_timeout_s",
                 self.round_timeout_s, "must be a finite number > 0")
        require(1 <= self.max_site_records <= 1 << 40, f"{prefix}.max_site_records", self.max_site_records,
                 "must be in [1, 2^40]")
        if self.max_update_norm is not None:
            require(finite(self.max_update_norm) and self.max_update_norm > 0, f"{prefix}.max_update_norm",
                     self.max_update_norm, "must be a finite number > 0, or null for no cap")
        self.secure_aggregation.validate(f"{prefix}.secure_aggregation")


@dataclass(frozen=True)
class ClientDPSettings:
    """Optional client-level DP: clip each site's update, noise the sum. At the coordinator; or, under secure
    aggregation, at the sites (each adds its share of a distributed discrete Gaussian, ``noise_seed`` unused).
    """

    enabled: bool = False
    clip: float = 1.0  # S: L2 bound on one site's adapter delta
    noise_multiplier: float = 1.0  # sigma_c: noise std is sigma_c * S on the sum
    delta: float = 1e-5
    noise_seed: int | None = None  # ONLY for reproducible tests of the coordinator's noise

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(finite(self.clip) and self.clip > 0, f"{prefix}.clip", self.clip, "must be a finite number > 0")
        require(finite(self.noise_multiplier) and self.noise_multiplier > 0, f"{prefix}.noise_multiplier",
                 self.noise_multiplier, "must be a finite number > 0")
        require(finite(self.delta) and 0 < self.delta < 1, f"{prefix}.delta", self.delta, "must be in (0, 1)")


@dataclass(frozen=True)
class PrivacySettings:
    """What the run asks of every site's record-level DP-SGD (Opacus).

    These are requests: each site's own policy (:class:`SitePolicy`) is authoritative, and a request
    looser than it (DP off, a larger epsilon or delta, a smaller sigma, a larger clip, another
    accountant) is refused by the site with the key, both values and the fix.
    """

    enabled: bool = True  # false asks for non-private training: only sites whose own policy allows it comply
    epsilon_budget: float | None = None  # None = each site's own (site.privacy.epsilon_budget); else at most that
    delta: float | None = None  # None = each site's own delta; else at most that
    max_grad_norm: float = 1.0  # C: per-record L2 clipping bound (at most the site's max_clip)
    noise_multiplier: float | None = None  # sigma; None = calibrated by each site from its remaining budget
    accountant: str = "prv"  # prv (default, tightest sound) | rdp; the Gaussian/CLT accountant is refused
    grad_sample_mode: str = "ew"  # Opacus per-sample gradients: ew (fastest exact here) | hooks
    client_dp: ClientDPSettings = field(default_factory=ClientDPSettings)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        if self.epsilon_budget is not None:
            require(finite(self.epsilon_budget) and 0 < self.epsilon_budget <= 100, f"{prefix}.epsilon_budget",
                     self.epsilon_budget,
                     "must be in (0, 100], e.g. 3, or null for each site's own budget")
        if self.delta is not None:
            require(finite(self.delta) and 0 < self.delta < 1e-2, f"{prefix}.delta", self.delta,
                     "must be in (0, 0.01) and well below 1/records; null uses each site's own delta")
        require(finite(self.max_grad_norm) and self.max_grad_norm > 0, f"{prefix}.max_grad_norm",
                 self.max_grad_norm, "must be a finite number > 0, e.g. 1.0")
        if self.noise_multiplier is not None:
            require(finite(self.noise_multiplier) and self.noise_multiplier > 0, f"{prefix}.noise_multiplier",
                     self.noise_multiplier, "must be a finite number > 0, or null to calibrate it from the budget")
        check_accountant(self.accountant, f"{prefix}.accountant")
        require(self.grad_sample_mode in ("ew", "hooks"), f"{prefix}.grad_sample_mode", self.grad_sample_mode,
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
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(4096 <= self.chunk_size <= 64 << 20, f"{prefix}.chunk_size", self.chunk_size,
                 "must be in [4096, 67108864] bytes")
        if self.key_provider == "command":
            require(bool(self.key_command), f"{prefix}.key_command", self.key_command,
                     "must name the program that prints the keyring when key_provider is command")


@dataclass(frozen=True)
class TensorRule:
    """How one tensor travels: ``bits`` 32 (float32), 8 or 4; ``topk`` fraction kept (1.0 = dense);
    ``dither`` > 0: dithered quantization with a step of ``dither`` x the tensor's RMS (``bits`` unused).
    """

    bits: int = 8
    topk: float = 1.0
    dither: float = 0.0

    def __post_init__(self) -> None:
        if self.bits not in (32, 8, 4):
            raise ValueError(f"bits must be 32, 8 or 4; got {self.bits}")
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1]; got {self.topk}")
        if not (math.isfinite(self.dither) and 0.0 <= self.dither <= 1000.0):
            raise ValueError(f"dither step must be in [0, 1000] (x RMS; 0 = off); got {self.dither}")

    @property
    def enc(self) -> str:
        """The encoding's policy name, a key of :data:`~fedsecure.transport.stages.BY_NAME`."""
        return "dq" if self.dither > 0 else {32: "f32", 8: "q8", 4: "q4"}[self.bits]


def parse_tensor_rules(items: Sequence[str]) -> tuple[tuple[str, TensorRule], ...]:
    """``"glob=bits/topk"`` strings; ``bits`` is 32, 8, 4 or ``d<step>`` (dithered, step x RMS).

    E.g. ``"*kv_b_proj*=32/1.0"`` keeps a sensitive layer exact, ``"*lora_A*=d6/1.0"`` sends the
    LoRA A matrices coarser than the rest.
    """
    out = []
    for item in items:
        try:
            pattern, spec = item.rsplit("=", 1)
            bits, topk = spec.split("/")
            if bits.startswith("d"):
                rule = TensorRule(8, float(topk), float(bits[1:]))
                if rule.dither <= 0:
                    raise ValueError("a dither step must be > 0")
            else:
                rule = TensorRule(int(bits), float(topk))
            out.append((pattern, rule))
        except ValueError as e:
            raise ValueError(f"transport.policy entry {item!r} must look like 'glob=bits/topk' with bits 32, 8, 4 "
                             f"or d<step>, e.g. '*kv_b_proj*=32/1.0' or '*lora_A*=d6/1.0' ({e})") from None
    return tuple(out)


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
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        for key in ("uplink_bits", "downlink_bits"):
            require(getattr(self, key) in (32, 8, 4), f"{prefix}.{key}", getattr(self, key), "must be 32, 8 or 4")
        for key in ("uplink_topk", "downlink_topk"):
            require(0 < getattr(self, key) <= 1, f"{prefix}.{key}", getattr(self, key), "must be in (0, 1]")
        for key in ("uplink_dither", "downlink_dither"):
            require(0 <= getattr(self, key) <= 1000, f"{prefix}.{key}", getattr(self, key),
                     "must be in [0, 1000] (quantization step in units of the tensor's RMS; 0 = off)")
        require(0 <= self.zstd_level <= 22, f"{prefix}.zstd_level", self.zstd_level, "must be in [0, 22]")
        require(self.max_update_bytes >= 1024, f"{prefix}.max_update_bytes", self.max_update_bytes, "must be >= 1024")
        try:
            parse_tensor_rules(self.policy)
        except ValueError as e:
            raise ConfigError(f"{prefix}.policy: {e}") from None


@dataclass(frozen=True)
class MetricsSettings:
    """The coordinator's Prometheus endpoint: off by default, on loopback unless configured otherwise."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464
    site_port: int = 9465  # fedsecure simulate: simulated site i serves its own endpoint on site_port + i (0 = free)
    influx_url: str = ""  # optional push after every round: http(s)://host:8086 of an InfluxDB 1.x or 2.x
    influx_db: str = ""  # 1.x: the database (/write?db=)
    influx_org: str = ""  # 2.x: org and bucket (/api/v2/write)
    influx_bucket: str = ""
    influx_token_env: str = ""  # 2.x: the NAME of the environment variable holding the token (never the token)

    @property
    def influx_version(self) -> int:
        """2 when an org and bucket are given, else 1."""
        return 2 if self.influx_bucket else 1

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(bool(self.host.strip()), f"{prefix}.host", self.host, "must be an address to bind, e.g. 127.0.0.1")
        require(0 <= self.port <= 65535, f"{prefix}.port", self.port, "must be a TCP port (0 = any free port)")
        require(0 <= self.site_port <= 65535, f"{prefix}.site_port", self.site_port,
                "must be a TCP port (0 = any free port for each simulated site)")
        if self.influx_url:
            require(self.influx_url.startswith(("http://", "https://")), f"{prefix}.influx_url", self.influx_url,
                    "must be an http:// or https:// URL of an InfluxDB")
            if self.influx_bucket:
                require(bool(self.influx_org), f"{prefix}.influx_org", self.influx_org,
                        "must name the InfluxDB 2.x organisation of influx_bucket")
            else:
                require(bool(self.influx_db), f"{prefix}.influx_db", self.influx_db,
                        "must name an InfluxDB 1.x database (or give influx_org and influx_bucket for 2.x)")


@dataclass(frozen=True)
class AttestationSettings:
    """TEE attestation of every update (coordinator side): the sites' providers are their own (``site.attestation``)."""

    enabled: bool = True
    policy: str | None = None  # coordinator: policy file; None in `fedsecure simulate` = generated for this build

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        if self.policy is not None:
            require(bool(self.policy.strip()), f"{prefix}.policy", self.policy, "must be a file path or null")

