"""Where the loop's batches come from, by mode, and how often weights go back."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from grpo_utils import build


def batch_source(cfg: DictConfig, mode: str, parts, resume_from: Path | None, state):
    """Where the loop's batches come from, positioned where the checkpoint (if any) left off:

    * ``mode=sync``: the local rollout, whose generator shares the training module (weight sync
      is free), or with ``mode.ray=true`` one Ray collector actor asked for each batch;
    * ``mode=async``: collector actors streaming into a bounded queue (stale batches dropped).

    ``parts`` is the loop (model, tokenizer, renderer, reward, loss, rows, device). Every source
    has ``collect()``, ``sync_weights(model, version)``, ``checkpoint_state()`` and ``close()``.
    """
    from grpo_utils.data.prompts import PromptStream
    from grpo_utils.distributed.launch import start_collectors
    from grpo_utils.distributed.resources import mode_opt

    if mode == "async":
        from grpo_utils.distributed.collectors import StreamedBatches

        # The actors start from the checkpoint's weights (its directory is a Hugging Face model
        # dir), each continuing its prompt stream after the last batch the trainer took from it.
        starts = {int(i): {**s, "version": state.policy_version}
                  for i, s in state.source_state.get("collectors", {}).items()}
        pool = start_collectors(cfg, parts.device, streaming=True, model=parts.model,
                                model_path=str(resume_from) if resume_from else None, start_states=starts)
        return StreamedBatches(pool, mode_opt(cfg, "max_staleness"), version=state.policy_version)
    if mode_opt(cfg, "ray"):
        from grpo_utils.distributed.collectors import RayRollout

        source = RayRollout(start_collectors(cfg, parts.device, streaming=False, model=parts.model),
                            sync_iter=mode_opt(cfg, "sync_iter"))
    else:
        stream = PromptStream(parts.train_rows, cfg.env.num_prompts, seed=cfg.seed, shuffle=cfg.env.shuffle)
        source = build.rollout(cfg, parts.model, parts.tokenizer, parts.renderer, parts.reward_fn, stream,
                               parts.loss_fn)
    if resume_from is not None:
        if "prompts" in state.source_state:  # an async checkpoint has per-collector streams instead
            source.load_data_state(state.source_state["prompts"])
        source.sync_weights(parts.model, state.policy_version)
    return source


def push_every(cfg: DictConfig, mode: str) -> int:
    """Optimizer steps between weight pushes (always at a batch boundary): sync pushes after every
    batch (1), async every ``mode.weight_update_frequency`` steps."""
    from grpo_utils.distributed.resources import mode_opt

    return mode_opt(cfg, "weight_update_frequency") if mode == "async" else 1

