"""The ``dcgmrelay`` command line.

    dcgmrelay inspect FILE|URL|-  [--json] [--csv CSV|PROFILE] [--fields F,...] [--strict] [--format F]
    dcgmrelay run --config relay.yaml | --target URL --remote-write URL --interval 15s ...
    dcgmrelay check-config FILE
    dcgmrelay demo [--gpus N] [--interval S] [--duration S]

Every subcommand is a function taking the parsed arguments and returning an exit
code; :func:`main` is importable and takes ``argv`` so tests drive it in-process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from . import fields as _fields
from ._version import __version__
from .errors import DcgmRelayError

__all__ = ["main"]

# What `inspect` accepts as a payload: a file, '-' for stdin, or an http(s) URL.
_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.8,"
           "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _read_payload(src: str, timeout: float) -> tuple[bytes, str | None]:
    """Body and Content-Type of a payload source."""
    if src.startswith(("http://", "https://")):
        import httpx

        resp = httpx.get(src, headers={"Accept": _ACCEPT}, timeout=timeout, follow_redirects=True)
        resp.raise_for_status()
        return resp.content, resp.headers.get("content-type")
    if src == "-":
        return sys.stdin.buffer.read(), None
    data = Path(src).read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: recorded payloads are stored compressed
        data = gzip.decompress(data)
    return data, None


def _short(name: str) -> str:
    for prefix in ("DCGM_FI_DEV_", "DCGM_FI_PROF_", "DCGM_FI_", "DCGM_EXP_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}"


def _entity_label(e: Any) -> str:
    if e.kind == "mig":
        return f"{e.gpu}/{e.gpu_instance}"
    return str(e.gpu if e.gpu is not None else (e.uuid or "?"))


def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return cell == "-"


def _table(rows: list[list[str]], out: TextIO) -> None:
    """Columns padded to width; numbers right-aligned, text left-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = [all(_numeric(r[i]) for r in rows[1:]) for i in range(len(widths))]
    for n, r in enumerate(rows):
        out.write("  ".join(c.rjust(w) if right[i] else c.ljust(w)
                            for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        out.write("\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _inspect_csv(spec: Any, out: TextIO) -> None:
    from .kinds import Kind

    out.write(f"collectors CSV {spec.source}: {len(spec.field_ids)} metric fields, "
              f"{len(spec.label_field_ids)} label fields\n")
    for w in spec.warnings:
        out.write(f"warning: {w}\n")
    rows = [["field", "id", "csv type", "relayed as", "help"]]
    for r in spec.rows:
        rows.append([r.name, str(r.field_id), r.prom_type, Kind(r.kind).name.lower(), r.help])
    _table(rows, out)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .scrape import Parser, format_from_content_type

    out = sys.stdout
    spec = None
    if args.csv:
        import warnings

        from .csvspec import load_csv

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # printed below from spec.warnings, once
            spec = load_csv(args.csv)
        if not args.payload:
            if args.json:
                json.dump([r._asdict() | {"kind": int(r.kind)} for r in spec.rows], out, indent=2)
                out.write("\n")
            else:
                _inspect_csv(spec, out)
            return 0
    if not args.payload:
        raise SystemExit("dcgmrelay inspect: give a payload (FILE, URL or -) and/or --csv")
    data, ctype = _read_payload(args.payload, args.timeout)
    fmt = args.format if args.format != "auto" else format_from_content_type(ctype)
    scrape = Parser(format=fmt, strict=args.strict).parse(data, source=args.payload)
    wanted = [int(f) if f.strip().isdigit() else f.strip() for f in args.fields.split(",")] if args.fields else None
    m = scrape.matrix(wanted)
    field_ids = m.field_ids
    kept = None
    if spec is not None:
        kept = spec.mask(field_ids)
    if args.json:
        doc = {
            "source": args.payload, "format": scrape.format, "samples": len(scrape),
            "series": scrape.series_count(), "errors": [e._asdict() for e in scrape.errors],
            "n_errors": scrape.n_errors,
            "entities": [
                {**e._asdict(), "fields": {
                    _fields.by_id(int(f)).exporter_name: (None if math.isnan(v) else v)
                    for f, v in zip(field_ids.tolist(), m.values[i].tolist())
                    if not math.isnan(v) and (kept is None or kept[list(field_ids).index(f)])}}
                for i, e in enumerate(m.entities)],
            "other_series": int((scrape.entity_ids < 0).sum()),
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"{args.payload}: {scrape.format}, {len(scrape)} samples, {scrape.series_count()} series, "
              f"{len(m.entities)} GPUs/MIG instances, {scrape.n_errors} rejected lines\n")
    for e in scrape.errors[:10]:
        out.write(f"  line {e.line}, column {e.column}: {e.reason}\n")
    if m.entities and len(field_ids):
        e0 = m.entities[0]
        out.write(f"model {e0.model_name or '?'}, host {e0.hostname or '?'}\n\n")
        names = [_short(_fields.by_id(int(f)).exporter_name) for f in field_ids]
        if kept is not None:
            names = [n if k else f"({n})" for n, k in zip(names, kept)]
        if len(m.entities) <= 16:  # fields down, GPUs across
            rows = [["field"] + [_entity_label(e) for e in m.entities]]
            rows += [[n] + [_fmt(v) for v in m.values[:, j]] for j, n in enumerate(names)]
        else:  # too many GPUs to go across: one row each
            rows = [["gpu", "uuid"] + names]
            rows += [[_entity_label(e), e.uuid or ""] + [_fmt(v) for v in m.values[i]]
                     for i, e in enumerate(m.entities)]
        _table(rows, out)
        if spec is not None:  # what kept was computed from
            out.write(f"\n(parenthesised fields are not in {spec.source}: the relay drops them)\n")
    other = int((scrape.entity_ids < 0).sum())
    if other:
        out.write(f"\n{other} samples about no GPU (e.g. {scrape.names[scrape.name_ids[scrape.entity_ids < 0][0]]})\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from . import config as _config
    from .app import RelayApp, configure_logging

    env = dict(os.environ)
    cfg = _config.config_from_args(args, env)
    configure_logging(cfg.logging.level, cfg.logging.format)
    for w in _config.config_warnings(cfg) + (_config.secret_file_warnings(cfg.source, cfg) if cfg.source else []):
        logging.getLogger("dcgmrelay").warning("%s", w)
    app = RelayApp(cfg, loader=lambda: _config.config_from_args(args, env),
                   shutdown_timeout_s=args.shutdown_timeout)
    return asyncio.run(app.run())


def cmd_check_config(args: argparse.Namespace) -> int:
    from . import config as _config

    cfg = _config.load_config(args.file)
    for w in _config.config_warnings(cfg) + _config.secret_file_warnings(args.file, cfg):
        print(f"warning: {w}", file=sys.stderr)
    sys.stdout.write(_config.effective_config_text(cfg))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(gpus=args.gpus, interval_s=args.interval, duration_s=args.duration, plain=args.plain)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcgmrelay", description="Relay NVIDIA dcgm-exporter metrics.")
    p.add_argument("--version", action="version", version=f"dcgmrelay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("inspect", help="show a payload as a per-GPU table, or what a collectors CSV keeps")
    pi.add_argument("payload", nargs="?", help="a /metrics body: FILE (.gz ok), http(s) URL, or - for stdin")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--csv", metavar="CSV", help="collectors CSV file or built-in profile (default, dcp, whatap, 1.x)")
    pi.add_argument("--fields", help="comma-separated field names or ids to show")
    pi.add_argument("--format", choices=("auto", "prometheus", "openmetrics"), default="auto")
    pi.add_argument("--strict", action="store_true", help="fail on the first bad line")
    pi.add_argument("--timeout", type=float, default=10.0, help="seconds, for a URL")
    pi.set_defaults(func=cmd_inspect)

    from . import config as _config

    pr = sub.add_parser("run", help="scrape targets and relay to collectors (config file and/or flags)",
                        description="Flags override DCGMRELAY_* environment variables, which override the file.")
    _config.add_run_arguments(pr)
    pr.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                    help="seconds to flush outputs on SIGTERM before spooling the rest (default 10)")
    pr.set_defaults(func=cmd_run)

    pc = sub.add_parser("check-config", help="validate a config file (or a WhatapAgent resource) and print "
                                             "the effective config, secrets redacted")
    pc.add_argument("file")
    pc.set_defaults(func=cmd_check_config)

    pd = sub.add_parser("demo", help="a simulated 8-GPU exporter, the relay and the embedded collector, "
                                     "with a live per-GPU table (no GPU or cluster needed)")
    pd.add_argument("--gpus", type=int, default=8)
    pd.add_argument("--interval", type=float, default=2.0, help="scrape interval in seconds (default 2)")
    pd.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    pd.add_argument("--plain", action="store_true", help="print tables one after another instead of redrawing")
    pd.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DcgmRelayError as e:
        print(f"dcgmrelay {args.command}: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"dcgmrelay {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
