"""Run every scripts/bench_*.py and write one markdown table of their figures (ratios and targets).

    python scripts/bench_all.py [--output bench_results.md] [--only convert,infer]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def figures(output: str) -> list[str]:
    """The lines a benchmark states its result in."""
    keep = [line.strip() for line in output.splitlines()
            if any(word in line for word in ("ratio", "target", " / ", "x ("))]
    return keep or [line.strip() for line in output.splitlines()[-3:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_results.md")
    parser.add_argument("--only", default="", help="comma-separated names, e.g. convert,infer")
    args = parser.parse_args()
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    rows = []
    for script in sorted(SCRIPTS.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        if script.name == Path(__file__).name or (wanted and name not in wanted):
            continue
        print(f"running {script.name} ...", flush=True)
        began = time.perf_counter()
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=SCRIPTS.parent)
        seconds = time.perf_counter() - began
        lines = figures(done.stdout) if done.returncode == 0 else [f"FAILED (exit {done.returncode}): "
                                                                    f"{done.stderr.strip().splitlines()[-1:]}"]
        rows.append((script.name, seconds, lines))
        for line in lines:
            print(f"  {line}")
    table = ["| benchmark | figures | run time |", "| --- | --- | --- |"]
    table += [f"| `{name}` | {'<br>'.join(lines)} | {seconds:.0f} s |" for name, seconds, lines in rows]
    Path(args.output).write_text("\n".join(table) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
