"""Synchronous GRPO: collect P x G completions with the current weights, score them, compute
group-relative advantages, take optimizer steps on them, push the weights, repeat.

    python sota-implementations/grpo/grpo-sync.py                       # the quick start
    python sota-implementations/grpo/grpo-sync.py --config-name grpo_gsm8k train.max_steps=200
    python sota-implementations/grpo/grpo-sync.py mode.ray=true         # generate in a Ray actor

Where batches come from: locally, the generator shares the training module, so the weights are
in place as soon as the optimizer steps (policy age 0). With ``mode.ray=true`` one Ray collector
actor holds its own copy of the policy and is asked for each batch: ``mode.sync_iter=true`` asks
after the weights are pushed (age 0), ``false`` while training on the previous batch (age <= 1).
How often weights are pushed: after every batch. The loop itself is ``grpo_utils.train.loop``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from grpo_utils.launch import exit_on_error, launch
from grpo_utils.train.loop import GRPOLoop


@hydra.main(config_path="../../config", config_name="grpo_quickstart", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        loop = GRPOLoop(cfg, mode="sync", run_dir=HydraConfig.get().runtime.output_dir)
        loop.setup()  # config checked and resources planned before any model loads
        loop.train()
        loop.cleanup()


if __name__ == "__main__":
    launch(main, mode="sync", config_dir=Path(__file__).resolve().parents[2] / "config")
