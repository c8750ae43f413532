"""`make bench`: run the benchmarks, then gather their reports into docs/BENCHMARKS.md.

  python -m bench.run                 # every benchmark (tens of minutes on 2 CPU cores)
  python -m bench.run balance fp8     # some of them
  python -m bench.run --collect       # only rebuild docs/BENCHMARKS.md from bench/out/*.md

Each benchmark is a module `bench.<name>` whose main() writes bench/out/<name>.md (figures + the exact command).
Numbers from these machines are noisy: every comparison is a ratio measured within one run.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import OUT

ROOT = Path(__file__).resolve().parent.parent
# order = order in docs/BENCHMARKS.md
BENCHMARKS = ["pipeline", "dropin", "cluster", "overlap", "moe_ep", "balance", "mtp_decode", "fp8_loss", "optim_state", "optim_loss", "grpo"]
HEADER = """# Benchmarks

Measured on this project's reference machine (a 2-core x86 CPU VM, torch CPU build) unless a section says otherwise.
Every figure comes with the command that reproduces it; `make bench` reruns them all (`python -m bench.run NAME` one).
These machines are noisy and shared: comparisons are ratios taken within one run, never across runs.
"""


def collect() -> Path:
    parts = [HEADER]
    for name in BENCHMARKS:
        f = OUT / f"{name}.md"
        if f.exists():
            parts.append(f.read_text())
    extra = sorted(p for p in OUT.glob("*.md") if p.stem not in BENCHMARKS)
    parts += [p.read_text() for p in extra]
    doc = ROOT / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text("\n".join(parts))
    return doc


def main() -> None:
    args = sys.argv[1:]
    if "--collect" not in args:
        names = [a for a in args if not a.startswith("-")] or BENCHMARKS
        for name in names:
            if name not in BENCHMARKS:
                sys.exit(f"bench: unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
            if not (ROOT / "bench" / f"{name}.py").exists():
                print(f"bench: {name} not present, skipped", flush=True)
                continue
            print(f"== bench.{name}", flush=True)
            r = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT)
            if r.returncode:
                sys.exit(f"bench: bench.{name} failed with status {r.returncode}")
    print(f"wrote {collect()}")


if __name__ == "__main__":
    main()
