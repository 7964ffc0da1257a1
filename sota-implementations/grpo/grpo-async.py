"""Asynchronous GRPO on a local Ray cluster: collector actors generate scored groups with their
own copy of the policy while the trainer (this process) takes optimizer steps on what they
produced; weights go back to the collectors every ``mode.weight_update_frequency`` steps.

    python sota-implementations/grpo/grpo-async.py mode=async                 # the quick start, async
    python sota-implementations/grpo/grpo-async.py mode=async mode.max_staleness=0

A sample's age is the number of weight pushes since the weights that generated it; samples
older than ``mode.max_staleness`` are dropped (``samples_dropped``). Behaviour log-probs come
from the collector (the weights that sampled), so the ratio of a stale sample is exact.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, OmegaConf

from grpo_utils.algo.advantages import assign_advantages
from grpo_utils.distributed.collectors import payload_to_batch, sample_ages, staleness_stats
from grpo_utils.distributed.resources import mode_opt
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
    resume_training,
    start_collectors,
    start_run,
    stop_run,
)
from grpo_utils.train.trainer import PolicyTrainer


@hydra.main(config_path="../../config", config_name="grpo_quickstart", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = start_run(cfg, mode="async")
    loss_fn, reward_fn = make_loss(cfg.loss), make_reward(cfg.reward)
    train_rows, heldout_rows = load_rows(cfg.env, cfg.eval.heldout_size)
    resume_from = find_resume_checkpoint(cfg.resume, run.run_dir)

    model, tokenizer, _ = load_policy(cfg.model, run.device)
    ref_model = make_reference(model) if loss_fn.needs_reference else None
    renderer = make_renderer(cfg.env, tokenizer, train_rows[0])
    trainer = PolicyTrainer(model, loss_fn, cfg.train, cfg.generation.temperature, ref_model)

    micro_batch_size = cfg.train.optim_batch_size // cfg.train.grad_accum_steps
    max_staleness, push_every = mode_opt(cfg, "max_staleness"), mode_opt(cfg, "weight_update_frequency")

    step, version, before, saved, collectors = 0, 0, None, -1, {}
    if resume_from is not None:
        state = resume_training(resume_from, model, trainer)
        step, before, saved = state["step"], state.get("heldout_accuracy_before"), state["step"]
        # A sync checkpoint resumes too (weights, optimizer); its collectors start fresh streams.
        version, collectors = state.get("policy_version", 0), state.get("collectors", {})

    def save(step: int) -> int:
        nonlocal saved
        if step > 0 and step != saved:
            ckpt.save_checkpoint(run.run_dir, step, model, tokenizer,
                                 {"step": step, "trainer": trainer.state_dict(), "policy_version": version,
                                  "collectors": pool.consumed, "heldout_accuracy_before": before},
                                 keep_last=cfg.checkpoint.keep_last)
            saved = step
        return saved

    held_out_eval = held_out_evaluator(cfg, model, tokenizer, renderer, reward_fn, heldout_rows)
    logger = MetricsLogger(run.run_dir, backend=cfg.logger, project=cfg.wandb.project,
                           run_name=cfg.wandb.run_name, config=OmegaConf.to_container(cfg, resolve=True),
                           total_steps=cfg.train.max_steps, start_step=step)
    # The actors start from the checkpoint's weights (its directory is a Hugging Face model dir)
    # and each continues its prompt stream after the last batch the trainer took from it
    # (pool.consumed, saved in checkpoints), so no prompt is skipped or trained twice.
    pool = start_collectors(cfg, run.device, streaming=True, model=model,
                            model_path=str(resume_from) if resume_from else None,
                            start_states={int(i): {**s, "version": version} for i, s in collectors.items()})
    pool.version = version
    t_start = time.perf_counter()  # like grpo-sync.py: the loop, after the collectors are up
    try:
        if cfg.eval.before_after and before is None:  # the collectors are generating meanwhile
            first = held_out_eval()
            before = first["eval/accuracy"]
            logger.log_eval(first, step=0)

        dropped, since_push = 0, 0
        while step < cfg.train.max_steps:
            payload, queue_size = pool.get()
            batch = payload_to_batch(payload)
            ages = sample_ages(batch["policy_version"], version)
            if int(ages.max()) > max_staleness:
                # A batch comes from one generate round, so its samples share one version: the
                # whole batch (whole groups) is dropped.
                dropped += int((ages > max_staleness).sum())
                continue
            stats = dict(payload["stats"])
            trainer.annotate(batch, need_behaviour=False, micro_batch_size=micro_batch_size)  # reference, if any
            if "advantage" not in batch.keys():  # the collector assigns them itself unless KL is in the reward
                stats |= assign_advantages(batch, loss_fn, cfg.advantage.estimator, cfg.advantage.scale,
                                           cfg.advantage.eps, cfg.env.group_size)
            stats |= staleness_stats(ages) | {"buffer/size": queue_size, "samples_dropped": dropped,
                                              "collector": payload["worker"], "collector_restarts": pool.restarts}
            last_saved = step // cfg.checkpoint.every_n_steps if cfg.checkpoint.every_n_steps else 0
            for metrics in trainer.train_on_batch(batch, stats["time/generate_s"]):
                step += 1
                since_push += 1
                logger.log({**stats, **metrics, "policy_version": version}, step=step)
                if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0:
                    logger.log_eval(held_out_eval(), step=step)
                if step >= cfg.train.max_steps:
                    break
            # Weights are pushed at a batch boundary, so all updates on one batch see one sample age.
            if since_push >= push_every and step < cfg.train.max_steps:
                version += 1
                pool.push_weights(model, version)
                since_push = 0
            if cfg.checkpoint.every_n_steps and step // cfg.checkpoint.every_n_steps > last_saved:
                save(step)
    except BaseException as e:
        pool.close()
        stop_run(e, lambda: save(step), logger)
    pool.close()

    extra = {"data/skipped_rows": train_rows.skipped + heldout_rows.skipped, "policy_version": version}
    if cfg.eval.before_after:
        after = held_out_eval()
        logger.log_eval(after, step=step)
        extra |= {"heldout_accuracy_before": before, "heldout_accuracy_after": after["eval/accuracy"]}
    save(step)
    finish_run(run.run_dir, logger, step, t_start, extra)


if __name__ == "__main__":
    main()
