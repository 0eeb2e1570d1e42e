"""A site's multi-process training and its collective-communication settings (``site.training``, ``site.nccl``).

Both are the site's own: how many ranks train its model, on which backend, and what NCCL is told about the
machine's interconnect. A run config never holds them. The ``nccl`` settings reach every rank as environment
variables (NCCL reads only its environment), never as typed flags; ``docs/multi-gpu.md`` says what each does
and when to change it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedsecure.config.checks import finite, require

BACKENDS = ("auto", "gloo", "nccl")
#: gradient compression between ranks: none (float32), bf16 (DP: the reduce-scatter in float32, the noised mean
#: gathered in bfloat16; non-private: DDP's bf16 hook), powersgd (low rank, non-private only)
COMPRESSIONS = ("none", "bf16", "powersgd")
MAX_PROCESSES = 64

#: NCCL_NET_GDR_LEVEL / NCCL_P2P_LEVEL: how far apart (in the PCI topology) GPUs and NICs may be
TOPOLOGY_LEVELS = ("LOC", "NVL", "PIX", "PXB", "PHB", "SYS")
NCCL_DEBUG_LEVELS = ("VERSION", "WARN", "INFO", "TRACE")

#: named profiles for the common fabrics: the variables each sets (an explicit key in ``nccl:`` wins)
NCCL_PROFILES: dict[str, dict[str, str]] = {
    "none": {},  # NCCL's own detection
    # one machine, GPUs joined by NVLink/NVSwitch: peer-to-peer over NVLink only, no network transport
    "single-node-nvlink": {"NCCL_P2P_LEVEL": "NVL", "NCCL_IB_DISABLE": "1"},
    # RoCE v2: the GID of a RoCE v2 address (index 3 on most Mellanox/NVIDIA NICs with an IPv4 address), the
    # lossless traffic class (DSCP 26, ECN: 106), GPUDirect RDMA up to the host bridge (needs nvidia-peermem)
    "roce-v2": {"NCCL_IB_DISABLE": "0", "NCCL_IB_GID_INDEX": "3", "NCCL_IB_TC": "106", "NCCL_NET_GDR_LEVEL": "PHB"},
    # InfiniBand: verbs with GPUDirect RDMA up to the host bridge (needs nvidia-peermem)
    "infiniband": {"NCCL_IB_DISABLE": "0", "NCCL_NET_GDR_LEVEL": "PHB"},
    # no RDMA: TCP sockets (set socket_ifname to the fast interface)
    "tcp": {"NCCL_IB_DISABLE": "1"},
}

_IFNAME = re.compile(r"^[\^=]?[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*$")
_HCA = re.compile(r"^[\^=]?[A-Za-z0-9_.-]+(:[0-9]+)?(,[A-Za-z0-9_.-]+(:[0-9]+)?)*$")


@dataclass(frozen=True)
class SiteTraining:
    """How the site's local training runs: one process, or ``processes`` ranks (torch.distributed) that the
    site's worker starts for each round, with one DP noise draw per logical step.
    """

    processes: int | str = 1  # ranks; auto = one per visible GPU (1 where there is none)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    round_timeout_s: float = 3600.0  # a round whose ranks have not all finished by then fails; nothing leaves
    gradient_compression: str = "none"  # none | bf16 (DP: rounded after the noise) | powersgd (non-private only)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        p = self.processes
        require(p == "auto" or (isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= MAX_PROCESSES),
                f"{prefix}.processes", p, f"must be auto or an integer in [1, {MAX_PROCESSES}]")
        require(self.backend in BACKENDS, f"{prefix}.backend", self.backend, f"must be one of {', '.join(BACKENDS)}")
        require(finite(self.round_timeout_s) and 10 <= self.round_timeout_s <= 7 * 86400,
                f"{prefix}.round_timeout_s", self.round_timeout_s, "must be in [10, 604800] seconds")
        require(self.gradient_compression in COMPRESSIONS, f"{prefix}.gradient_compression",
                self.gradient_compression, f"must be one of {', '.join(COMPRESSIONS)}")

    def check_private(self, prefix: str, dp_required: bool) -> None:
        """A site that always trains with DP cannot use PowerSGD between its ranks (the sum must be exact)."""
        require(self.gradient_compression != "powersgd" or not dp_required, f"{prefix}.gradient_compression",
                self.gradient_compression, "must be none or bf16 where privacy.dp_required is true: PowerSGD "
                "projects a partial sum of clipped gradients before the noise covers it, which has no per-record "
                "sensitivity bound")


@dataclass(frozen=True)
class NcclSettings:
    """NCCL's environment for every rank: a named ``profile`` for the fabric, and explicit keys over it."""

    profile: str = "none"  # none | single-node-nvlink | roce-v2 | infiniband | tcp
    socket_ifname: str | None = None  # NCCL_SOCKET_IFNAME: bootstrap and TCP interface(s), e.g. eth0 or ^docker,lo
    ib_hca: str | None = None  # NCCL_IB_HCA: RDMA devices (and ports), e.g. mlx5_0:1,mlx5_1:1
    ib_gid_index: int | None = None  # NCCL_IB_GID_INDEX: RoCE v2 GID index (fedsecure doctor lists them)
    net_gdr_level: str | None = None  # NCCL_NET_GDR_LEVEL: LOC | PIX | PXB | PHB | SYS (GPUDirect RDMA)
    p2p_level: str | None = None  # NCCL_P2P_LEVEL: LOC | NVL | PIX | PXB | PHB | SYS
    ib_tc: int | None = None  # NCCL_IB_TC: traffic class, 0-255 (RoCE: the lossless class)
    ib_sl: int | None = None  # NCCL_IB_SL: InfiniBand service level, 0-15
    debug: str = "WARN"  # NCCL_DEBUG: VERSION | WARN | INFO | TRACE
    async_error_handling: int = 3  # TORCH_NCCL_ASYNC_ERROR_HANDLING: 0 off, 1 tear down, 2 clean up only, 3 skip
    timeout_s: float = 600.0  # one collective's limit (init_process_group timeout)

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming the key, value and fix of the first invalid field."""
        require(self.profile in NCCL_PROFILES, f"{prefix}.profile", self.profile,
                f"must be one of {', '.join(NCCL_PROFILES)}")
        if self.socket_ifname is not None:
            require(bool(_IFNAME.match(self.socket_ifname)), f"{prefix}.socket_ifname", self.socket_ifname,
                    "must be interface names or prefixes, comma-separated, optionally after ^ (exclude) or = "
                    "(exact), e.g. eth0 or ^docker,lo")
        if self.ib_hca is not None:
            require(bool(_HCA.match(self.ib_hca)), f"{prefix}.ib_hca", self.ib_hca,
                    "must be RDMA device names with optional :port, comma-separated, e.g. mlx5_0:1,mlx5_1:1")
        for key, value, top in (("ib_gid_index", self.ib_gid_index, 255), ("ib_tc", self.ib_tc, 255),
                                ("ib_sl", self.ib_sl, 15)):
            if value is not None:
                require(0 <= value <= top, f"{prefix}.{key}", value, f"must be an integer in [0, {top}]")
        if self.net_gdr_level is not None:
            require(self.net_gdr_level in TOPOLOGY_LEVELS and self.net_gdr_level != "NVL",
                    f"{prefix}.net_gdr_level", self.net_gdr_level, "must be one of LOC, PIX, PXB, PHB, SYS")
        if self.p2p_level is not None:
            require(self.p2p_level in TOPOLOGY_LEVELS, f"{prefix}.p2p_level", self.p2p_level,
                    f"must be one of {', '.join(TOPOLOGY_LEVELS)}")
        require(self.debug in NCCL_DEBUG_LEVELS, f"{prefix}.debug", self.debug,
                f"must be one of {', '.join(NCCL_DEBUG_LEVELS)}")
        require(self.async_error_handling in (0, 1, 2, 3), f"{prefix}.async_error_handling",
                self.async_error_handling, "must be 0, 1, 2 or 3 (3: a failed collective raises, keep it)")
        require(finite(self.timeout_s) and 10 <= self.timeout_s <= 86400, f"{prefix}.timeout_s", self.timeout_s,
                "must be in [10, 86400] seconds")

    def environment(self) -> dict[str, str]:
        """The variables every rank gets: the profile's, then each key that is set."""
        env = dict(NCCL_PROFILES[self.profile])
        explicit = {"NCCL_SOCKET_IFNAME": self.socket_ifname, "NCCL_IB_HCA": self.ib_hca,
                    "NCCL_IB_GID_INDEX": self.ib_gid_index, "NCCL_NET_GDR_LEVEL": self.net_gdr_level,
                    "NCCL_P2P_LEVEL": self.p2p_level, "NCCL_IB_TC": self.ib_tc, "NCCL_IB_SL": self.ib_sl,
                    "NCCL_DEBUG": self.debug, "TORCH_NCCL_ASYNC_ERROR_HANDLING": self.async_error_handling}
        env.update({k: str(v) for k, v in explicit.items() if v is not None})
        return env
