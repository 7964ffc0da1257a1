"""Evaluate a model (a directory, a training checkpoint, a run's latest checkpoint, or a hub name) on a
dataset split: greedy accuracy, pass@1..pass@k, maj@k and mean@k. Prints a table and writes a JSON
report (default ``<hydra run dir>/eval_report.json``).

    python sota-implementations/grpo/grpo-eval.py                                    # quick-start base model
    python sota-implementations/grpo/grpo-eval.py model.name=outputs/DATE/TIME/checkpoints/step_60
    python sota-implementations/grpo/grpo-eval.py model.name=outputs/DATE/TIME env.dataset=countdown eval.k=16
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from grpo_utils.eval.evaluate import format_table
from grpo_utils.eval.run import run_evaluation
from grpo_utils.launch import exit_on_error, launch


@hydra.main(config_path="../../config", config_name="grpo_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        report, report_path = run_evaluation(cfg, HydraConfig.get().runtime.output_dir)
    print(format_table(report))
    print(f"Report: {report_path}")


if __name__ == "__main__":
    launch(main, mode=None, config_dir=Path(__file__).resolve().parents[2] / "config", default_config="grpo_eval")
