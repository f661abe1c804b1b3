"""The dcgmrelay process: target sources → scraper → relay → outputs (→ spool), with self-telemetry.

    cfg = load_config("relay.yaml")           # or config_from_args(...)
    asyncio.run(RelayApp(cfg).run())

Per scrape result (one coroutine, on the event loop):

1. the target's labels (``job``, ``instance``, discovery labels) are added per label set,
   exporter labels winning (honor_labels), then its metric relabeling (per distinct series);
   more samples than the target's (job's) ``sample_limit`` (else ``global.sample_limit``) after
   it, or a series past its ``label_limit`` / ``label_name_length_limit`` /
   ``label_value_length_limit``, fail the scrape as a whole (:func:`_label_limit_problem`);
2. Prometheus-style health series (``up``, ``scrape_duration_seconds``,
   ``scrape_samples_scraped``, ``scrape_samples_post_metric_relabeling``) are appended;
3. :meth:`Relay.ingest` applies the CSV, kinds and deltas; a failed scrape carries only
   the health series, so the target's other series end with stale markers;
4. every output gets the batch; each output batches, retries and spools on its own.

Signals: SIGTERM/SIGINT stop scraping, flush every output within ``shutdown_timeout_s``
(what cannot be delivered goes to the spool), save the delta state and exit. SIGHUP
reloads the config file: targets, relabeling, CSV and relay options change in place,
the delta state is kept, and outputs whose settings changed are flushed and rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import config as _config
from . import fields
from ._http import HttpServer
from ._version import __version__
from .csvspec import load_csv
from .encode import Encoder
from .relabel import RelabelRules, compile_rules
from .relay import Relay, RelayBatch
from ._parser_py import TS_ABSENT, RawScrape
from .scrape import Scrape
from .scraper import Scraper, ScrapeResult
from .selfmetrics import SelfMetrics, output_families, relay_families, spool_families
from .spool import Spool
from .targets import ScrapeLimits, StaticTargets, Target, TargetSource, shard_targets
from .transport import Output, RetryPolicy, WriteAheadQueue, build_client_kwargs, spool_hook_for
from .write_relabel import WriteRelabeler, external_label_rules

__all__ = ["RelayApp", "configure_logging", "output_format"]

logger = logging.getLogger("dcgmrelay")


# -- logging -------------------------------------------------------------------------------------
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "plain", stream: Any = None) -> None:
    """Structured logs on stderr: ``plain`` (one line, key facts first) or ``json`` (one object per line)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("dcgmrelay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# -- outputs -------------------------------------------------------------------------------------
def output_format(oc: "_config.OutputConfig") -> Tuple[str, Optional[str]]:
    """(wire format, fallback format) of an output."""
    if oc.type == "remote-write":
        return ("remote-write-2", "remote-write-1") if oc.version == 2 else ("remote-write-1", None)
    if oc.type == "openmetrics":
        return "prometheus", None  # text import (VictoriaMetrics /api/v1/import/prometheus, Pushgateway)
    return oc.type, None


def _output_auth(oc: "_config.OutputConfig") -> Dict[str, Any]:
    if oc.bearer_token is not None:
        return {"bearer_token": oc.bearer_token}
    if oc.bearer_token_file:
        return {"bearer_token_file": oc.bearer_token_file}
    if oc.basic_auth is not None:
        b = oc.basic_auth
        return {"basic": {"username": b.username, "password": b.password, "password_file": b.password_file}
                if b.password_file else (b.username, b.password)}
    return {}


def _tls_map(tls: Any) -> Dict[str, Any]:
    if tls is None:
        return {}
    return {k: getattr(tls, k) for k in ("ca_file", "cert_file", "key_file", "insecure_skip_verify", "server_name")
            if getattr(tls, k, None) not in (None, False)}


class _OutputSlot:
    """An output with its spool and the config it was built from (to rebuild on reload)."""

    def __init__(self, oc: "_config.OutputConfig", spool_cfg: "_config.SpoolConfig",
                 external_labels: Optional[Mapping[str, str]] = None) -> None:
        self.config = oc
        self.spool: Optional[Spool] = None
        if spool_cfg.dir:
            self.spool = Spool(os.path.join(spool_cfg.dir, oc.name), max_bytes=spool_cfg.max_bytes,
                               segment_bytes=spool_cfg.segment_bytes, fsync=spool_cfg.fsync,
                               fsync_interval_s=spool_cfg.fsync_interval, name=oc.name)
        fmt, fallback = output_format(oc)
        compression = oc.compression if fmt in ("prometheus", "openmetrics") and oc.compression == "gzip" else None
        def encoder(f: str, _meta: bool = oc.send_metadata, _c: Optional[str] = compression) -> Encoder:
            return Encoder(f, send_metadata=_meta, compression=_c if f in ("prometheus", "openmetrics") else None)

        self.output = Output(
            oc.name, oc.url, fmt, encoder,
            auth=_output_auth(oc), tls=_tls_map(oc.tls), headers=dict(oc.headers), timeout_s=oc.timeout,
            max_samples_per_batch=oc.max_samples_per_batch, max_bytes_per_batch=oc.max_bytes_per_batch,
            flush_interval_s=oc.flush_interval, max_in_flight=oc.max_in_flight,
            retry=RetryPolicy(min_backoff_s=oc.retry.min_backoff, max_backoff_s=oc.retry.max_backoff,
                              budget_s=oc.retry.max_elapsed),
            spool_hook=spool_hook_for(self.spool) if self.spool is not None else None,
            fallback_fmt=fallback,
        )
        # With a spool, a stateless format is queued write-ahead: on disk before it is sent,
        # delivered in order (WriteAheadQueue). The others use the spool as an overflow.
        self.wal: Optional[WriteAheadQueue] = None
        if self.spool is not None and fmt in WriteAheadQueue.FORMATS:
            self.wal = WriteAheadQueue(self.output, self.spool)
        # global.external_labels, then the output's write_relabel_configs (Prometheus' order)
        self.external_labels = dict(external_labels or {})
        self.relabel: Optional[WriteRelabeler] = None
        rules = external_label_rules(self.external_labels) + list(oc.write_relabel_configs)
        if rules:
            self.relabel = WriteRelabeler(compile_rules(rules, path=f"outputs.{oc.name}.write_relabel_configs"),
                                          output=oc.name)

    async def submit(self, batch: RelayBatch) -> None:
        if self.relabel is not None:
            batch = self.relabel.apply(batch)
            if not len(batch) and not len(batch.stale_name_ids):
                return
        if self.wal is not None:
            await self.wal.submit(batch)
        else:
            await self.output.submit(batch)

    def dropped_samples(self) -> Dict[str, int]:
        """Samples this output did not get, by reason: its write_relabel_configs', and those of
        the batches it dropped (the relay's own drops are global)."""
        return {**self.output.stats.dropped_samples,
                "write_relabel": self.relabel.dropped if self.relabel is not None else 0}

    async def aclose(self, timeout_s: float) -> None:
        if self.wal is not None:
            await self.wal.aclose(timeout_s)
        await self.output.aclose(timeout_s)
        if self.spool is not None:
            self.spool.close()


# -- the process ---------------------------------------------------------------------------------
class RelayApp:
    """One relay process. ``await app.run()`` until :meth:`stop` (or a signal)."""

    def __init__(self, cfg: "_config.RelayConfig", *,
                 loader: Optional[Callable[[], "_config.RelayConfig"]] = None, shutdown_timeout_s: float = 10.0,
                 env: Optional[Mapping[str, str]] = None) -> None:
        """``loader`` re-reads the configuration on SIGHUP (the CLI passes one that re-reads
        the file and re-applies flags and environment)."""
        self.cfg = cfg
        self.loader = loader
        self.shutdown_timeout_s = shutdown_timeout_s
        self.env = dict(os.environ if env is None else env)
        self.metrics = SelfMetrics()
        self.spec = load_csv(cfg.csv)
        opts = cfg.relay
        self.relay = Relay(self.spec, state_path=opts.state_path, include_non_dcgm=opts.include_non_dcgm,
                           first_observation=opts.first_observation, output=opts.output,  # type: ignore[arg-type]
                           evict_after_ms=int(opts.evict_after * 1000), kind_overrides=dict(opts.kind_overrides),
                           save_every_s=30.0, passthrough_names=HEALTH_SERIES)
        self.outputs: Dict[str, _OutputSlot] = {oc.name: _OutputSlot(oc, cfg.spool, cfg.global_external_labels)
                                                 for oc in cfg.outputs}
        self.scraper = Scraper(self._on_result, client_factory=self._scrape_client,
                               body_limit_bytes=cfg.global_body_size_limit)
        self._sources: List[TargetSource] = []
        self._source_targets: Dict[int, List[Target]] = {}
        self._source_tasks: List[asyncio.Task[None]] = []
        # per target: its metric_relabel_configs and their compiled rules
        self._relabel: Dict[str, Tuple[Any, RelabelRules]] = {}
        self._limits: Dict[str, Tuple[Target, ScrapeLimits]] = {}
        self._limit_memo: Dict[str, Dict[str, Any]] = {}  # per target: _label_limit_problem's
        # failing targets -> the kind of their failure (the reason up to its first colon: "HTTP
        # 503", "ConnectError", "sample limit 5000 exceeded"): logged once per target and kind,
        # until it answers again
        self._down: Dict[str, str] = {}
        self._logged_errors: Dict[str, str] = {}
        # per target: the label sets with the target's labels, reused while the exporter's
        # label sets stay the same (Scrape.with_labels' memo)
        self._label_memo: Dict[str, Dict[str, Any]] = {}
        # asyncio objects are made in run(), on its loop: on Python 3.9 an Event made here binds
        # the loop that get_event_loop() returns now, not the one asyncio.run() starts
        self._stop: Optional[asyncio.Event] = None
        self._stop_requested = False
        self._ready = False
        self._server: Optional[HttpServer] = None
        self._replay_task: Optional[asyncio.Task[None]] = None
        self._outputs_rebuilt: Optional[asyncio.Event] = None  # the replay loop waits on it while no output spools
        self._output_retry: Optional[asyncio.Task[None]] = None  # outputs a reload could not start
        self.batches_submitted = 0
        #: samples of scrapes failed by the sample limit (dcgmrelay_samples_dropped{reason="sample_limit"})
        self.sample_limit_dropped = 0
        #: samples of scrapes failed by a label limit (label_limit, label_name_length_limit,
        #: label_value_length_limit: dcgmrelay_samples_dropped{reason="label_limit"})
        self.label_limit_dropped = 0
        self.metrics.add_source("relay", lambda: relay_families(
            {**self.relay.stats.as_dict(), "dropped_sample_limit": self.sample_limit_dropped,
             "dropped_label_limit": self.label_limit_dropped}, self.relay.series_count()))
        self.metrics.add_source("outputs", lambda: output_families(
            {n: {**s.output.stats.as_dict(), "dropped_samples": s.dropped_samples()} for n, s in self.outputs.items()}))
        self.metrics.add_source("spools", lambda: spool_families(
            {n: self._spool_stats(s.spool) for n, s in self.outputs.items() if s.spool is not None}))

    # -- public ----------------------------------------------------------------------------------
    @property
    def url(self) -> Optional[str]:
        """The self-telemetry base URL once listening."""
        return self._server.url if self._server else None

    def stop(self) -> None:
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped; returns the exit code."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        self._outputs_rebuilt = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        host, _, port = self.cfg.listen.rpartition(":")
        self._server = HttpServer(self._handle_http, host.strip("[]") or "127.0.0.1", int(port or 0))
        await self._server.start()
        logger.info("dcgmrelay %s listening on %s; %d output(s), CSV %s (%d fields)", __version__,
                    self._server.url, len(self.outputs), self.spec.source, len(self.spec.field_ids))
        self._start_sources()
        self._replay_task = asyncio.create_task(self._replay_loop(), name="spool replay")
        self._ready = True
        await self._stop.wait()
        await self._shutdown()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    async def reload(self) -> bool:
        """Re-read the config file (SIGHUP). Keeps the delta state; False if the new config is bad."""
        if self.loader is None:
            logger.warning("SIGHUP: nothing to reload from")
            return False
        try:
            cfg = self.loader()
            spec = load_csv(cfg.csv)
            # Built (not started) before anything running is touched: what only shows here
            # (a credentials_env not set, a password_file or token file not readable) must
            # leave the running targets as they are, not stopped with nothing in their place.
            sources = self._build_sources(cfg)
            if cfg.spool.dir and cfg.spool != self.cfg.spool:  # every output is rebuilt on it
                os.makedirs(cfg.spool.dir, exist_ok=True)
        except Exception as e:  # keep running on the old config
            self.metrics.config_reloads.labels("failed").inc()
            logger.error("config reload failed, keeping the running config: %s", e)
            return False
        opts = cfg.relay
        self.relay.reconfigure(spec=spec, include_non_dcgm=opts.include_non_dcgm,
                               first_observation=opts.first_observation,  # type: ignore[arg-type]
                               output=opts.output,  # type: ignore[arg-type]
                               evict_after_ms=int(opts.evict_after * 1000), kind_overrides=dict(opts.kind_overrides))
        self.spec = spec
        wanted = {oc.name: oc for oc in cfg.outputs}
        for name in list(self.outputs):
            if (name not in wanted or wanted[name] != self.outputs[name].config or cfg.spool != self.cfg.spool
                    or dict(cfg.global_external_labels) != self.outputs[name].external_labels):
                await self.outputs.pop(name).aclose(self.shutdown_timeout_s)
        self._stop_output_retry()
        not_started = []
        for name, oc in wanted.items():
            if name not in self.outputs:
                try:  # an output that cannot start (spool dir, TLS files) must not stop the reload
                    self.outputs[name] = _OutputSlot(oc, cfg.spool, cfg.global_external_labels)
                except Exception as e:
                    not_started.append(name)
                    logger.error("config reload: output %s not started (retried every %.0f s until it starts "
                                 "or the next reload): %s", name, OUTPUT_RETRY_S, e)
        if self._outputs_rebuilt is not None:
            self._outputs_rebuilt.set()
        if not_started:
            self._output_retry = asyncio.create_task(
                self._retry_outputs([wanted[n] for n in not_started], cfg), name="output retry")
        self.cfg = cfg
        self.scraper.body_limit_bytes = cfg.global_body_size_limit
        self._relabel.clear()
        self._limits.clear()  # global limits may have changed
        await self._stop_sources()
        self._start_sources(sources)
        if not_started:
            self.metrics.config_reloads.labels("failed").inc()
            logger.error("config reloaded (%s) without output(s) %s", cfg.source or "flags", ", ".join(not_started))
            return False
        self.metrics.config_reloads.labels("ok").inc()
        logger.info("config reloaded (%s)", cfg.source or "flags")
        return True

    async def _retry_outputs(self, configs: List["_config.OutputConfig"], cfg: "_config.RelayConfig") -> None:
        """Start the outputs a reload could not (a spool directory in the way, a TLS file not
        there yet), every OUTPUT_RETRY_S, until each starts; the next reload cancels this."""
        pending = list(configs)
        while pending:
            await asyncio.sleep(OUTPUT_RETRY_S)
            for oc in list(pending):
                try:
                    slot = _OutputSlot(oc, cfg.spool, cfg.global_external_labels)
                except Exception:
                    continue  # logged at the reload; still failing
                pending.remove(oc)
                self.outputs[oc.name] = slot
                if self._outputs_rebuilt is not None:
                    self._outputs_rebuilt.set()
                logger.info("output %s started", oc.name)

    def _stop_output_retry(self) -> None:
        if self._output_retry is not None:
            self._output_retry.cancel()
            self._output_retry = None

    # -- targets ---------------------------------------------------------------------------------
    def _build_sources(self, cfg: "_config.RelayConfig") -> List[TargetSource]:
        sources: List[TargetSource] = []
        static = _config.static_targets(cfg, self.env)
        if static:
            sources.append(StaticTargets(static))
        if cfg.pod_monitors:
            from .discovery.kubernetes import KubeCredentials, PodMonitorDiscovery, resolve_node_name

            k = cfg.kubernetes
            creds = KubeCredentials.resolve(k.api_url, k.token_file, k.ca_file, k.insecure_skip_verify or None,
                                            env=self.env)
            sources.append(PodMonitorDiscovery(_config.pod_monitor_dicts(cfg), creds,
                                               node_name=resolve_node_name(k.node_name, self.env),
                                               default_interval_s=cfg.global_interval))
        return sources

    def _start_sources(self, sources: Optional[List[TargetSource]] = None) -> None:
        self._sources = self._build_sources(self.cfg) if sources is None else sources
        self._source_targets = {}
        for i, src in enumerate(self._sources):
            self._source_tasks.append(asyncio.create_task(self._follow(i, src), name=f"targets {i}"))
        if not self._sources:
            logger.warning("no targets configured")

    async def _stop_sources(self) -> None:
        for t in self._source_tasks:
            t.cancel()
        for t in self._source_tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._source_tasks.clear()
        for src in self._sources:
            with contextlib.suppress(Exception):
                await src.aclose()

    async def _follow(self, index: int, source: TargetSource) -> None:
        try:
            async for targets in source.updates():
                self._source_targets[index] = list(targets)
                await self._apply_targets()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.error("target source %s failed: %s", type(source).__name__, e)

    async def _apply_targets(self) -> None:
        all_targets = [t for ts in self._source_targets.values() for t in ts]
        if self.cfg.shard is not None:
            i, n = self.cfg.shard
            all_targets = shard_targets(all_targets, i, n)
        before = {t.key for t in self.scraper.targets}
        started, stopped = self.scraper.update(all_targets)
        now_ms = int(time.time() * 1000)
        for key in before - {t.key for t in all_targets}:  # gone: end its series now
            await self._submit(self.relay.target_down(key, now_ms))
            self.relay.forget(key)
            self.metrics.forget_target(key)
            self._relabel.pop(key, None)
            self._label_memo.pop(key, None)
            self._limit_memo.pop(key, None)
            self._limits.pop(key, None)
            self._logged_errors.pop(key, None)
            self._down.pop(key, None)
        self.metrics.targets.labels("all").set(len(all_targets))
        if started or stopped:
            logger.info("targets: %d (+%d, -%d)", len(all_targets), started, stopped)

    def _scrape_client(self, target: Target) -> Any:
        import httpx

        return httpx.AsyncClient(trust_env=False, **build_client_kwargs(target.auth, target.tls, None,
                                                                          target.timeout_s))

    # -- the pipeline ----------------------------------------------------------------------------
    def _rules(self, target: Target) -> Optional[RelabelRules]:
        if not target.metric_relabel:
            return None
        spec = target.metric_relabel
        cached = self._relabel.get(target.key)
        # recompiled when the target's rules change (a reload, an edited PodMonitor)
        if cached is None or (cached[0] is not spec and cached[0] != spec):
            cached = self._relabel[target.key] = (spec, compile_rules(
                list(spec), path=f"{target.job}.metric_relabel_configs"))
        return cached[1]

    async def _on_result(self, r: ScrapeResult) -> None:
        key = r.target.key
        m = self.metrics
        labels = dict(r.target.labels)
        scraped = post = 0
        scrape = None
        up, error = r.up, r.error
        t0 = time.perf_counter()
        if r.up:
            assert r.scrape is not None
            scrape = r.scrape
            scraped = len(scrape)
            if scrape.n_errors:
                m.target(key).rejected_lines += scrape.n_errors
                first = scrape.errors[0]
                if self._logged_errors.get(key) != first.reason:  # once per target and reason
                    self._logged_errors[key] = first.reason
                    logger.warning("%s: %d line(s) rejected, first at line %d, column %d: %s", key,
                                   scrape.n_errors, first.line, first.column, first.reason)
            memo = self._label_memo.get(key)
            if memo is None:
                memo = self._label_memo[key] = {}
            scrape = scrape.with_labels(labels, memo=memo)
            rules = self._rules(r.target)
            if rules is not None:
                scrape = scrape.relabeled(rules)
            post = len(scrape)
            # the job's limits where it sets them, else the global ones (0: none); resolved
            # once per target object and config, not per scrape
            lim = self._limits.get(key)
            if lim is None or lim[0] is not r.target:
                lim = self._limits[key] = (r.target, r.target.limits.over(self.cfg.global_limits))
            limits = lim[1]
            limit = limits.sample_limit
            if limit and post > limit:  # Prometheus' sample_limit: the whole scrape fails
                up, scrape = False, None
                error = f"sample limit {limit} exceeded: {post} samples after metric relabeling"
                self.sample_limit_dropped += post
            elif limits.label_limit or limits.label_name_length_limit or limits.label_value_length_limit:
                memo = self._limit_memo.get(key)
                if memo is None:
                    memo = self._limit_memo[key] = {}
                problem = _label_limit_problem(scrape, limits, memo)
                if problem is not None:  # Prometheus' label limits: the whole scrape fails too
                    up, scrape, error = False, None, problem
                    self.label_limit_dropped += post
        m.scraped(key, up, r.duration_s, r.timestamp_ms / 1000)
        if up:
            self._down.pop(key, None)
        else:
            kind = (error or "").split(":", 1)[0]
            if self._down.get(key) != kind:  # a timeout becoming a 503, a refusal a limit: said again
                self._down[key] = kind
                logger.warning("%s: scrape failed: %s", key, error)
        # The health series travel in the same batch (one request per scrape). A failed scrape
        # sends only them: every other series of the target is then absent and goes stale.
        health = _health_scrape(labels, up, r.duration_s, scraped, post)
        batch = self.relay.ingest(health if scrape is None else scrape.extended(health), target=key,
                                  timestamp_ms=r.timestamp_ms)
        m.relay_seconds.inc(time.perf_counter() - t0)
        await self._submit(batch)

    async def _submit(self, batch: RelayBatch) -> None:
        if not len(batch) and not len(batch.stale_name_ids):
            return
        self.batches_submitted += 1
        for slot in list(self.outputs.values()):
            await slot.submit(batch)

    async def _replay_loop(self) -> None:
        """Drain each output's spool, oldest first, whenever that output can deliver again."""
        while True:
            if not any(slot.spool is not None for slot in self.outputs.values()):
                # nothing can be spooled (no spool configured): no wake-up a second for nothing,
                # until a reload builds outputs again
                assert self._outputs_rebuilt is not None  # made by run(), which starts this loop
                self._outputs_rebuilt.clear()
                await self._outputs_rebuilt.wait()
                continue
            await asyncio.sleep(1.0)
            for slot in list(self.outputs.values()):
                if slot.wal is not None:
                    if len(slot.wal.spool):
                        slot.wal.kick()  # it delivers on its own; this wakes it for a past run's records
                elif slot.spool is not None and len(slot.spool):
                    try:
                        res = await slot.output.replay_spool(slot.spool, max_attempts=1)
                    except Exception as e:  # never let replay kill the process
                        logger.warning("spool replay for %s failed: %s", slot.config.name, e)
                        continue
                    if res.sent:
                        logger.info("%s: replayed %d spooled batch(es), %d pending", slot.config.name,
                                    res.sent, len(slot.spool))

    @staticmethod
    def _spool_stats(spool: Optional[Spool]) -> Dict[str, Any]:
        if spool is None or spool.closed:
            return {}
        st = dict(vars(spool.stats))
        st.update(pending_records=len(spool), pending_bytes=spool.pending_bytes, oldest_age_s=spool.oldest_age_s())
        return st

    # -- self-telemetry --------------------------------------------------------------------------
    async def _handle_http(self, method: str, path: str, query: Any, headers: Mapping[str, str],
                           body: bytes) -> Tuple[int, Mapping[str, str], bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if path == "/metrics":
            return 200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(self.metrics.registry)
        if path == "/healthz":
            return 200, {"Content-Type": "text/plain"}, b"ok\n"
        if path == "/readyz":
            ok = self._ready and not self._stop_requested
            return (200 if ok else 503), {"Content-Type": "text/plain"}, b"ready\n" if ok else b"not ready\n"
        return 404, {"Content-Type": "text/plain"}, b"not found\n"

    # -- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout_s
        self._ready = False
        logger.info("stopping: flushing %d output(s) (at most %.0fs)", len(self.outputs), self.shutdown_timeout_s)
        await self._stop_sources()
        await self.scraper.aclose()
        self._stop_output_retry()
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        remaining = max(0.5, deadline - time.monotonic())
        await asyncio.gather(*(s.aclose(remaining) for s in self.outputs.values()), return_exceptions=True)
        with contextlib.suppress(Exception):
            self.relay.save()
        if self._server is not None:
            await self._server.stop()
        logger.info("stopped")


#: Seconds between attempts to start an output a reload could not start.
OUTPUT_RETRY_S = 5.0

#: Prometheus' synthetic per-target series, relayed with the target's samples.
HEALTH_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling")


_HEALTH_NAMES = HEALTH_SERIES
_HEALTH_IDS = np.arange(4, dtype=np.int32)
_HEALTH_LS = np.zeros(4, dtype=np.int32)
_HEALTH_TS = np.full(4, TS_ABSENT, dtype=np.int64)
_HEALTH_FIELD_IDS = np.array([fields.id_of(n) for n in HEALTH_SERIES], dtype=np.int32)  # not DCGM fields: -1


@functools.lru_cache(maxsize=4096)
def _health_labelsets(items: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[Tuple[str, str], ...]]:
    return (tuple(sorted(items)),)


def _health_scrape(labels: Mapping[str, str], up: bool, duration_s: float, scraped: int, post: int) -> Scrape:
    """Prometheus' synthetic per-target series (untyped, the target's labels): the tables are
    the same every scrape, only the four values are new."""
    values = np.array([1.0 if up else 0.0, duration_s, scraped, post], dtype=np.float64)
    labelsets = _health_labelsets(tuple(labels.items()))
    raw = RawScrape(values, _HEALTH_TS, _HEALTH_IDS, _HEALTH_LS, _HEALTH_NAMES, labelsets, {}, (), 0, 0)
    return Scrape(raw, format="prometheus", tables=(_HEALTH_NAMES, labelsets, _HEALTH_FIELD_IDS))

# -- label limits ----------------------------------------------------------------------------------
def _nbytes(s: str) -> int:
    """Length in UTF-8 bytes, as Prometheus (Go's ``len``) measures names and values."""
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _shown(s: str) -> str:
    """A name or value for a log line: at most 50 characters (Prometheus' ``%.50s``)."""
    return repr(s if len(s) <= 50 else s[:50] + "...")


def _labelset_problem(pairs: Tuple[Tuple[str, str], ...], label_limit: int, name_limit: int,
                      value_limit: int) -> Optional[Tuple[str, str, int]]:
    """What of a label set breaks a limit: ``("count", "", labels)``, ``("name", label, bytes)``
    or ``("value", label, bytes)``; None if nothing.

    The labels are those the series is sent with: a label with an empty value is no label
    and a repeated name counts once (the encoders drop both, Prometheus treats them so);
    ``__name__`` (the metric name, not in the label set) is one more. Prometheus'
    ``verifyLabelLimits`` counts ``lset.Len()`` of the series with its ``__name__``, and checks
    the length of every label's name and value, ``__name__``'s included; so does this (the
    name's part is in :func:`_label_limit_problem`)."""
    seen = set()
    for k, v in pairs:
        if v == "" or k == "__name__" or k in seen:
            continue
        seen.add(k)
        if name_limit and _nbytes(k) > name_limit:
            return ("name", k, _nbytes(k))
        if value_limit and _nbytes(v) > value_limit:
            return ("value", k, _nbytes(v))
    if label_limit and len(seen) + 1 > label_limit:
        return ("count", "", len(seen) + 1)
    return None


def _label_limit_problem(scrape: Scrape, limits: ScrapeLimits, memo: Dict[str, Any]) -> Optional[str]:
    """Why ``scrape`` (after metric relabeling, with the target's labels) breaks the
    ``label_limit`` / ``label_name_length_limit`` / ``label_value_length_limit`` of ``limits``
    (0 or None: none), naming a series and the label; None when it does not.

    Checked per distinct label set and per distinct metric name, never per sample: a table
    entry's verdict is kept in ``memo`` (one per target) while the tables and limits stay the
    same, as they do from one scrape of an exporter to the next; only the entries some sample
    uses count (numpy ``bincount`` over the id columns)."""
    n = len(scrape)
    if not n:
        return None
    ll = limits.label_limit or 0
    nl = limits.label_name_length_limit or 0
    vl = limits.label_value_length_limit or 0
    key = (ll, nl, vl)
    if nl and nl < len("__name__"):  # every series has one (Prometheus checks it as any label)
        name = scrape.names[int(scrape.name_ids[0])]
        return (f"label name length limit {nl} exceeded: series {_shown(name)} has label name '__name__' "
                f"({len('__name__')} bytes)")
    if memo.get("limits") == key and memo.get("labelsets") == scrape.labelsets:
        bad_ls: Dict[int, Tuple[str, str, int]] = memo["bad_ls"]
    else:
        bad_ls = {}
        for lid, pairs in enumerate(scrape.labelsets):
            why = _labelset_problem(pairs, ll, nl, vl)
            if why is not None:
                bad_ls[lid] = why
        memo.update(limits=key, labelsets=scrape.labelsets, bad_ls=bad_ls)
    if bad_ls:
        used = np.bincount(scrape.labelset_ids, minlength=len(scrape.labelsets))
        for lid, (what, label, size) in bad_ls.items():
            if not used[lid]:
                continue
            first = int(np.flatnonzero(scrape.labelset_ids == lid)[0])
            name = _shown(scrape.names[int(scrape.name_ids[first])])
            if what == "count":
                return f"label limit {ll} exceeded: series {name} has {size} labels (__name__ counted)"
            if what == "name":
                return f"label name length limit {nl} exceeded: series {name} has label name {_shown(label)} " \
                       f"({size} bytes)"
            return f"label value length limit {vl} exceeded: series {name} label {_shown(label)} has a value " \
                   f"of {size} bytes"
    if vl:  # __name__'s value: the metric name
        if memo.get("vl") == vl and memo.get("names") == scrape.names:
            bad_names: List[int] = memo["bad_names"]
        else:
            bad_names = [i for i, nm in enumerate(scrape.names) if _nbytes(nm) > vl]
            memo.update(vl=vl, names=scrape.names, bad_names=bad_names)
        if bad_names:
            used_n = np.bincount(scrape.name_ids, minlength=len(scrape.names))
            for i in bad_names:
                if used_n[i]:
                    name = scrape.names[i]
                    return (f"label value length limit {vl} exceeded: series {_shown(name)} label '__name__' "
                            f"has a value of {_nbytes(name)} bytes")
    return None
