"""Wall-clock of grpo-sync.py (local and on Ray) against grpo-async.py for the same number of
samples (quick start).

    python bench/sync_vs_async.py                  # 60 optimizer steps of 64 samples each
    python bench/sync_vs_async.py --steps 100 --rounds 2

Both recipes train ``--steps`` optimizer steps on rollout batches of the same size, so they see the
same number of samples; async may drop stale batches (reported). Printed: the recipes' own
``summary.json`` wall time (the training loop; evaluation is off on both sides) and the whole
process wall time, start-up included (Ray's start for async).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, run_dir: Path, a: argparse.Namespace, *extra: str) -> tuple[float, float, dict]:
    cmd = [sys.executable, str(REPO / "sota-implementations/grpo" / recipe), f"hydra.run.dir={run_dir}",
           f"train.max_steps={a.steps}", f"seed={a.seed}", "eval.before_after=false", "eval.every_n_steps=0",
           "checkpoint.every_n_steps=0", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    total = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["wall_time_s"], total, summary.get("final", {})


VARIANTS = {
    "sync (local)": ("grpo-sync.py",),
    "sync on Ray, sync_iter=true": ("grpo-sync.py", "mode.ray=true", "mode.sync_iter=true"),
    "sync on Ray, sync_iter=false": ("grpo-sync.py", "mode.ray=true", "mode.sync_iter=false"),
    "async": ("grpo-async.py", "mode=async"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-staleness", type=int, default=1)
    a = ap.parse_args()
    loops = {name: [] for name in VARIANTS}
    totals = {name: [] for name in VARIANTS}
    dropped = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for i, (name, (recipe, *extra)) in enumerate(VARIANTS.items()):
                if recipe == "grpo-async.py":
                    extra.append(f"mode.max_staleness={a.max_staleness}")
                loop, total, final = run(recipe, Path(tmp) / f"{i}_{r}", a, *extra)
                loops[name].append(loop)
                totals[name].append(total)
                if recipe == "grpo-async.py":
                    dropped.append(final.get("samples_dropped", 0))
    base = statistics.median(loops["sync (local)"])
    print(f"{a.steps} optimizer steps of the quick start, {a.rounds} round(s), async max_staleness={a.max_staleness}")
    for name in VARIANTS:
        loop = statistics.median(loops[name])
        note = f" | samples dropped {statistics.median(dropped):.0f}" if name == "async" else ""
        print(f"{name:30s}: loop {loop:6.1f} s | process {statistics.median(totals[name]):6.1f} s "
              f"| ratio to sync (loop) {loop / base:5.2f}{note}")


if __name__ == "__main__":
    main()
