"""A deterministic simulator of one dcgm-exporter node.

``SimulatedNode(...).render(t)`` returns the ``/metrics`` body that dcgm-exporter
would serve at time ``t`` (seconds). Used by the tests, the recorded benchmark
payloads (``tools/gen_payloads.py``) and ``dcgmrelay demo``::

    >>> node = SimulatedNode(2, pods="some", xid=True)
    >>> body = node.render(0.0)
    >>> body.startswith(b"# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).")
    True

What is modelled (see the dcgm-exporter notes, section 2):

* Label order ``gpu, UUID, pci_bus_id, device, modelName[, GPU_I_PROFILE, GPU_I_ID]
  [, Hostname]``, then the CSV ``label`` fields and the exporter's extra labels
  sorted by key, then the attributes (``container, namespace, pod``, ``err_code``,
  ``err_msg``) sorted by key.
* Two renderers. ``"template"`` is text/template of dcgm-exporter <= 4.8.2: INT64 as
  ``%d``, DOUBLE as ``%f``, ``Hostname``, nothing escaped, families in ascending
  field id. ``"expfmt"`` is the 2026 renderer: the value string is parsed back and
  written as Go's shortest ``'g'`` float (``1.28996013e+08``, ``8e-06``),
  ``hostname`` in lower case, label values and help escaped, families sorted by name.
* Values only change at collect ticks (``collect_interval``, 30 s like the exporter's
  ``-c``), so two scrapes within one collect period return the same values.
  Events (``reset_counters``, ``move_pod`` ...) apply to the next render.
* MIG in the exporter's default "flex" mode: a MIG GPU is rendered as its instances
  only; device-level fields repeat the parent's value, ``*_UTIL`` are unsupported
  (DCGM blank, so the sample is dropped).
* Kubernetes attribution of dcgm-exporter >= 3.3.5: ``container/namespace/pod`` only
  on devices a pod owns; time-sliced GPUs repeat each series once per pod.

Only ``random.Random.random()`` is used, whose stream is stable across Python
versions, so the same seed and the same calls give the same bytes everywhere.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from typing import Callable, Iterable, Literal, Mapping, NamedTuple, Sequence, Union

from . import fields as _fields

__all__ = [
    "DEFAULT_FIELDS",
    "MODELS",
    "XID_MESSAGES",
    "GpuModel",
    "Pod",
    "SimulatedNode",
    "go_float",
]

# ------------------------------------------------------------------------------------------
# Static data


class GpuModel(NamedTuple):
    """What the simulator needs to know about a GPU model."""

    fb_total: int  # MiB, as DCGM_FI_DEV_FB_TOTAL reports it
    fb_reserved: int  # MiB
    tdp: float  # W
    idle_power: float  # W
    sm_clock: tuple[int, int]  # idle, max (MHz)
    mem_clock: tuple[int, int]  # idle, max (MHz); HBM does not down-clock
    hbm: bool  # reports DCGM_FI_DEV_MEMORY_TEMP (GDDR boards report 0)
    nvlink_mbps: int  # peak DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL; 0 = no NVLink (reports 0)
    pcie_bps: float  # peak PROF_PCIE_*_BYTES (bytes/s, one direction)
    # MIG profile name per compute-slice count; empty = no MIG support.
    mig_profiles: Mapping[int, str]


MODELS: dict[str, GpuModel] = {
    "NVIDIA H100 80GB HBM3": GpuModel(
        81559, 563, 700.0, 70.0, (345, 1980), (2619, 2619), True, 450_000, 5.0e10,
        {1: "1g.10gb", 2: "2g.20gb", 3: "3g.40gb", 4: "4g.40gb", 7: "7g.80gb"}),
    "NVIDIA H200": GpuModel(
        143771, 583, 700.0, 75.0, (345, 1980), (3201, 3201), True, 450_000, 5.0e10,
        {1: "1g.18gb", 2: "2g.35gb", 3: "3g.71gb", 4: "4g.71gb", 7: "7g.141gb"}),
    "NVIDIA A100-SXM4-80GB": GpuModel(
        81920, 567, 400.0, 55.0, (210, 1410), (1593, 1593), True, 300_000, 2.5e10,
        {1: "1g.10gb", 2: "2g.20gb", 3: "3g.40gb", 4: "4g.40gb", 7: "7g.80gb"}),
    "NVIDIA A100-SXM4-40GB": GpuModel(
        40960, 559, 400.0, 52.0, (210, 1410), (1215, 1215), True, 300_000, 2.5e10,
        {1: "1g.5gb", 2: "2g.10gb", 3: "3g.20gb", 4: "4g.20gb", 7: "7g.40gb"}),
    "NVIDIA A30": GpuModel(
        24576, 487, 165.0, 30.0, (210, 1440), (1215, 1215), True, 100_000, 2.5e10,
        {1: "1g.6gb", 2: "2g.12gb", 4: "4g.24gb"}),
    "NVIDIA L40S": GpuModel(
        46068, 525, 350.0, 35.0, (210, 2520), (405, 9001), False, 0, 2.5e10, {}),
    "Tesla T4": GpuModel(
        15360, 251, 70.0, 9.0, (300, 1590), (405, 5000), False, 0, 1.2e10, {}),
}

# (prometheus type, help) of every row of dcgm-exporter's default-counters.csv, active and
# commented out, exactly as written there (help texts of commented rows included).
_CSV_ROWS: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_SM_CLOCK": ("gauge", "SM clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEM_CLOCK": ("gauge", "Memory clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEMORY_TEMP": ("gauge", "Memory temperature (in C)."),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)."),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("counter", "Total energy consumption since boot (in mJ)."),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("counter", "Total number of PCIe retries."),
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %)."),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("gauge", "Memory utilization (in %)."),
    "DCGM_FI_DEV_ENC_UTIL": ("gauge", "Encoder utilization (in %)."),
    "DCGM_FI_DEV_DEC_UTIL": ("gauge", "Decoder utilization (in %)."),
    "DCGM_FI_DEV_XID_ERRORS": ("gauge", "Value of the last XID error encountered."),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_FB_USED": ("gauge", "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_FB_RESERVED": ("gauge", "Framebuffer memory reserved (in MiB)."),
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": ("counter", "Total number of NVLink bandwidth counters for all lanes."),
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS": ("gauge", "vGPU License status"),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for uncorrectable errors"),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for correctable errors"),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("gauge", "Whether remapping of rows has failed"),
    "DCGM_FI_DRIVER_VERSION": ("label", "Driver Version"),
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": ("gauge", "Ratio of time the graphics engine is active."),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("gauge", "Ratio of cycles the tensor (HMMA) pipe is active."),
    "DCGM_FI_PROF_DRAM_ACTIVE": ("gauge", "Ratio of cycles the device memory interface is active sending or receiving data."),
    "DCGM_FI_PROF_PCIE_TX_BYTES": ("gauge", "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second."),
    "DCGM_FI_PROF_PCIE_RX_BYTES": ("gauge", "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second."),
    # Commented-out suggestions in the same file.
    "DCGM_FI_DEV_POWER_VIOLATION": ("counter", "Throttling duration due to power constraints (in ns)."),
    "DCGM_FI_DEV_THERMAL_VIOLATION": ("counter", "Throttling duration due to thermal constraints (in ns)."),
    "DCGM_FI_DEV_SYNC_BOOST_VIOLATION": ("counter", "Throttling duration due to sync-boost constraints (in ns)."),
    "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION": ("counter", "Throttling duration due to board limit constraints (in ns)."),
    "DCGM_FI_DEV_LOW_UTIL_VIOLATION": ("counter", "Throttling duration due to low utilization (in ns)."),
    "DCGM_FI_DEV_RELIABILITY_VIOLATION": ("counter", "Throttling duration due to reliability constraints (in ns)."),
    "DCGM_EXP_CLOCK_EVENTS_COUNT": ("counter", "reported clock events"),
    "DCGM_EXP_XID_ERRORS_COUNT": ("counter", "reported XIDs during last window"),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("counter", "Total number of single-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("counter", "Total number of double-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": ("counter", "Total number of single-bit persistent ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": ("counter", "Total number of double-bit persistent ECC errors."),
    "DCGM_FI_DEV_RETIRED_SBE": ("counter", "Total number of retired pages due to single-bit errors."),
    "DCGM_FI_DEV_RETIRED_DBE": ("counter", "Total number of retired pages due to double-bit errors."),
    "DCGM_FI_DEV_RETIRED_PENDING": ("counter", "Total number of pages pending retirement."),
    "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink flow-control CRC errors."),
    "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink data CRC errors."),
    "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink retries."),
    "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": ("counter", "Total number of NVLink recovery errors."),
    "DCGM_FI_NVML_VERSION": ("label", "NVML Version"),
    "DCGM_FI_DEV_BRAND": ("label", "Device Brand"),
    "DCGM_FI_DEV_SERIAL": ("label", "Device Serial Number"),
    "DCGM_FI_DEV_OEM_INFOROM_VER": ("label", "OEM inforom version"),
    "DCGM_FI_DEV_ECC_INFOROM_VER": ("label", "ECC inforom version"),
    "DCGM_FI_DEV_POWER_INFOROM_VER": ("label", "Power management object inforom version"),
    "DCGM_FI_DEV_INFOROM_IMAGE_VER": ("label", "Inforom image version"),
    "DCGM_FI_DEV_VBIOS_VERSION": ("label", "VBIOS version of the device"),
    "DCGM_FI_PROF_SM_ACTIVE": ("gauge", "The ratio of cycles an SM has at least 1 warp assigned."),
    "DCGM_FI_PROF_SM_OCCUPANCY": ("gauge", "The ratio of number of warps resident on an SM."),
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": ("gauge", "Ratio of cycles the fp64 pipes are active."),
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": ("gauge", "Ratio of cycles the fp32 pipes are active."),
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": ("gauge", "Ratio of cycles the fp16 pipes are active."),
}

#: The active rows of default-counters.csv (= dcp-metrics-included.csv), in file order.
DEFAULT_FIELDS: tuple[str, ...] = (
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_VGPU_LICENSE_STATUS",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DRIVER_VERSION", "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES",
    "DCGM_FI_PROF_PCIE_RX_BYTES",
)

#: err_msg per XID (dcgm-exporter xid_errors.go); others render "Unknown Error".
#: Real messages carry commas, colons, "--" and parentheses: a naive split on ',' breaks.
XID_MESSAGES: dict[int, str] = {
    0: "No Error",
    13: "Graphics Engine Exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "Preemptive cleanup, due to previous errors -- Most likely to see when running multiple cuda",
    48: "Double Bit ECC Error",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLINK Error",
    79: "GPU has fallen off the bus",
    92: "High single-bit ECC error rate",
    94: "Contained ECC error",
    95: "Uncontained ECC error",
    119: "GSP RPC Timeout",
    154: "GPU Recovery Action Changed: (0x2) Node Reboot Required",
}
# XIDs a GPU starts with (every fourth GPU, from index 1) and that later occur at random;
# the first two are the awkward messages, so even a 2-GPU node shows them.
_XID_STARTERS = (45, 154, 79, 48, 94, 13, 31, 63)
_XID_RANDOM = (13, 31, 43, 45, 48, 63, 74, 79, 92, 94, 95, 119, 154)

# PCI buses of an HGX 8-GPU baseboard; further baseboards go to the next PCI domain.
_PCI_BUSES = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")
# Kubernetes pod-name suffix alphabet (no vowels, no confusable digits).
_K8S_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_WORKLOADS = (
    ("llm-train", "ml-training", "trainer"),
    ("vllm-serve", "inference", "vllm"),
    ("notebook", "research", "jupyter"),
    ("batch-embed", "batch", "worker"),
)
_WINDOW_MS = 300_000  # --xid-count-window-size / --clock-events-count-window-size default
_ERROR_STRING = "ERROR - FAILED TO CONVERT TO STRING"  # toString() of a binary field

# Field ids with their own value model; any other numeric field reads as 0.
_MIG_UNSUPPORTED = frozenset({203, 204, 206, 207})  # *_UTIL (issues #105, #430)
_EXP_XID, _EXP_CLOCK = 9001, 9002
_PROM_TYPES = frozenset({"gauge", "counter", "histogram", "summary", "label"})


class Pod(NamedTuple):
    """A Kubernetes pod that owns (part of) a GPU."""

    name: str
    namespace: str = "default"
    container: str = "main"


PodSpec = Union[str, Pod, Sequence[Union[str, Pod]]]
PodPolicy = Union[None, Literal["some", "all"], Mapping[Union[int, tuple[int, int]], PodSpec]]
FieldSpec = Union[str, tuple[str, str, str]]

# ------------------------------------------------------------------------------------------
# Value rendering


def go_float(v: float) -> str:
    """Format like prometheus/common expfmt ``writeFloat``: Go ``strconv.FormatFloat(v, 'g', -1, 64)``
    (the encoder's formatting: one implementation for the relay's output and the simulator's)."""
    from ._encode_py import format_float

    return format_float(v)


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


# ------------------------------------------------------------------------------------------
# Simulated entities


class _Entity:
    """A rendered device: a whole GPU, or one MIG instance. Holds the workload state."""

    gpu: _Gpu
    gi_id: int | None
    profile: str | None
    fb_total: int
    fb_reserved: int

    def _init_workload(self, r: Callable[[], float], busy: bool) -> None:
        self.pods: list[Pod] = []
        self.busy = busy
        self.level = 0.55 + 0.45 * r()
        self.fb_frac = 0.25 + 0.7 * r()
        self.load = self.level if busy else 0.0
        self.fb_used = 0
        self.gr = self.sm_active = self.sm_occ = self.tensor = self.dram = 0.0
        self.fp64 = self.fp32 = self.fp16 = 0.0

    def _step_workload(self, r: Callable[[], float], k8s: bool) -> None:
        if r() < 0.015:  # a job ends or starts (about one change per half hour)
            self.busy = not self.busy
            self.level = 0.55 + 0.45 * r()
            self.fb_frac = 0.25 + 0.7 * r()
        if k8s and not self.pods:
            self.busy = False  # under Kubernetes nothing runs on an unallocated device
        target = self.level if self.busy else 0.0
        self.load = _clamp(self.load + 0.6 * (target - self.load) + 0.06 * (r() - 0.5), 0.0, 1.0)
        avail = self.fb_total - self.fb_reserved
        jitter = r() - 0.5
        if self.busy:
            self.fb_used = int(_clamp(self.fb_frac + 0.02 * jitter, 0.0, 0.98) * avail)
        else:
            self.fb_used = 0 if self.gi_id is None else 13  # a MIG instance keeps its context
        ld = self.load
        self.gr = ld * (0.92 + 0.08 * r())
        self.sm_active = self.gr * (0.85 + 0.13 * r())
        self.sm_occ = self.sm_active * (0.3 + 0.3 * r())
        self.tensor = self.gr * (0.2 + 0.4 * r())
        self.dram = self.gr * (0.3 + 0.4 * r())
        self.fp32 = self.gr * (0.1 + 0.2 * r())
        self.fp16 = self.gr * 0.05 * r()
        self.fp64 = 0.0

    @property
    def fb_free(self) -> int:
        return self.fb_total - self.fb_reserved - self.fb_used


class _Instance(_Entity):
    gi_id: int

    def __init__(self, gpu: _Gpu, gi_id: int, profile: str, fb_total: int, busy: bool) -> None:
        self.gpu = gpu
        self.gi_id = gi_id
        self.profile = profile
        self.fb_total = fb_total
        self.fb_reserved = 0
        self._init_workload(gpu.rng.random, busy)


class _Gpu(_Entity):
    def __init__(self, index: int, seed: int, model: GpuModel, busy: bool, xid: bool) -> None:
        self.gpu = self
        self.gi_id = None
        self.profile = None
        self.index = index
        self.model = model
        h = hashlib.sha256(f"dcgmrelay-sim:{seed}:uuid:{index}".encode()).hexdigest()
        self.uuid = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        self.serial = str(1650000000000 + int(h[32:42], 16) % 10**10)
        self.pci_bus_id = f"{index // 8:08X}:{_PCI_BUSES[index % 8]}:00.0"
        self.rng = random.Random(f"dcgmrelay-sim:{seed}:gpu:{index}")
        self.removed = False
        self.instances: list[_Instance] = []
        self.next_gi_id = 1
        self.fb_total = model.fb_total
        self.fb_reserved = model.fb_reserved
        r = self.rng.random
        self._init_workload(r, busy)
        self.sm_clock, self.mem_clock = model.sm_clock[0], model.mem_clock[0]
        self.power = model.idle_power
        self.temp = 30.0 + 10.0 * r()
        self.mem_temp = self.temp + 4.0
        self.util = self.mem_util = 0
        # Counters since driver load: some days of uptime at a moderate draw.
        self.energy_mj = (1.0 + 29.0 * r()) * 86400.0 * 0.4 * model.tdp * 1000.0
        self.pcie_replay = int(4 * r()) if r() < 0.3 else 0
        self.ecc_sbe_vol = self.ecc_dbe_vol = 0
        self.ecc_sbe_agg = int(3 * r()) if r() < 0.2 else 0
        self.ecc_dbe_agg = 0
        self.remap_corr = self.ecc_sbe_agg // 2
        self.remap_unc = 0
        self.retired_sbe = self.retired_dbe = 0
        self.power_violation_ns = self.thermal_violation_ns = 0
        self.nvlink_crc_flit = self.nvlink_crc_data = self.nvlink_replay = self.nvlink_recovery = 0
        self.nvlink_bw = self.pcie_tx = self.pcie_rx = self.nvlink_tx = self.nvlink_rx = 0
        self.last_xid = _XID_STARTERS[(index // 4 + seed) % len(_XID_STARTERS)] if xid and index % 4 == 1 else 0
        self.xid_events: deque[tuple[float, int]] = deque()
        self.clock_events: deque[tuple[float, str]] = deque()

    def entities(self) -> list[_Entity]:
        return list(self.instances) if self.instances else [self]

    def step(self, now: float, dt: float, k8s: bool, xid: bool) -> None:
        """Advance one collect tick of ``dt`` seconds ending at ``now``."""
        r = self.rng.random
        m = self.model
        if self.instances:
            for inst in self.instances:
                inst._step_workload(r, k8s)
            self.load = sum(i.load * i.fb_total for i in self.instances) / m.fb_total
        else:
            self._step_workload(r, k8s)
        ld = self.load
        self.util = int(round(100 * _clamp(ld + 0.04 * (r() - 0.5), 0.0, 1.0)))
        self.mem_util = int(round(self.util * (0.25 + 0.2 * r())))
        self.power = round(min(m.tdp, m.idle_power + (m.tdp - m.idle_power) * ld ** 1.1 * (0.92 + 0.12 * r())), 3)
        capped = self.power >= 0.97 * m.tdp
        if ld < 0.02:
            self.sm_clock, self.mem_clock = m.sm_clock[0], m.mem_clock[0]
        else:
            # Boost bins are 15 MHz; power capping pulls the clock down a few bins more.
            self.sm_clock = m.sm_clock[1] - 15 * int(r() * (12 if capped else 4))
            self.mem_clock = m.mem_clock[1]
        self.temp += 0.35 * ((28.0 + 50.0 * self.power / m.tdp) - self.temp) + 0.8 * (r() - 0.5)
        self.mem_temp = self.temp + 4.0 + 2.0 * r()
        self.energy_mj += self.power * dt * 1000.0
        # Rates that go up and down.
        self.pcie_tx = int((0.002 + 0.3 * ld * r()) * m.pcie_bps)
        self.pcie_rx = int((0.002 + 0.5 * ld * r()) * m.pcie_bps)
        self.nvlink_bw = int(ld * r() * m.nvlink_mbps)
        self.nvlink_tx = self.nvlink_bw * 1024 * 512 if m.nvlink_mbps else 0
        self.nvlink_rx = int(self.nvlink_tx * (0.9 + 0.2 * r()))
        # Rare error counters.
        if r() < 0.002:
            self.pcie_replay += 1 + int(3 * r())
        if r() < 0.003:
            self.ecc_sbe_vol += 1
            self.ecc_sbe_agg += 1
            if r() < 0.3:
                self.remap_corr += 1
        if r() < 0.0002:
            self.ecc_dbe_vol += 1
            self.ecc_dbe_agg += 1
            self.remap_unc += 1
        if m.nvlink_mbps and r() < 0.001:
            self.nvlink_crc_flit += 1 + int(5 * r())
        if capped:
            self.power_violation_ns += int(dt * 1e9 * (0.2 + 0.6 * r()))
        if self.temp > 83.0:
            self.thermal_violation_ns += int(dt * 1e9 * 0.3)
        if xid and r() < 0.001:
            self.last_xid = _XID_RANDOM[int(r() * len(_XID_RANDOM))]
            self.xid_events.append((now, self.last_xid))
        for active, name in ((ld < 0.02, "gpu_idle"), (capped, "power_cap"), (self.temp > 83.0, "sw_thermal")):
            if active:
                self.clock_events.append((now, name))
        horizon = now - _WINDOW_MS / 1000.0
        for q in (self.xid_events, self.clock_events):
            while q and q[0][0] <= horizon:
                q.popleft()

    def skip(self, dt: float) -> None:
        """Integrate the counters over a long gap without walking every tick."""
        self.energy_mj += self.power * dt * 1000.0

    def reset_counters(self) -> None:
        """Driver reload: volatile counters restart, InfoROM-backed ones (aggregate ECC,
        remapped rows, retired pages) persist."""
        r = self.rng.random
        self.energy_mj = self.power * (5.0 + 25.0 * r()) * 1000.0
        self.pcie_replay = self.ecc_sbe_vol = self.ecc_dbe_vol = 0
        self.power_violation_ns = self.thermal_violation_ns = 0
        self.nvlink_crc_flit = self.nvlink_crc_data = self.nvlink_replay = self.nvlink_recovery = 0
        self.last_xid = 0
        self.xid_events.clear()
        self.clock_events.clear()


# Value of each modelled field for an entity (None = DCGM blank, sample dropped).
_Getter = Callable[[_Entity], Union[int, float, None]]
_GETTERS: dict[int, _Getter] = {
    100: lambda e: e.gpu.sm_clock,
    101: lambda e: e.gpu.mem_clock,
    140: lambda e: int(round(e.gpu.mem_temp)) if e.gpu.model.hbm else 0,
    150: lambda e: int(round(e.gpu.temp)),
    155: lambda e: e.gpu.power,
    156: lambda e: int(e.gpu.energy_mj),
    190: lambda e: 0 if e.gpu.load >= 0.02 else 8,  # PSTATE
    202: lambda e: e.gpu.pcie_replay,
    203: lambda e: e.gpu.util,
    204: lambda e: e.gpu.mem_util,
    206: lambda e: 0,
    207: lambda e: 0,
    230: lambda e: e.gpu.last_xid,
    240: lambda e: e.gpu.power_violation_ns,
    241: lambda e: e.gpu.thermal_violation_ns,
    250: lambda e: e.fb_total,
    251: lambda e: e.fb_free,
    252: lambda e: e.fb_used,
    253: lambda e: e.fb_reserved,
    254: lambda e: e.fb_used / (e.fb_total - e.fb_reserved),
    310: lambda e: e.gpu.ecc_sbe_vol,
    311: lambda e: e.gpu.ecc_dbe_vol,
    312: lambda e: e.gpu.ecc_sbe_agg,
    313: lambda e: e.gpu.ecc_dbe_agg,
    390: lambda e: e.gpu.retired_sbe,
    391: lambda e: e.gpu.retired_dbe,
    393: lambda e: e.gpu.remap_unc,
    394: lambda e: e.gpu.remap_corr,
    409: lambda e: e.gpu.nvlink_crc_flit,
    419: lambda e: e.gpu.nvlink_crc_data,
    429: lambda e: e.gpu.nvlink_replay,
    439: lambda e: e.gpu.nvlink_recovery,
    449: lambda e: e.gpu.nvlink_bw,
    1001: lambda e: e.gr,
    1002: lambda e: e.sm_active,
    1003: lambda e: e.sm_occ,
    1004: lambda e: e.tensor,
    1005: lambda e: e.dram,
    1006: lambda e: e.fp64,
    1007: lambda e: e.fp32,
    1008: lambda e: e.fp16,
    1009: lambda e: e.gpu.pcie_tx,
    1010: lambda e: e.gpu.pcie_rx,
    1011: lambda e: e.gpu.nvlink_tx,
    1012: lambda e: e.gpu.nvlink_rx,
}


class _Family(NamedTuple):
    name: str
    field: _fields.Field
    prom_type: str
    help: str


class _Series(NamedTuple):
    """One label set of an entity (one per owning pod on shared GPUs)."""

    entity: _Entity
    fixed: str  # gpu=...,UUID=...,...,Hostname=...
    labels: tuple[tuple[str, str], ...]  # CSV label fields
    attrs: tuple[tuple[str, str], ...]  # pod attributes
    inner: str  # the whole label string of a family without extra labels


# ------------------------------------------------------------------------------------------


class SimulatedNode:
    """One dcgm-exporter node. See the module docstring for what is modelled.

    ``pods``: ``None`` (no Kubernetes attribution), ``"some"`` (a seeded ~60% of the
    devices are owned), ``"all"``, or a mapping ``gpu index`` or ``(gpu index, GPU_I_ID)``
    to a pod name, :class:`Pod` or a list of them (several = a shared device).
    ``shared_pods=K`` gives every device that ``"some"``/``"all"`` owns K pods
    (time-slicing), owning every device if ``pods`` is None.
    ``fields`` are CSV names (type and help as in default-counters.csv, else from the
    field table) or ``(name, prometheus type, help)`` rows, e.g. to type a rate as counter.
    ``xid=True`` renders ``DCGM_FI_DEV_XID_ERRORS`` with ``err_code``/``err_msg``
    (dcgm-exporter >= 3.3.6) and lets XIDs happen; otherwise the value stays 0.
    """

    def __init__(
        self,
        n_gpus: int = 8,
        *,
        model: str = "NVIDIA H100 80GB HBM3",
        hostname: str | None = "gpu-node-0",
        mig_instances: int = 0,
        pods: PodPolicy = None,
        shared_pods: int = 0,
        renderer: Literal["template", "expfmt"] = "template",
        fields: Sequence[FieldSpec] | None = None,
        xid: bool = False,
        seed: int = 0,
        collect_interval: float = 30.0,
        hostname_is_pod_name: bool = False,
        driver_version: str = "550.127.05",
        legacy_empty_pod_labels: bool = False,
    ) -> None:
        if n_gpus < 1:
            raise ValueError("n_gpus must be >= 1")
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        if renderer not in ("template", "expfmt"):
            raise ValueError(f"renderer must be 'template' or 'expfmt', not {renderer!r}")
        if shared_pods < 0:
            raise ValueError("shared_pods must be >= 0")
        if collect_interval <= 0:
            raise ValueError("collect_interval must be > 0")
        self.n_gpus = n_gpus
        self.model = model
        self.spec = MODELS[model]
        self.node_name = hostname
        self.renderer = renderer
        self.xid = xid
        self.seed = seed
        self.collect_interval = float(collect_interval)
        self.hostname_is_pod_name = hostname_is_pod_name
        self.driver_version = driver_version
        self.legacy_empty_pod_labels = legacy_empty_pod_labels
        self.restarts = 0
        self._k8s = pods is not None or shared_pods > 0
        self._families, self._label_fields = self._build_families(fields if fields is not None else DEFAULT_FIELDS)

        setup = random.Random(f"dcgmrelay-sim:{seed}:node").random
        busy0 = [setup() < 0.7 for _ in range(n_gpus)]
        self._gpus = [_Gpu(i, seed, self.spec, busy0[i], xid) for i in range(n_gpus)]
        if mig_instances:
            for g in self._gpus:
                self._make_instances(g, mig_instances)
        self._assign_pods(pods, shared_pods)
        self._tick: int | None = None  # collect tick of the current state; set by the first render
        self._series_cache: list[_Series] | None = None

    # -- construction helpers ---------------------------------------------------------------

    def _build_families(self, specs: Sequence[FieldSpec]) -> tuple[list[_Family], list[_Family]]:
        metrics: list[_Family] = []
        labels: list[_Family] = []
        seen: set[str] = set()
        for spec in specs:
            if isinstance(spec, str):
                name = spec
                f = _fields.by_name(name)
                if name in _CSV_ROWS:
                    ptype, help_ = _CSV_ROWS[name]
                else:
                    ptype = "label" if f.type in ("string", "binary") else "gauge"
                    help_ = f.description.split(". ")[0].rstrip(".") + "."
            else:
                name, ptype, help_ = spec
                f = _fields.by_name(name)
            if name in seen:
                raise ValueError(f"duplicate field {name!r}")
            seen.add(name)
            if ptype not in _PROM_TYPES:
                raise ValueError(f"{name}: unknown prometheus type {ptype!r}")
            if ptype != "label" and f.type not in ("int64", "double"):
                raise ValueError(f"{name}: a {f.type} field can only be a 'label' column")
            if ptype in ("histogram", "summary") and self.renderer == "expfmt":
                raise ValueError(f"{name}: the expfmt renderer maps only counter and gauge")
            if f.id in (9003, 9004):
                raise ValueError(f"{name} is not simulated")
            (labels if ptype == "label" else metrics).append(_Family(name, f, ptype, help_))
        if self.renderer == "expfmt":
            metrics.sort(key=lambda fam: fam.name)  # the 2026 renderer sorts families by name
        else:
            metrics.sort(key=lambda fam: (fam.field.id, fam.name))  # Counter struct order: FieldID first
        labels.sort(key=lambda fam: fam.name)
        return metrics, labels

    def _make_instances(self, g: _Gpu, n: int) -> None:
        m = g.model
        if not m.mig_profiles:
            raise ValueError(f"{self.model} does not support MIG")
        slices = max(m.mig_profiles)
        if not 1 <= n <= slices:
            raise ValueError(f"{self.model} supports 1..{slices} MIG instances, not {n}")
        g_slices = max(s for s in m.mig_profiles if s * n <= slices)
        profile = m.mig_profiles[g_slices]
        mem_fraction = int(profile.split(".")[1][:-2]) / int(m.mig_profiles[slices].split(".")[1][:-2])
        fb = int(m.fb_total * mem_fraction)
        r = g.rng.random
        g.instances = []
        for _ in range(n):
            g.instances.append(_Instance(g, g.next_gi_id, profile, fb, r() < 0.7))
            g.next_gi_id += 1

    def _new_pod(self, rnd: Callable[[], float]) -> Pod:
        wl, ns, container = _WORKLOADS[int(rnd() * len(_WORKLOADS))]
        rs = "".join(_K8S_ALPHABET[int(rnd() * len(_K8S_ALPHABET))] for _ in range(10))
        sfx = "".join(_K8S_ALPHABET[int(rnd() * len(_K8S_ALPHABET))] for _ in range(5))
        return Pod(f"{wl}-{rs}-{sfx}", ns, container)

    def _assign_pods(self, policy: PodPolicy, shared: int) -> None:
        rnd = random.Random(f"dcgmrelay-sim:{self.seed}:pods").random
        entities = [e for g in self._gpus for e in g.entities()]
        per_device = max(1, shared)
        if isinstance(policy, Mapping):
            for key, spec in policy.items():
                ent = self._entity(*key) if isinstance(key, tuple) else self._entity(key, None)
                items = [spec] if isinstance(spec, (str, Pod)) else list(spec)
                ent.pods.extend(Pod(p) if isinstance(p, str) else p for p in items)
        elif policy is None and shared == 0:
            return
        else:
            if policy == "some":
                owned = [rnd() < 0.6 for _ in entities]
                if len(entities) > 1 and all(owned):
                    owned[-1] = False
                if not any(owned):
                    owned[0] = True
            elif policy in (None, "all"):
                owned = [True] * len(entities)
            else:
                raise ValueError(f"pods must be None, 'some', 'all' or a mapping, not {policy!r}")
            for ent, own in zip(entities, owned):
                if own:
                    ent.pods.extend(self._new_pod(rnd) for _ in range(per_device))
        for ent in entities:
            ent.busy = bool(ent.pods)  # a pod that got a GPU is running on it
            ent.load = ent.level if ent.busy else 0.0

    def _entity(self, gpu_index: int, gi_id: int | None) -> _Entity:
        g = self._gpu(gpu_index)
        if gi_id is None:
            if g.instances:
                raise ValueError(f"GPU {gpu_index} is in MIG mode: give a GPU_I_ID")
            return g
        for inst in g.instances:
            if inst.gi_id == gi_id:
                return inst
        raise ValueError(f"GPU {gpu_index} has no MIG instance {gi_id}")

    def _gpu(self, gpu_index: int) -> _Gpu:
        if not 0 <= gpu_index < self.n_gpus:
            raise IndexError(f"no GPU {gpu_index} (node has {self.n_gpus})")
        return self._gpus[gpu_index]

    # -- introspection ----------------------------------------------------------------------

    @property
    def hostname(self) -> str | None:
        """The Hostname label value the exporter renders now (None: omitted, like ``-n``)."""
        if self.hostname_is_pod_name:
            # os.Hostname() in a pod without NODE_NAME: the DaemonSet pod's name.
            rnd = random.Random(f"dcgmrelay-sim:{self.seed}:exporter-pod:{self.restarts}").random
            return "dcgm-exporter-" + "".join(_K8S_ALPHABET[int(rnd() * len(_K8S_ALPHABET))] for _ in range(5))
        return self.node_name

    @property
    def uuids(self) -> list[str]:
        """UUID of every GPU, by index."""
        return [g.uuid for g in self._gpus]

    @property
    def family_names(self) -> list[str]:
        """Metric families in render order (a family with no sample is left out of the body)."""
        return [f.name for f in self._families]

    def placement(self) -> dict[tuple[int, int | None], list[Pod]]:
        """Pods per rendered device ``(gpu index, GPU_I_ID or None)``; removed GPUs included."""
        return {(e.gpu.index, e.gi_id): list(e.pods) for g in self._gpus for e in g.entities()}

    def mig_instances(self, gpu_index: int) -> list[int]:
        """GPU_I_IDs of a GPU (empty: not in MIG mode)."""
        return [i.gi_id for i in self._gpu(gpu_index).instances]

    # -- events -----------------------------------------------------------------------------

    def reset_counters(self, gpu_index: int) -> None:
        """Driver reload on one GPU: energy, PCIe replays, volatile ECC, violations and
        NVLink errors restart near 0; the last XID clears."""
        self._gpu(gpu_index).reset_counters()

    def remove_gpu(self, gpu_index: int) -> None:
        """The GPU disappears from the output (fell off the bus, unbound). Its state keeps
        evolving; other GPUs keep their indices."""
        self._gpu(gpu_index).removed = True
        self._series_cache = None

    def restore_gpu(self, gpu_index: int) -> None:
        self._gpu(gpu_index).removed = False
        self._series_cache = None

    def reconfigure_mig(self, gpu_index: int, n_instances: int) -> None:
        """Recreate a GPU's MIG instances (0 = MIG off). New instances get GPU_I_IDs not
        used before on this GPU; pods on the old layout are evicted."""
        g = self._gpu(gpu_index)
        if n_instances == 0:
            g.instances = []
            g.pods = []
        else:
            g.pods = []
            self._make_instances(g, n_instances)
        self._series_cache = None

    def move_pod(self, pod_name: str, to_gpu: int, gi_id: int | None = None) -> None:
        """Move a pod to another GPU (to MIG instance ``gi_id``, by default the
        least-loaded instance of a MIG GPU)."""
        src = None
        for g in self._gpus:
            for e in g.entities():
                for p in e.pods:
                    if p.name == pod_name:
                        src, pod = e, p
        if src is None:
            raise KeyError(f"no pod {pod_name!r}")
        g = self._gpu(to_gpu)
        if gi_id is None and g.instances:
            dst: _Entity = min(g.instances, key=lambda i: len(i.pods))
        else:
            dst = self._entity(to_gpu, gi_id)
        src.pods.remove(pod)
        dst.pods.append(pod)
        self._series_cache = None

    def restart_exporter(self) -> None:
        """Restart dcgm-exporter: a new pod name (the Hostname label changes when
        ``hostname_is_pod_name``), XID last values and event windows start over; the
        counters keep their values since they come from the driver."""
        self.restarts += 1
        for g in self._gpus:
            g.last_xid = 0
            g.xid_events.clear()
            g.clock_events.clear()
        self._series_cache = None

    # -- rendering --------------------------------------------------------------------------

    def _advance(self, t: float) -> None:
        tick = math.floor(t / self.collect_interval)
        ci = self.collect_interval
        if self._tick is None:
            self._tick = tick
            for g in self._gpus:
                g.step(tick * ci, ci, self._k8s, False)
                if g.last_xid:
                    g.xid_events.append((tick * ci, g.last_xid))
            return
        if tick < self._tick:
            raise ValueError(f"time went backwards: t={t} is before the current collect tick")
        n = tick - self._tick
        walk = min(n, 120)  # long gaps: integrate counters, walk only the last ticks
        if n > walk:
            for g in self._gpus:
                g.skip((n - walk) * ci)
        for k in range(tick - walk + 1, tick + 1):
            for g in self._gpus:
                g.step(k * ci, ci, self._k8s, self.xid)
        self._tick = tick

    def _series(self) -> list[_Series]:
        if self._series_cache is not None:
            return self._series_cache
        esc = _escape_label if self.renderer == "expfmt" else (lambda v: v)
        host_key = "hostname" if self.renderer == "expfmt" else "Hostname"
        hostname = self.hostname
        out: list[_Series] = []
        for g in self._gpus:
            if g.removed:
                continue
            base = (f'gpu="{g.index}",UUID="{esc(g.uuid)}",pci_bus_id="{esc(g.pci_bus_id)}",'
                    f'device="nvidia{g.index}",modelName="{esc(self.model)}"')
            labels = tuple((fam.name, self._label_value(fam, g)) for fam in self._label_fields)
            for e in g.entities():
                fixed = base
                if e.gi_id is not None:
                    fixed += f',GPU_I_PROFILE="{esc(e.profile or "")}",GPU_I_ID="{e.gi_id}"'
                if hostname is not None:
                    fixed += f',{host_key}="{esc(hostname)}"'
                pod_attrs: list[tuple[tuple[str, str], ...]]
                if e.pods:
                    pod_attrs = [(("container", p.container), ("namespace", p.namespace), ("pod", p.name))
                                 for p in e.pods]
                elif self._k8s and self.legacy_empty_pod_labels:
                    pod_attrs = [(("container", ""), ("namespace", ""), ("pod", ""))]  # <= 3.3.5-3.4.0
                else:
                    pod_attrs = [()]
                for attrs in pod_attrs:
                    out.append(_Series(e, fixed, labels, attrs, self._join(fixed, labels, attrs)))
        self._series_cache = out
        return out

    def _join(self, fixed: str, labels: Iterable[tuple[str, str]], attrs: Iterable[tuple[str, str]]) -> str:
        esc = _escape_label if self.renderer == "expfmt" else (lambda v: v)
        rest = "".join(f',{k}="{esc(v)}"' for k, v in (*labels, *attrs))
        return fixed + rest

    def _label_value(self, fam: _Family, g: _Gpu) -> str:
        fid = fam.field.id
        static = {
            "DCGM_FI_DRIVER_VERSION": self.driver_version,
            "DCGM_FI_NVML_VERSION": "12." + self.driver_version,
            "DCGM_FI_PROCESS_NAME": "/usr/bin/dcgm-exporter",
            "DCGM_FI_CUDA_DRIVER_VERSION": "12040",
            "DCGM_FI_DEV_NAME": self.model,
            "DCGM_FI_DEV_BRAND": "NVIDIA",
            "DCGM_FI_DEV_SERIAL": g.serial,
            "DCGM_FI_DEV_UUID": g.uuid,
            "DCGM_FI_DEV_PCI_BUSID": g.pci_bus_id,
            "DCGM_FI_DEV_MINOR_NUMBER": str(g.index),
            "DCGM_FI_DEV_OEM_INFOROM_VER": "1.1",
            "DCGM_FI_DEV_ECC_INFOROM_VER": "7.0",
            "DCGM_FI_DEV_POWER_INFOROM_VER": "N/A",
            "DCGM_FI_DEV_INFOROM_IMAGE_VER": "G520.0200.00.05",
            "DCGM_FI_DEV_VBIOS_VERSION": "96.00.99.00.01",
        }
        static_by_id = {_fields.by_name(k).id: v for k, v in static.items()}
        if fid in static_by_id:
            return static_by_id[fid]
        if fam.field.type in ("binary", "unknown"):
            return _ERROR_STRING
        if fam.field.type == "string":
            return ""
        getter: _Getter = _GETTERS.get(fid, lambda e: 0)
        v = getter(g)
        return "" if v is None else self._format(fam.field.type, v)  # None: a DCGM blank

    def _format(self, ftype: str, v: int | float) -> str:
        # DCGM_FT_INT64 is rendered with %d, DCGM_FT_DOUBLE with %f (gpu_collector.go toString).
        s = str(int(v)) if ftype == "int64" else "%f" % v
        if self.renderer == "expfmt":
            return go_float(float(s))  # strconv.ParseFloat, then expfmt writeFloat
        return s

    def render(self, t: float) -> bytes:
        """The ``/metrics`` body at time ``t`` (seconds). ``t`` must not go backwards."""
        self._advance(t)
        now = (self._tick or 0) * self.collect_interval
        series = self._series()
        expfmt = self.renderer == "expfmt"
        fmt_help = _escape_help if expfmt else (lambda v: v)
        out: list[str] = []
        for fam in self._families:
            fid = fam.field.id
            ftype = fam.field.type
            getter: _Getter = _GETTERS.get(fid, lambda e: 0 if ftype == "int64" else 0.0)
            skip_mig = fid in _MIG_UNSUPPORTED
            lines: list[str] = []
            prev: _Entity | None = None
            for s in series:
                e = s.entity
                if skip_mig and e.gi_id is not None:
                    continue
                if fid in (_EXP_XID, _EXP_CLOCK):
                    lines.extend(self._exp_lines(fam.name, s, now))
                    continue
                if e is not prev:  # series of one entity are adjacent; format once
                    prev = e
                    v = getter(e)
                    val = None if v is None else self._format(ftype, v)
                if val is None:
                    continue
                if fid == 230 and self.xid:
                    code = e.gpu.last_xid
                    attrs = sorted((*s.attrs, ("err_code", str(code)),
                                    ("err_msg", XID_MESSAGES.get(code, "Unknown Error"))))
                    lines.append(f"{fam.name}{{{self._join(s.fixed, s.labels, attrs)}}} {val}\n")
                else:
                    lines.append(f"{fam.name}{{{s.inner}}} {val}\n")
            if lines:  # a family with no sample has no HELP/TYPE either
                out.append(f"# HELP {fam.name} {fmt_help(fam.help)}\n# TYPE {fam.name} {fam.prom_type}\n")
                out.extend(lines)
        return "".join(out).encode()

    def _exp_lines(self, name: str, s: _Series, now: float) -> list[str]:
        """DCGM_EXP_{XID_ERRORS,CLOCK_EVENTS}_COUNT: one sample per XID / clock event seen in
        the window, or one 0 sample with only window_size_in_ms when there was none."""
        g = s.entity.gpu
        key, events = ("xid", g.xid_events) if name.startswith("DCGM_EXP_XID") else ("clock_event", g.clock_events)
        counts: dict[str, int] = {}
        for _, ev in events:
            counts[str(ev)] = counts.get(str(ev), 0) + 1
        window = ("window_size_in_ms", str(_WINDOW_MS))
        if not counts:
            return [f"{name}{{{self._join(s.fixed, sorted((*s.labels, window)), s.attrs)}}} 0\n"]
        return [f"{name}{{{self._join(s.fixed, sorted((*s.labels, window, (key, ev))), s.attrs)}}} "
                f"{self._format('int64', n)}\n" for ev, n in sorted(counts.items(), key=lambda kv: (len(kv[0]), kv[0]))]


class ExporterServer:
    """A :class:`SimulatedNode` served like dcgm-exporter: ``GET /metrics`` on 127.0.0.1.

    Values evolve with wall-clock time since :meth:`start` (times ``speed``). Like
    dcgm-exporter it answers ``text/plain`` and, unlike it, gzip when the client asks
    (dcgm-exporter sits behind proxies that do). ``async with ExporterServer(node) as s: s.url``.
    """

    def __init__(self, node: SimulatedNode, host: str = "127.0.0.1", port: int = 0, *, speed: float = 1.0,
                 t0: float = 0.0) -> None:
        from ._http import HttpServer

        self.node = node
        self.speed = speed
        self.t0 = t0
        self.scrapes = 0
        self._started = 0.0
        self._server = HttpServer(self._handle, host, port)

    @property
    def url(self) -> str:
        """The metrics URL."""
        return f"{self._server.url}/metrics"

    async def start(self) -> "ExporterServer":
        import time

        self._started = time.monotonic()
        await self._server.start()
        return self

    async def stop(self) -> None:
        await self._server.stop()

    async def __aenter__(self) -> "ExporterServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, method: str, path: str, query: Mapping[str, list[str]], headers: Mapping[str, str],
                      body: bytes) -> tuple[int, dict[str, str], bytes]:
        import gzip
        import time

        if path == "/health":
            return 200, {"Content-Type": "text/plain"}, b"OK\n"
        if path != "/metrics":
            return 404, {"Content-Type": "text/plain"}, b"404 page not found\n"
        self.scrapes += 1
        data = self.node.render(self.t0 + (time.monotonic() - self._started) * self.speed)
        out = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}
        if "gzip" in headers.get("accept-encoding", ""):
            data = gzip.compress(data, compresslevel=1)
            out["Content-Encoding"] = "gzip"
        return 200, out, data
