"""Asynchronous GRPO on Ray: collector actors generate scored groups with their own copy of the
policy while this process takes optimizer steps on what they produced.

    python sota-implementations/grpo/grpo-async.py                               # the quick start, async
    python sota-implementations/grpo/grpo-async.py mode.max_staleness=0 mode.num_collectors=2

Where batches come from: ``mode.num_collectors`` actors stream into a bounded queue
(``mode.buffer_size``; a full queue blocks them). A sample's age is the number of weight pushes
since the weights that generated it; batches older than ``mode.max_staleness`` are dropped whole
(``samples_dropped``). Behaviour log-probs come from the collector (the weights that sampled), so
the importance ratio of a stale sample is exact. How often weights are pushed: every
``mode.weight_update_frequency`` optimizer steps, at a batch boundary. The loop itself is
``grpo_utils.train.loop``.
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
    run_dir = HydraConfig.get().runtime.output_dir
    with exit_on_error():
        trainer = GRPOLoop(cfg, mode="async", run_dir=run_dir)
        trainer.setup()  # config checked, Ray resources planned, then the collectors start
        trainer.train()
        trainer.cleanup()


if __name__ == "__main__":
    launch(main, mode="async", config_dir=Path(__file__).resolve().parents[2] / "config")
