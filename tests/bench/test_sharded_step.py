"""bench/sharded_step.py on a tiny model: 1 rank against 2 FSDP2 ranks, and what each rank holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_hold_half_the_state():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench/sharded_step.py"), "--hidden", "64", "--layers", "2",
                           "--heads", "4", "--batch", "4", "--seq", "16", "--response", "8", "--steps", "1",
                           "--warmup", "1", "--rounds", "1"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| ranks")).split("|")[1:-1]]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]), strict=True))
            for line in lines if re.match(r"\| [12] \| [01] \|", line)]
    assert [(r["ranks"], r["rank"]) for r in rows] == [("1", "0"), ("2", "0"), ("2", "1")]
    assert all(float(r["CPU s/step"]) > 0 for r in rows)
    # each of the 2 ranks holds half the parameters and AdamW state (FSDP2 shards both)
    for rank in (0, 1):
        held = re.search(rf"2 ranks, rank {rank}: parameter \+ AdamW state ([0-9.]+) of 1 rank's", proc.stdout)
        assert held and float(held.group(1)) == pytest.approx(0.5, abs=0.02)
    # rank 0 also keeps the full policy the loop generates with; rank 1 does not
    assert rows[1]["full policy copy"] != "-" and rows[2]["full policy copy"] == "-"
