"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_block():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "## Run the tests" in ci and "bash -euo pipefail -c" in ci
    assert "## Run the tests" in (ROOT / "README.md").read_text()
