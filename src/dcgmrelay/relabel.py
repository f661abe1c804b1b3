"""Prometheus relabeling (``relabel_configs`` / ``metric_relabel_configs``).

    >>> from dcgmrelay.relabel import compile_rules
    >>> rules = compile_rules([
    ...     {"source_labels": ["__name__"], "regex": "DCGM_FI_DEV_(GPU_TEMP|POWER_USAGE)", "action": "keep"},
    ...     {"action": "labeldrop", "regex": "pci_bus_id|DCGM_FI_DRIVER_VERSION"},
    ... ], path="metricRelabelConfigs")
    >>> rules.apply({"__name__": "DCGM_FI_DEV_GPU_TEMP", "gpu": "0", "pci_bus_id": "00000000:3B:00.0"})
    {'__name__': 'DCGM_FI_DEV_GPU_TEMP', 'gpu': '0'}
    >>> rules.apply({"__name__": "DCGM_FI_DEV_SM_CLOCK", "gpu": "0"}) is None     # dropped
    True

Semantics are Prometheus' (``model/relabel/relabel.go``):

* Each rule joins the values of ``source_labels`` with ``separator`` (default
  ``;``; a missing label counts as the empty string) and matches ``regex``
  (default ``(.*)``) against the *whole* string: the regex is anchored as
  Prometheus does (``^(?s:REGEX)$``, so ``.`` also matches a newline).
* ``replace`` (default action): if the regex matches, ``target_label`` (itself
  expanded) is set to ``replacement`` (default ``$1``) with ``$1``, ``${1}``,
  ``$name``, ``${name}`` group references expanded the way Go's
  ``Regexp.Expand`` does (``$1x`` is the group named ``1x``, i.e. empty; ``$$``
  is a literal ``$``; a reference to a missing group is empty). An empty result
  deletes ``target_label``; no match changes nothing.
* ``keep`` / ``drop``: drop the label set when the regex does not match / matches.
* ``keepequal`` / ``dropequal``: drop the label set when the joined source value
  differs from / equals the value of ``target_label``.
* ``hashmod``: ``target_label`` = (last 8 bytes of MD5(joined value), big-endian) mod ``modulus``.
* ``labelmap``: for every label whose *name* matches the regex, a label named
  after the expanded ``replacement`` gets its value (the original stays).
* ``labeldrop`` / ``labelkeep``: remove labels whose name matches / does not match.
* ``lowercase`` / ``uppercase``: ``target_label`` = the joined value in lower / upper case.
* Setting a label to the empty string removes it (an empty label is an absent label).

Keys may be written snake_case (Prometheus: ``source_labels``, ``target_label``)
or camelCase (prometheus-operator CRDs: ``sourceLabels``, ``targetLabel``);
action names are case-insensitive (the operator writes ``LabelDrop``). Label
names are checked against the classic Prometheus charset
(``[a-zA-Z_][a-zA-Z0-9_]*``), as remote write needs.

Regexes are Go RE2 syntax run by Python's :mod:`re`: ``(?<name>...)`` is
accepted as ``(?P<name>...)``, ``\\z`` as ``\\Z`` and leading flags ``(?i)``
apply to the whole regex. Go's ``(?U)`` and mid-pattern flag groups are refused.

Speed: :meth:`RelabelRules.apply` memoises its result per input label set (the
same series come back every scrape), so the steady-state cost is one dict
lookup. The memo is cleared when it reaches ``cache_size`` entries.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Pattern, Sequence, Tuple

from .errors import DcgmRelayError

__all__ = [
    "ACTIONS",
    "DEFAULT_CACHE_SIZE",
    "RelabelError",
    "RelabelRules",
    "Rule",
    "compile_rules",
    "expand_template",
]

#: Every action, in Prometheus' documentation order.
ACTIONS: Tuple[str, ...] = (
    "replace", "keep", "drop", "keepequal", "dropequal", "hashmod",
    "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase",
)

#: Memo entries kept per :class:`RelabelRules` before the memo is cleared.
DEFAULT_CACHE_SIZE = 100_000

_DEFAULT_REGEX = "(.*)"
_DEFAULT_SEPARATOR = ";"
_DEFAULT_REPLACEMENT = "$1"

_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Prometheus' relabelTarget: what a labelmap replacement may look like.
_RELABEL_TARGET_RE = re.compile(r"(?:(?:[a-zA-Z_]|\$(?:\{\w+\}|\w+))+\w*)+\Z")

# snake_case (Prometheus) and camelCase (prometheus-operator) spellings of each key.
_KEYS: Mapping[str, str] = {
    "source_labels": "source_labels", "sourceLabels": "source_labels",
    "separator": "separator",
    "regex": "regex",
    "modulus": "modulus",
    "target_label": "target_label", "targetLabel": "target_label",
    "replacement": "replacement",
    "action": "action",
}
_KEY_SPELLINGS: Mapping[str, Tuple[str, ...]] = {
    "source_labels": ("source_labels", "sourceLabels"),
    "target_label": ("target_label", "targetLabel"),
}


class RelabelError(DcgmRelayError, ValueError):
    """Relabel rules that cannot be compiled.

    ``problems`` lists every ``(path, message)`` found (``path`` like
    ``metricRelabelConfigs[1].regex``); ``path`` and ``message`` are the first one's.
    """

    def __init__(self, problems: Sequence[Tuple[str, str]]) -> None:
        self.problems: List[Tuple[str, str]] = list(problems)
        self.path, self.message = self.problems[0] if self.problems else ("", "invalid relabel rules")
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(f"{p}: {m}" if p else m for p, m in self.problems) or "invalid relabel rules"

    def __reduce__(self) -> Tuple[type[RelabelError], Tuple[List[Tuple[str, str]]]]:
        return (RelabelError, (self.problems,))


# ------------------------------------------------------------------------------ templates


def _extract(s: str, i: int) -> Tuple[Optional[str], int]:
    """Go ``regexp.extract``: the group name/number after a ``$`` at ``s[i:]`` and where it ends."""
    brace = i < len(s) and s[i] == "{"
    j = i + 1 if brace else i
    k = j
    while k < len(s) and (s[k].isalnum() or s[k] == "_"):
        k += 1
    if k == j:
        return None, i
    name = s[j:k]
    if brace:
        if k >= len(s) or s[k] != "}":
            return None, i
        k += 1
    return name, k


def expand_template(template: str, match: "re.Match[str]") -> str:
    """``template`` with ``$1`` / ``${1}`` / ``$name`` / ``${name}`` / ``$$`` expanded as Go's ``Regexp.Expand``."""
    if "$" not in template:
        return template
    out: List[str] = []
    i, n = 0, len(template)
    groups = match.re.groupindex
    ngroups = match.re.groups
    while i < n:
        d = template.find("$", i)
        if d < 0:
            out.append(template[i:])
            break
        out.append(template[i:d])
        i = d + 1
        if i < n and template[i] == "$":
            out.append("$")
            i += 1
            continue
        name, end = _extract(template, i)
        if name is None:
            out.append("$")  # malformed: the $ is literal text
            continue
        i = end
        num = -1
        if name.isdigit() and name.isascii() and len(name) <= 8 and not (name[0] == "0" and len(name) > 1):
            num = int(name)
        if num >= 0:
            if num <= ngroups:
                out.append(match.group(num) or "")
        else:
            if name in groups:
                out.append(match.group(name) or "")
    return "".join(out)


