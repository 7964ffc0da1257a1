"""What a checkpoint must hold to continue a run exactly: :class:`TrainState`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Progress of one run. The optimizer and LR schedule live in the trainer, the prompt-stream
    or collector positions in the batch source, the RNGs in the process; :meth:`to_checkpoint`
    gathers all of them into the dict written to ``trainer_state.pt``."""

    step: int = 0                                 # optimizer steps taken
    policy_version: int = 0                       # weight pushes to the inference side so far
    heldout_accuracy_before: float | None = None  # greedy held-out accuracy before training
    saved_step: int = -1                          # step of the newest checkpoint this run wrote or resumed
    source_state: dict[str, Any] = field(default_factory=dict)  # the checkpoint's data/collector positions

    def to_checkpoint(self, trainer_state: dict[str, Any], source_state: dict[str, Any]) -> dict[str, Any]:
        """The ``trainer_state.pt`` payload (the checkpoint writer adds the RNG states)."""
        return {"step": self.step, "policy_version": self.policy_version,
                "heldout_accuracy_before": self.heldout_accuracy_before, "trainer": trainer_state, **source_state}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> TrainState:
        """Inverse of :meth:`to_checkpoint`; a checkpoint of any mode (local, sync on Ray, async) loads."""
        known = {"step", "policy_version", "heldout_accuracy_before", "trainer", "rng"}
        return cls(step=int(state["step"]), policy_version=int(state.get("policy_version", 0)),
                   heldout_accuracy_before=state.get("heldout_accuracy_before"), saved_step=int(state["step"]),
                   source_state={k: v for k, v in state.items() if k not in known})
