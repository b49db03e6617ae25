"""The README's performance table, generated from the committed results under bench/results/.

    python bench/results_table.py                  print the table (markdown)
    python bench/results_table.py --write-readme   replace the table between the README's markers

Only figures in a results folder (bench.json from bench/gpu_suite.sh, with its env.txt) are shown; the
table is never typed by hand (tests/test_readme.py checks the README holds exactly this output).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def table() -> str:
    rows = []
    for bench in sorted(RESULTS.glob("*/bench.json")):
        data = json.loads(bench.read_text())
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            rows.append((bench.parent.name, info.get("device", "?"), info.get("op"), info.get("config"),
                         info.get("batch"), info.get("dtype"), info.get("mode"), info.get("provider"),
                         b["stats"]["min"] * 1e3, info.get("tflops", 0.0)))
    if not rows:
        return "No GPU results have been committed yet: no GPU figure is quoted."
    lines = ["| results | device | op | config | batch | dtype | mode | provider | ms (min) | TFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in r[:8]) + f" | {r[8]:.3f} | {r[9]:.1f} |")
    return "\n".join(lines)


def write_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true")
    if parser.parse_args().write_readme:
        write_readme()
    else:
        print(table())
    sys.exit(0)
