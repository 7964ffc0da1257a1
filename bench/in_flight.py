"""Async mode with vLLM collectors: weight updates between batches against in-flight updates
(``mode.in_flight_updates=true``), on the quick start.

    python bench/in_flight.py                        # 20 optimizer steps, 2 rounds
    python bench/in_flight.py --steps 40 --rounds 3 --chunk 4

Both variants run ``grpo-async.py`` with ``inference_model.backend=vllm`` and one collector, the
trainer pushing weights after every optimizer step; rounds alternate (between-batches, in-flight,
...) so machine noise hits both. Printed per variant (medians over rounds): the training loop's wall
time (``summary.json``) and samples/s, the collector's idle time per batch (``collector/idle_s``:
blocked on the full queue), the mean policy age of trained samples (``staleness/mean``), samples
dropped as too stale, and the share of tokens sampled by weights newer than their batch's first
(in flight only).
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
VARIANTS = {"between batches": False, "in flight": True}


def run(run_dir: Path, a: argparse.Namespace, in_flight: bool) -> dict[str, float]:
    cmd = [sys.executable, str(REPO / "sota-implementations/grpo/grpo-async.py"), "mode=async",
           f"hydra.run.dir={run_dir}", f"train.max_steps={a.steps}", "inference_model.backend=vllm",
           "mode.weight_sync=collective", f"mode.max_staleness={a.max_staleness}", "mode.num_collectors=1",
           f"generation.max_new_tokens={a.max_new_tokens}", "eval.before_after=false", "eval.every_n_steps=0",
           "checkpoint.every_n_steps=0"]
    if in_flight:
        cmd += ["mode.in_flight_updates=true", f"mode.in_flight_chunk_tokens={a.chunk}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    total = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "reward/mean" in r]
    from omegaconf import OmegaConf

    samples = a.steps * OmegaConf.load(run_dir / ".hydra" / "config.yaml").train.optim_batch_size

    def mean(key: str) -> float:
        values = [r[key] for r in train if key in r]
        return statistics.fmean(values) if values else float("nan")

    return {"loop_s": summary["wall_time_s"], "process_s": total, "samples_per_s": samples / summary["wall_time_s"],
            "idle_s": mean("collector/idle_s"), "staleness": mean("staleness/mean"),
            "dropped": float(summary.get("final", {}).get("samples_dropped", 0)),
            "new_tokens": mean("inflight/new_token_fraction")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=4, help="mode.in_flight_chunk_tokens")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-staleness", type=int, default=1)
    a = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for i, (name, in_flight) in enumerate(VARIANTS.items()):
                results[name].append(run(Path(tmp) / f"{i}_{r}", a, in_flight))
    print(f"{a.steps} optimizer steps of the quick start with vLLM, {a.rounds} round(s), chunks of {a.chunk} "
          f"tokens, max_new_tokens {a.max_new_tokens}, max_staleness {a.max_staleness}")
    print("| variant | loop s | samples/s | collector idle s/batch | staleness mean | dropped | new-weight tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"| {name} | {med['loop_s']:.1f} | {med['samples_per_s']:.1f} | {med['idle_s']:.3f} | "
              f"{med['staleness']:.2f} | {med['dropped']:.0f} | {med['new_tokens']:.2f} |")


if __name__ == "__main__":
    main()
