"""The README opens with the two commands, and CI runs exactly its test command."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())[:2]


def test_readme_opens_with_install_demo_and_test_commands():
    install, test = readme_commands()
    assert "pip install -e \".[dev]\"" in install and install.endswith("mixer-fast demo")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = readme_commands()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
    assert ci_lines[-1] == test  # the test run is the last thing CI does, so its exit code is CI's


def test_readme_performance_table_is_generated_from_results():
    import subprocess
    import sys

    table = subprocess.run([sys.executable, str(REPO / "bench" / "results_table.py")], capture_output=True,
                           text=True, check=True).stdout.strip()
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- perf-table:start -->", 1)[1].split("<!-- perf-table:end -->", 1)[0].strip()
    assert block == table
