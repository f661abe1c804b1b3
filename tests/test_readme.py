"""The README's examples stay true: its pycon blocks run as doctests from the repository root."""

from __future__ import annotations

import doctest
import os
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_pycon_blocks(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```pycon\n(.*?)```", text, re.S)
    assert blocks
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    globs: dict = {}  # later blocks continue the session of earlier ones, as a reader would
    for i, block in enumerate(blocks):
        test = parser.get_doctest(block, globs, f"README.md[pycon {i}]", "README.md", 0)
        runner.run(test, clear_globs=False)
        globs = test.globs
    assert runner.failures == 0, f"{runner.failures} README example(s) failed (see output above)"


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert first_block[0].startswith("pip install . && dcgmrelay demo")
    assert first_block[1].startswith("pip install -e '.[test]' && pytest")
    assert os.path.exists(ROOT / ".ci" / "run")


def test_readme_config_blocks_load():
    """Every ```yaml block that is a relay config (it has ``outputs:``) validates as written."""
    from dcgmrelay.config import load_config

    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if re.search(r"^outputs:", b, re.M)]
    assert blocks
    for block in blocks:
        cfg = load_config(block)  # raises ConfigError naming the path and line
        assert cfg.outputs
