"""``dcgmrelay demo``: the whole pipeline on one laptop, no GPU and no cluster.

A simulated busy 8-GPU dcgm-exporter serves ``/metrics`` on 127.0.0.1, the relay
scrapes it and ships the compact format to the embedded collector (also on
127.0.0.1), and the terminal shows what the collector received, per GPU, with
the counter deltas the relay computed, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from typing import Dict, List, Optional, TextIO, Tuple

from . import config as _config
from .app import RelayApp, configure_logging
from .receiver import CompactReceiver, ReceivedSample
from .simulate import ExporterServer, SimulatedNode

__all__ = ["gpu_table", "run_demo"]

_COLUMNS = [
    # (header, metric name, scale, format)
    ("util %", "DCGM_FI_DEV_GPU_UTIL", 1.0, "{:>6.0f}"),
    ("mem used GiB", "DCGM_FI_DEV_FB_USED", 1 / 1024, "{:>12.1f}"),
    ("mem free GiB", "DCGM_FI_DEV_FB_FREE", 1 / 1024, "{:>12.1f}"),
    ("temp C", "DCGM_FI_DEV_GPU_TEMP", 1.0, "{:>6.0f}"),
    ("power W", "DCGM_FI_DEV_POWER_USAGE", 1.0, "{:>7.1f}"),
    ("energy Δ J", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_delta", 1 / 1000, "{:>10.1f}"),
    ("PCIe tx MB/s", "DCGM_FI_PROF_PCIE_TX_BYTES", 1e-6, "{:>12.1f}"),
    ("XID", "DCGM_FI_DEV_XID_ERRORS", 1.0, "{:>5.0f}"),
]


def gpu_table(samples: List[ReceivedSample]) -> str:
    """The per-GPU table from a collector's latest samples ``(target, name, labels, value, ts)``."""
    rows: Dict[str, Dict[str, float]] = {}
    info: Dict[str, Tuple[str, str]] = {}  # gpu -> (model, pod)
    for _target, name, labels, value, _ts in samples:
        gpu = labels.get("gpu")
        if gpu is None:
            continue
        rows.setdefault(gpu, {})[name] = value
        info[gpu] = (labels.get("modelName", ""), labels.get("pod", ""))
    header = f"{'gpu':>3}  " + "  ".join(h for h, *_ in _COLUMNS) + "  pod"
    lines = [header, "-" * len(header)]
    for gpu in sorted(rows, key=lambda g: int(g) if g.isdigit() else 0):
        cells = []
        for head, metric, scale, fmt in _COLUMNS:
            v = rows[gpu].get(metric)
            cell = fmt.format(v * scale) if v is not None and not math.isnan(v) else "-".rjust(len(head))
            cells.append(cell.rjust(len(head)))
        lines.append(f"{gpu:>3}  " + "  ".join(cells) + f"  {info[gpu][1]}")
    return "\n".join(lines)


def _latest(rx: CompactReceiver) -> List[ReceivedSample]:
    """The newest value of each series the collector holds; counter deltas (a column of the
    compact format) appear as ``<name>_delta``."""
    newest: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], ReceivedSample] = {}
    for b in list(rx.batches):
        for nid, lid, v, d, ts in zip(b.name_ids.tolist(), b.labelset_ids.tolist(), b.values.tolist(),
                                      b.deltas.tolist(), b.timestamps.tolist()):
            labels = dict(b.labelsets[lid])
            for name, value in ((b.names[nid], v), (b.names[nid] + "_delta", d)):
                if value != value:  # NaN: no delta for this kind
                    continue
                key = (name, tuple(sorted(labels.items())))
                if key not in newest or ts >= newest[key][4]:
                    newest[key] = (b.target, name, labels, value, ts)
    return list(newest.values())


async def _main(gpus: int, interval_s: float, duration_s: Optional[float], plain: bool, out: TextIO) -> int:
    # The exporter refreshes every scrape here so the table moves (dcgm-exporter's default is 30 s).
    node = SimulatedNode(gpus, pods="some", xid=True, seed=int(time.time()) % 1000,
                         collect_interval=max(0.5, interval_s))
    rx = CompactReceiver(keep=20)
    rx.start()
    try:
        async with ExporterServer(node, speed=1.0, t0=0.0) as exporter:
            cfg = _config.config_from_args({
                "target": [exporter.url], "compact": [rx.compact_url], "interval": f"{int(interval_s * 1000)}ms",
                "timeout": f"{int(min(interval_s, 10.0) * 1000)}ms", "listen": "127.0.0.1:0", "relay_output": "both",
                "first_observation": "zero",
            }, env={})
            app = RelayApp(cfg)
            task = asyncio.create_task(app.run(install_signals=False))
            started = time.monotonic()
            tty = out.isatty() and not plain
            out.write(f"simulated dcgm-exporter {exporter.url} → dcgmrelay → embedded collector {rx.url}\n"
                      f"({gpus} × {node_model(node)}; Ctrl-C to stop)\n")
            try:
                while duration_s is None or time.monotonic() - started < duration_s:
                    await asyncio.sleep(interval_s)
                    table = gpu_table(_latest(rx))
                    st = rx.stats
                    status = (f"batches received {st.get('batches', st.get('batches_received', '?'))}, "
                              f"samples {st.get('samples', st.get('samples_received', '?'))}, "
                              f"relay self-metrics {app.url}/metrics")
                    if tty:
                        out.write("\x1b[2J\x1b[H")
                    out.write(f"{table}\n{status}\n\n")
                    out.flush()
            finally:
                app.stop()
                await task
    finally:
        rx.stop()
    return 0


def node_model(node: SimulatedNode) -> str:
    return getattr(node, "model", None) or "NVIDIA H100 80GB HBM3"


def run_demo(*, gpus: int = 8, interval_s: float = 2.0, duration_s: Optional[float] = None,
             plain: bool = False, out: Optional[TextIO] = None) -> int:
    """Run the demo until Ctrl-C (or ``duration_s``)."""
    configure_logging("warning")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(gpus, interval_s, duration_s, plain, out or sys.stdout))
    return 0

