"""Synchronous GRPO: collect P x G completions with the current weights, score them, compute
group-relative advantages, take optimizer steps on them, sync the weights, repeat.

    python sota-implementations/grpo/grpo-sync.py                       # the quick start
    python sota-implementations/grpo/grpo-sync.py --config-name grpo_gsm8k train.max_steps=200
    python sota-implementations/grpo/grpo-sync.py mode.ray=true         # generate in a Ray actor
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, OmegaConf

from grpo_utils.algo.advantages import assign_advantages
from grpo_utils.data.prompts import PromptStream
from grpo_utils.models.loading import load_policy, make_reference
from grpo_utils.train import checkpoint as ckpt
from grpo_utils.train.metrics import MetricsLogger
from grpo_utils.train.run import (
    find_resume_checkpoint,
    finish_run,
    held_out_evaluator,
    load_rows,
    make_loss,
    make_renderer,
    make_reward,
    make_rollout,
    resume_training,
    start_run,
    stop_run,
)
from grpo_utils.train.trainer import PolicyTrainer


@hydra.main(config_path="../../config", config_name="grpo_quickstart", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = start_run(cfg, mode="sync")
    loss_fn, reward_fn = make_loss(cfg.loss), make_reward(cfg.reward)
    train_rows, heldout_rows = load_rows(cfg.env, cfg.eval.heldout_size)
    resume_from = find_resume_checkpoint(cfg.resume, run.run_dir)

    # Policy, (reference), rollout and trainer. Locally the generator shares the training module
    # (weight sync is free); with mode.ray=true it is a Ray actor that gets the weights pushed.
    model, tokenizer, _ = load_policy(cfg.model, run.device)
    ref_model = make_reference(model) if loss_fn.needs_reference else None
    renderer = make_renderer(cfg.env, tokenizer, train_rows[0])
    prompts = PromptStream(train_rows, cfg.env.num_prompts, seed=cfg.seed, shuffle=cfg.env.shuffle)
    rollout = make_rollout(cfg, model, tokenizer, renderer, reward_fn, prompts,
                           keep_rollout_log_probs=loss_fn.needs_rollout_log_probs, device=run.device)
    trainer = PolicyTrainer(model, loss_fn, cfg.train, cfg.generation.temperature, ref_model)

    rollout_size = cfg.env.num_prompts * cfg.env.group_size
    updates_per_rollout = cfg.train.epochs * rollout_size // cfg.train.optim_batch_size
    # Behaviour log-probs are only needed when a batch is reused for several updates, for a KL
    # penalty in the reward, or to correct the sampler's log-probs; with one update per rollout
    # the policy that sampled is the one being trained (ratio exactly 1). A Ray collector
    # always sends them (and the advantages), computed with the weights that sampled.
    need_behaviour = updates_per_rollout > 1 or loss_fn.kl_in_reward or loss_fn.needs_rollout_log_probs
    micro_batch_size = cfg.train.optim_batch_size // cfg.train.grad_accum_steps

    step, version, before, saved = 0, 0, None, -1
    if resume_from is not None:
        state = resume_training(resume_from, model, trainer)
        step, before, saved = state["step"], state.get("heldout_accuracy_before"), state["step"]
        version = state.get("policy_version", 0)
        if "prompts" in state:  # an async checkpoint has per-collector streams instead
            rollout.load_data_state(state["prompts"])
        rollout.sync_weights(model, version)

    def save(step: int) -> int:
        nonlocal saved
        if step > 0 and step != saved:
            ckpt.save_checkpoint(run.run_dir, step, model, tokenizer,
                                 {"step": step, "trainer": trainer.state_dict(), "prompts": rollout.data_state(),
                                  "policy_version": version, "heldout_accuracy_before": before},
                                 keep_last=cfg.checkpoint.keep_last)
            saved = step
        return saved

    held_out_eval = held_out_evaluator(cfg, model, tokenizer, renderer, reward_fn, heldout_rows)
    logger = MetricsLogger(run.run_dir, backend=cfg.logger, project=cfg.wandb.project,
                           run_name=cfg.wandb.run_name, config=OmegaConf.to_container(cfg, resolve=True),
                           total_steps=cfg.train.max_steps, start_step=step)
    t_start = time.perf_counter()
    try:
        if cfg.eval.before_after and before is None:
            first = held_out_eval()
            before = first["eval/accuracy"]
            logger.log_eval(first, step=0)

        while step < cfg.train.max_steps:
            batch, stats = rollout.collect(shaping=loss_fn.rollout_shaping)
            trainer.annotate(batch, need_behaviour=need_behaviour and "old_log_probs" not in batch.keys(),
                             micro_batch_size=micro_batch_size)
            if "advantage" not in batch.keys():  # a Ray collector assigns them itself (unless KL is in the reward)
                stats |= assign_advantages(batch, loss_fn, cfg.advantage.estimator, cfg.advantage.scale,
                                           cfg.advantage.eps, cfg.env.group_size)
            last_saved = step // cfg.checkpoint.every_n_steps if cfg.checkpoint.every_n_steps else 0
            for metrics in trainer.train_on_batch(batch, stats["time/generate_s"]):
                step += 1
                logger.log({**stats, **metrics, "policy_version": version}, step=step)
                if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0:
                    logger.log_eval(held_out_eval(), step=step)
                if step >= cfg.train.max_steps:
                    break
            version += 1
            if step < cfg.train.max_steps:
                rollout.sync_weights(model, version)
            if cfg.checkpoint.every_n_steps and step // cfg.checkpoint.every_n_steps > last_saved:
                save(step)  # at a rollout boundary, so resuming replays nothing and skips nothing
    except BaseException as e:
        rollout.close()
        stop_run(e, lambda: save(step), logger)
    rollout.close()

    extra = {"data/skipped_rows": train_rows.skipped + heldout_rows.skipped, "policy_version": version}
    if cfg.eval.before_after:
        after = held_out_eval()
        logger.log_eval(after, step=step)
        extra |= {"heldout_accuracy_before": before, "heldout_accuracy_after": after["eval/accuracy"]}
    save(step)
    finish_run(run.run_dir, logger, step, t_start, extra)


if __name__ == "__main__":
    main()
