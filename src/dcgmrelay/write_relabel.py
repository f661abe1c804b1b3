"""Per-output ``write_relabel_configs``: relabeling of relayed batches on their way to one output.

Prometheus' ``remote_write[].write_relabel_configs`` and vmagent's
``-remoteWrite.urlRelabelConfig``: one collector gets every GPU series, another only
utilisation and memory without the per-pod labels, a third everything renamed. The rules
are the relabel rules of :mod:`dcgmrelay.relabel`; they see each series as relayed
(``__name__`` plus its label set, target labels and health series included) and may drop
it or change its labels. In ``both`` output mode the encoder derives the ``<name>_delta``
companion after relabeling, so it follows its base series (dropped, renamed, relabeled
with it).

Speed: the rules run once per distinct series of a target; the results are kept per target
in sorted key arrays (``name id << 32 | label-set id`` of the batch's tables), so a steady
scrape costs numpy lookups, no Python per series. While a target's input tables stay the
same, its output tables only grow (same ids for the same series), which keeps the
encoders' per-table caches hitting. A target whose tables change starts a fresh state.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ._ids import same_ids
from .relabel import RelabelRules
from .relay import LabelSet, RelayBatch
from .scrape import Entity, _entity_of

__all__ = ["WriteRelabeler", "external_label_rules"]

logger = logging.getLogger(__name__)

_EMPTY_I32 = np.empty(0, dtype=np.int32)
_EMPTY_I64 = np.empty(0, dtype=np.int64)
#: A target state not used for this long (ms of batch time) is forgotten: the target is gone.
_FORGET_AFTER_MS = 15 * 60 * 1000


class _TargetState:
    """One target's relabel results against one pair of input tables."""

    def __init__(self, names_in: Tuple[str, ...], labelsets_in: Tuple[LabelSet, ...]) -> None:
        self.names_in = names_in
        self.labelsets_in = labelsets_in
        self.keys = _EMPTY_I64  # sorted input series keys seen so far
        self.res_nid = _EMPTY_I32  # their output name id, -1: dropped
        self.res_lid = _EMPTY_I32  # their output label-set id
        self.names: List[str] = []
        self.name_idx: Dict[str, int] = {}
        self.name_src: List[str] = []  # per output name: the input name it first came from
        self.labelsets: List[LabelSet] = []
        self.ls_idx: Dict[LabelSet, int] = {}
        self.tables: Optional[Tuple[Tuple[str, ...], Tuple[LabelSet, ...]]] = None
        self.ent_of_ls: List[int] = []  # per output label set: its entity id, -1 none
        self.entities: List[Entity] = []
        self.ent_idx: Dict[Tuple[Optional[str], ...], int] = {}
        self.last_ms = 0
        self.families: Optional[Tuple[Dict[str, Tuple[str, Optional[str], Optional[str]]], int,
                                      Dict[str, Tuple[str, Optional[str], Optional[str]]]]] = None
        # the last batch's id columns and what they resolved to (the steady scrape repeats them)
        self.last: Optional[Tuple[np.ndarray, ...]] = None

    def same_tables(self, batch: RelayBatch) -> bool:
        n, ls = batch.names, batch.labelsets
        return ((n is self.names_in or n == self.names_in)
                and (ls is self.labelsets_in or ls == self.labelsets_in))

    def out_tables(self) -> Tuple[Tuple[str, ...], Tuple[LabelSet, ...]]:
        t = self.tables
        if t is None or len(t[0]) != len(self.names) or len(t[1]) != len(self.labelsets):
            t = self.tables = (tuple(self.names), tuple(self.labelsets))
        return t

    def resolve(self, keys: np.ndarray, rules: RelabelRules) -> Tuple[np.ndarray, np.ndarray]:
        """Output (name id, label-set id) per input key; name id -1 where the rules drop it."""
        if not len(keys):
            return _EMPTY_I32, _EMPTY_I32
        pos = np.searchsorted(self.keys, keys)
        if len(self.keys):
            found = self.keys[np.minimum(pos, len(self.keys) - 1)] == keys
            missing = not bool(found.all())
        else:
            found, missing = np.zeros(len(keys), dtype=np.bool_), True
        if missing:
            new = np.unique(keys[~found])
            nid, lid = self._run_rules(new, rules)
            allk = np.concatenate((self.keys, new))
            order = np.argsort(allk, kind="stable")
            self.keys = allk[order]
            self.res_nid = np.concatenate((self.res_nid, nid))[order]
            self.res_lid = np.concatenate((self.res_lid, lid))[order]
            pos = np.searchsorted(self.keys, keys)
        return self.res_nid[pos], self.res_lid[pos]

    def _run_rules(self, keys: np.ndarray, rules: RelabelRules) -> Tuple[np.ndarray, np.ndarray]:
        # Python per *new* series only; rules.apply_items memoises per label tuple as well
        nid = np.full(len(keys), -1, dtype=np.int32)
        lid = np.zeros(len(keys), dtype=np.int32)
        names_in, labelsets_in = self.names_in, self.labelsets_in
        for i, k in enumerate(keys.tolist()):
            name = names_in[k >> 32]
            out = rules.apply_items((("__name__", name),) + tuple(labelsets_in[k & 0xFFFFFFFF]), drop_meta=False)
            if out is None:
                continue
            pairs = tuple(p for p in out if p[0] != "__name__")
            # as metric relabeling does: a rule that removes __name__ leaves the series its name
            nname = next((v for k2, v in out if k2 == "__name__"), name)
            j = self.name_idx.get(nname)
            if j is None:
                j = self.name_idx[nname] = len(self.names)
                self.names.append(nname)
                self.name_src.append(name)
            li = self.ls_idx.get(pairs)
            if li is None:
                li = self.ls_idx[pairs] = len(self.labelsets)
                self.labelsets.append(pairs)
            nid[i], lid[i] = j, li
        return nid, lid

    def entity_tables(self) -> Tuple[np.ndarray, Tuple[Entity, ...]]:
        """Entity id per output label set and the entity table, from the *output* labels
        (a label the rules removed must not travel on in the compact format's entities)."""
        for ls in self.labelsets[len(self.ent_of_ls):]:
            ent = _entity_of(dict(ls))
            if ent is None:
                self.ent_of_ls.append(-1)
                continue
            e = self.ent_idx.get(ent.key)
            if e is None:
                e = self.ent_idx[ent.key] = len(self.entities)
                self.entities.append(ent)
            self.ent_of_ls.append(e)
        return np.asarray(self.ent_of_ls, dtype=np.int32), tuple(self.entities)