# ------------------------------------------------------------------------------ regexes

_LEADING_FLAGS = re.compile(r"\(\?([a-zA-Z]+)\)")


def _compile_regex(regex: str) -> Pattern[str]:
    """Go RE2 regex -> Python pattern anchored like Prometheus (``^(?s:REGEX)$``). ValueError if invalid."""
    flags = "s"
    body = regex
    m = _LEADING_FLAGS.match(body)
    if m:
        extra = m.group(1)
        bad = sorted(set(extra) - set("ims"))
        if bad:
            raise ValueError(f"unsupported regex flag(s) {''.join(bad)!r} (Python's re has i, m and s)")
        flags = "".join(sorted(set(flags + extra)))
        body = body[m.end():]
    # Go's named-group spelling (?<name>...) and end-of-text \z.
    body = re.sub(r"\(\?<(?=[A-Za-z_])", "(?P<", body)
    body = body.replace("\\z", "\\Z")
    try:
        return re.compile(f"(?{flags}:{body})")
    except re.error as exc:
        raise ValueError(f"invalid regex {regex!r}: {exc.msg}") from None


# ------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    """One compiled relabel rule (fields as in Prometheus, snake_case)."""

    action: str = "replace"
    source_labels: Tuple[str, ...] = ()
    separator: str = _DEFAULT_SEPARATOR
    regex: str = _DEFAULT_REGEX
    modulus: int = 0
    target_label: str = ""
    replacement: str = _DEFAULT_REPLACEMENT
    pattern: Pattern[str] = field(default=re.compile(r"(?s:(.*))"), repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        """Prometheus YAML form (snake_case): ``action`` plus every field that is not its default."""
        d: Dict[str, Any] = {}
        if self.source_labels:
            d["source_labels"] = list(self.source_labels)
        if self.separator != _DEFAULT_SEPARATOR:
            d["separator"] = self.separator
        if self.regex != _DEFAULT_REGEX:
            d["regex"] = self.regex
        if self.modulus:
            d["modulus"] = self.modulus
        if self.target_label:
            d["target_label"] = self.target_label
        if self.replacement != _DEFAULT_REPLACEMENT:
            d["replacement"] = self.replacement
        d["action"] = self.action
        return d


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    return type(v).__name__


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    low = {c.lower().replace("_", ""): c for c in choices}
    hit = low.get(str(word).lower().replace("_", ""))
    if hit is None:
        close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
        hit = close[0] if close else None
    return f" (did you mean {hit!r}?)" if hit else ""


def _compile_one(raw: Any, path: str, problems: List[Tuple[str, str]]) -> Optional[Rule]:
    if not isinstance(raw, Mapping):
        problems.append((path, f"a relabel rule must be a mapping, not {_type_name(raw)}"))
        return None
    n_before = len(problems)
    vals: Dict[str, Any] = {}
    given: Dict[str, str] = {}  # canonical key -> spelling used
    for key in raw:
        canon = _KEYS.get(key) if isinstance(key, str) else None
        if canon is None:
            problems.append((f"{path}.{key}", f"unknown key {str(key)!r}{_suggest(str(key), _KEYS)}; "
                                              f"allowed: {', '.join(k for k in _KEYS if '_' in k or k.islower())}"))
            continue
        if canon in given:
            problems.append((f"{path}.{key}", f"{key!r} and {given[canon]!r} are the same key; give one"))
            continue
        given[canon] = key
        vals[canon] = raw[key]

    def p(canon: str) -> str:
        return f"{path}.{given.get(canon, canon)}"

    def string(canon: str, default: str) -> str:
        v = vals.get(canon, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            problems.append((p(canon), f"expected a string, got {_type_name(v)}"))
            return default
        return str(v)

    action_raw = vals.get("action")
    action = "replace"
    action_ok = True
    if action_raw is None:
        pass
    elif not isinstance(action_raw, str):
        problems.append((p("action"), f"expected a string, got {_type_name(action_raw)}"))
        action_ok = False
    elif action_raw.lower() not in ACTIONS:
        problems.append((p("action"), f"unknown action {action_raw!r}{_suggest(action_raw.lower(), ACTIONS)}; "
                                      f"allowed: {', '.join(ACTIONS)}"))
        action_ok = False
    else:
        action = action_raw.lower()

    sources: Tuple[str, ...] = ()
    sl = vals.get("source_labels")
    if sl is not None:
        if not isinstance(sl, (list, tuple)):
            problems.append((p("source_labels"), f"expected a list of label names, got {_type_name(sl)}"))
        else:
            good = []
            for i, name in enumerate(sl):
                if not isinstance(name, str) or not _LABEL_NAME_RE.match(name):
                    shown = repr(name) if isinstance(name, str) else _type_name(name)
                    problems.append((f"{p('source_labels')}[{i}]",
                                     f"{shown} is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*)"))
                else:
                    good.append(name)
            sources = tuple(good)

    separator = string("separator", _DEFAULT_SEPARATOR)
    regex = string("regex", _DEFAULT_REGEX)
    target = string("target_label", "")
    replacement = string("replacement", _DEFAULT_REPLACEMENT)

    modulus = 0
    modulus_ok = True
    m = vals.get("modulus")
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, int):
            problems.append((p("modulus"), f"expected a positive integer, got {_type_name(m)}"))
            modulus_ok = False
        elif m < 0:
            problems.append((p("modulus"), f"expected a positive integer, got {m}"))
            modulus_ok = False
        else:
            modulus = m

    pattern = None
    try:
        pattern = _compile_regex(regex)
    except ValueError as exc:
        problems.append((p("regex"), str(exc)))

    if not action_ok:
        return None  # the action is unknown: the action-specific checks would only add noise

    # Prometheus' RelabelConfig.Validate, in its order.
    if action == "hashmod" and modulus == 0 and modulus_ok:
        problems.append((p("modulus"), "hashmod needs a non-zero modulus"))
    if action in ("replace", "hashmod", "lowercase", "uppercase", "keepequal", "dropequal") and not target:
        problems.append((p("target_label"), f"required for action {action}"))
    elif target:
        if action == "replace" and "$" not in target and not _LABEL_NAME_RE.match(target):
            problems.append((p("target_label"), f"{target!r} is not a valid label name "
                                                f"([a-zA-Z_][a-zA-Z0-9_]*, or a template with $1/${{name}})"))
        elif action in ("lowercase", "uppercase", "keepequal", "dropequal", "hashmod") \
                and not _LABEL_NAME_RE.match(target):
            problems.append((p("target_label"), f"{target!r} is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*)"))
    if action == "labelmap" and not _RELABEL_TARGET_RE.match(replacement):
        problems.append((p("replacement"), f"{replacement!r} is not a valid replacement for labelmap "
                                           "(a label name, possibly with $1/${name} references)"))
    if action in ("keepequal", "dropequal", "lowercase", "uppercase", "labeldrop", "labelkeep"):
        only = {"keepequal": "source_labels and target_label", "dropequal": "source_labels and target_label",
                "lowercase": "source_labels, separator and target_label",
                "uppercase": "source_labels, separator and target_label",
                "labeldrop": "regex", "labelkeep": "regex"}[action]
        not_default = {
            "source_labels": bool(sources) and action in ("labeldrop", "labelkeep"),
            "target_label": bool(target) and action in ("labeldrop", "labelkeep"),
            "separator": separator != _DEFAULT_SEPARATOR and action not in ("lowercase", "uppercase"),
            "regex": regex != _DEFAULT_REGEX and action in ("keepequal", "dropequal"),
            "modulus": modulus != 0 and action not in ("lowercase", "uppercase"),
            "replacement": replacement != _DEFAULT_REPLACEMENT,
        }
        for k, bad in not_default.items():
            if bad:
                problems.append((p(k), f"action {action} takes only {only}"))

    if len(problems) > n_before or pattern is None:
        return None
    return Rule(action=action, source_labels=sources, separator=separator, regex=regex, modulus=modulus,
                target_label=target, replacement=replacement, pattern=pattern)


def compile_rules(rules: Optional[Iterable[Any]], *, path: str = "relabel_configs",
                  drop_meta: bool = False, cache_size: int = DEFAULT_CACHE_SIZE) -> "RelabelRules":
    """Compile a list of relabel rule mappings (snake_case or camelCase keys).

    Every problem is collected and raised together as one :class:`RelabelError`
    whose entries name the path (``f"{path}[i].key"``) and what is wrong.
    ``drop_meta`` and ``cache_size`` are passed to :class:`RelabelRules`.
    """
    if rules is None:
        return RelabelRules((), drop_meta=drop_meta, cache_size=cache_size)
    if isinstance(rules, (str, bytes)) or isinstance(rules, Mapping) or not isinstance(rules, Iterable):
        raise RelabelError([(path, f"expected a list of relabel rules, got {_type_name(rules)}")])
    problems: List[Tuple[str, str]] = []
    out: List[Rule] = []
    for i, raw in enumerate(rules):
        if isinstance(raw, Rule):
            out.append(raw)
            continue
        rule = _compile_one(raw, f"{path}[{i}]", problems)
        if rule is not None:
            out.append(rule)
    if problems:
        raise RelabelError(problems)
    return RelabelRules(out, drop_meta=drop_meta, cache_size=cache_size)


# ------------------------------------------------------------------------------ applying

_Items = Tuple[Tuple[str, str], ...]


def _set(lb: Dict[str, str], name: str, value: str) -> None:
    if value == "":
        lb.pop(name, None)
    else:
        lb[name] = value


def _run(rules: Sequence[Rule], lb: Dict[str, str]) -> bool:
    """Apply ``rules`` to ``lb`` in place; False when the label set is dropped."""
    for r in rules:
        src = r.source_labels
        if len(src) == 1:
            val = lb.get(src[0], "")
        elif src:
            val = r.separator.join([lb.get(s, "") for s in src])
        else:
            val = ""
        action = r.action
        if action == "replace":
            m = r.pattern.fullmatch(val)
            if m is None:
                continue
            target = expand_template(r.target_label, m)
            if not _LABEL_NAME_RE.match(target):
                continue
            _set(lb, target, expand_template(r.replacement, m))
        elif action == "keep":
            if r.pattern.fullmatch(val) is None:
                return False
        elif action == "drop":
            if r.pattern.fullmatch(val) is not None:
                return False
        elif action == "keepequal":
            if lb.get(r.target_label, "") != val:
                return False
        elif action == "dropequal":
            if lb.get(r.target_label, "") == val:
                return False
        elif action == "hashmod":
            digest = hashlib.md5(val.encode("utf-8")).digest()
            lb[r.target_label] = str(int.from_bytes(digest[8:], "big") % r.modulus)
        elif action == "labelmap":
            for name, value in sorted(lb.items()):
                m = r.pattern.fullmatch(name)
                if m is not None:
                    _set(lb, expand_template(r.replacement, m), value)
        elif action == "labeldrop":
            for name in [n for n in lb if r.pattern.fullmatch(n) is not None]:
                del lb[name]
        elif action == "labelkeep":
            for name in [n for n in lb if r.pattern.fullmatch(n) is None]:
                del lb[name]
        elif action == "lowercase":
            _set(lb, r.target_label, val.lower())
        elif action == "uppercase":
            _set(lb, r.target_label, val.upper())
        else:  # pragma: no cover - compile_rules refuses other actions
            raise ValueError(f"unknown relabel action {action!r}")
    return True


class RelabelRules:
    """Compiled relabel rules; :meth:`apply` is memoised per input label set.

    ``drop_meta=True`` removes the labels starting with ``__`` after relabeling
    (``__name__`` excepted), as Prometheus does with target labels
    (``__address__``, ``__meta_*``, ``__tmp_*`` ...).
    """

    __slots__ = ("rules", "drop_meta", "cache_size", "_memo", "hits", "misses")

    def __init__(self, rules: Iterable[Rule] = (), *, drop_meta: bool = False,
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.rules: Tuple[Rule, ...] = tuple(rules)
        self.drop_meta = bool(drop_meta)
        self.cache_size = max(1, int(cache_size))
        self._memo: Dict[Tuple[bool, _Items], Optional[_Items]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"RelabelRules({len(self.rules)} rules, drop_meta={self.drop_meta})"

    def to_dicts(self) -> List[Dict[str, Any]]:
        """The rules in Prometheus YAML form (snake_case)."""
        return [r.to_dict() for r in self.rules]

    def clear_cache(self) -> None:
        """Forget every memoised result."""
        self._memo.clear()

    @property
    def cache_len(self) -> int:
        """Memoised label sets."""
        return len(self._memo)

    def apply_items(self, items: _Items, *, drop_meta: Optional[bool] = None) -> Optional[_Items]:
        """:meth:`apply` on a label tuple ``((name, value), ...)``; returns the (sorted) result tuple
        or None when dropped. The returned tuple is the memoised object: it is immutable, share it."""
        dm = self.drop_meta if drop_meta is None else bool(drop_meta)
        key = (dm, items)
        try:
            out = self._memo[key]
            self.hits += 1
            return out
        except KeyError:
            pass
        self.misses += 1
        lb = {k: v for k, v in items if v != ""}
        if not _run(self.rules, lb):
            out = None
        else:
            if dm:
                lb = {k: v for k, v in lb.items() if not k.startswith("__") or k == "__name__"}
            out = tuple(sorted(lb.items()))
        if len(self._memo) >= self.cache_size:
            self._memo.clear()
        self._memo[key] = out
        return out

    def apply(self, labels: Mapping[str, str], *, drop_meta: Optional[bool] = None) -> Optional[Dict[str, str]]:
        """The relabeled label set (a new dict, names sorted), or None if a rule dropped it.

        ``drop_meta`` overrides the instance setting for this call. Labels with an
        empty value are treated as absent (removed), as Prometheus does.
        """
        out = self.apply_items(tuple(labels.items()), drop_meta=drop_meta)
        return None if out is None else dict(out)
