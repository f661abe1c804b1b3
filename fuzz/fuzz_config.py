"""Fuzz the configuration loader (``config.load_config`` on YAML bytes: the native schema
and the WhatapAgent resource).

    python fuzz/run.py config --seconds 3600        # see fuzz/README.md

For any bytes:

* ``load_config`` raises only ``ConfigError``, with at least one problem, each with a
  line inside the input when it has one (counted as YAML does: a lone ``\r``, NEL, LS and
  PS end lines too) and a 1-based column;
* a configuration that loads is what it says it is: ``config_to_dict(cfg,
  reveal_secrets=True)`` loads back into an equal configuration (the documented round
  trip), ``effective_config_text`` is YAML, ``check_complete`` raises only ``ConfigError``,
  ``config_warnings`` works.

The loader only checks that files named in a configuration exist; it reads none, so the
harness touches no file but the ones the fuzzer names in ``csv:`` (checked for existence).
"""

from __future__ import annotations

import sys

from _harness import check_position, fuzz, instrumented, quiet_warnings, yaml_line_count

with instrumented(__name__ == "__main__"):
    import yaml

    from dcgmrelay.config import (
        ConfigError,
        check_complete,
        config_to_dict,
        config_warnings,
        effective_config_text,
        load_config,
    )



def _check_error(e: ConfigError, data: bytes) -> None:
    assert e.problems, "a ConfigError without problems"
    lines = yaml_line_count(data)  # YAML's line numbers: a lone \r, NEL, LS, PS end lines too
    for p in e.problems:
        check_position(f"ConfigError {p.path}: {p.message}", p.line, p.column, data, lines=lines)
    str(e)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    with quiet_warnings():
        try:
            cfg = load_config(data)
        except ConfigError as e:
            _check_error(e, data)
            return
        full = config_to_dict(cfg, reveal_secrets=True)
        again = load_config(full)
        assert again == cfg, "config_to_dict(reveal_secrets=True) does not load back into the same configuration"
        assert config_to_dict(again, reveal_secrets=True) == full
        yaml.safe_load(effective_config_text(cfg))
        try:
            check_complete(cfg)
        except ConfigError as e:
            assert e.problems
        config_warnings(cfg)


if __name__ == "__main__":
    fuzz(TestOneInput, sys.argv)