class WriteRelabeler:
    """One output's ``write_relabel_configs`` (compiled), applied to each batch it gets.

    ``dropped``: samples the rules dropped so far (stale markers not counted).
    """

    def __init__(self, rules: RelabelRules, *, output: str = "") -> None:
        self.rules = rules
        self.output = output
        self.dropped = 0
        self._targets: Dict[str, _TargetState] = {}
        self._logged = False

    def apply(self, batch: RelayBatch) -> RelayBatch:
        st = self._targets.get(batch.target)
        n = len(batch)
        if st is None or not st.same_tables(batch) or len(st.keys) > 4 * (n + len(batch.stale_name_ids)) + 4096:
            st = self._targets[batch.target] = _TargetState(batch.names, batch.labelsets)
            self._forget_old(batch.timestamp_ms)
        st.last_ms = batch.timestamp_ms
        ids = (batch.name_ids, batch.labelset_ids, batch.stale_name_ids, batch.stale_labelset_ids)
        last = st.last
        if last is not None and all(same_ids(a, b) for a, b in zip(last[:4], ids)):
            nid, lid, snid, slid = last[4:8]
        else:
            keys = np.concatenate((_keys(batch.name_ids, batch.labelset_ids),
                                   _keys(batch.stale_name_ids, batch.stale_labelset_ids)))
            r_nid, r_lid = st.resolve(keys, self.rules)
            nid, lid, snid, slid = r_nid[:n], r_lid[:n], r_nid[n:], r_lid[n:]
            # copies of the inputs: a caller may reuse its arrays for the next batch
            st.last = (*(np.array(a) for a in ids), nid, lid, snid, slid)
        keep = nid >= 0
        dropped = n - int(np.count_nonzero(keep))
        if dropped:
            self.dropped += dropped
            if not self._logged:
                self._logged = True
                logger.info("output %s: write_relabel_configs drop samples (counted in "
                            "dcgmrelay_output_samples_dropped_total{reason=\"write_relabel\"})", self.output)
        names, labelsets = st.out_tables()
        skeep = snid >= 0

        def cols(a: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
            return a if not dropped else a[keep]

        def entities(st: _TargetState = st, lid: np.ndarray = lid[keep] if dropped else lid
                     ) -> Tuple[npt.NDArray[np.int32], Tuple[Entity, ...]]:
            per_ls, table = st.entity_tables()
            return (per_ls[lid] if len(lid) else _EMPTY_I32), table

        return RelayBatch(
            target=batch.target, timestamp_ms=batch.timestamp_ms, output=batch.output,
            names=names, labelsets=labelsets,
            name_ids=cols(nid), labelset_ids=cols(lid),  # type: ignore[arg-type]
            field_ids=cols(batch.field_ids), kinds=cols(batch.kinds), values=cols(batch.values),  # type: ignore[arg-type]
            deltas=cols(batch.deltas), resets=cols(batch.resets), timestamps=cols(batch.timestamps),  # type: ignore[arg-type]
            start_timestamps=cols(batch.start_timestamps), event_counts=cols(batch.event_counts),  # type: ignore[arg-type]
            stale_name_ids=snid[skeep] if not skeep.all() else snid,
            stale_labelset_ids=slid[skeep] if not skeep.all() else slid,
            stats=batch.stats, families=_families(batch, st), entities=entities,
        )

    def _forget_old(self, now_ms: int) -> None:
        for key in [k for k, s in self._targets.items() if now_ms - s.last_ms > _FORGET_AFTER_MS]:
            del self._targets[key]


def external_label_rules(labels: Mapping[str, str]) -> List[Dict[str, Any]]:
    """Prometheus' ``external_labels`` as relabel rules: each label is set on a series that
    does not have it (a series' own label wins), before the output's ``write_relabel_configs``
    -- Prometheus' order, so those rules can still drop or rewrite them."""
    return [{"source_labels": [name], "regex": "", "target_label": name,
             "replacement": value.replace("$", "$$"), "action": "replace"}  # a literal value
            for name, value in labels.items()]


def _keys(nid: np.ndarray, lid: np.ndarray) -> np.ndarray:
    return (nid.astype(np.int64) << 32) | lid.astype(np.int64)


def _families(batch: RelayBatch, st: _TargetState
              ) -> Callable[[], Dict[str, Tuple[str, Optional[str], Optional[str]]]]:
    def families() -> Dict[str, Tuple[str, Optional[str], Optional[str]]]:
        # a renamed series keeps its family's type, help and unit; the same dict while the
        # relay's is the same (the encoders skip an unchanged families dict by identity)
        src = batch.families
        c = st.families
        if c is not None and c[0] is src and c[1] == len(st.names):
            return c[2]
        out = {o: src[i] for o, i in zip(list(st.names), list(st.name_src)) if i in src}
        st.families = (src, len(st.names), out)
        return out
    return families
