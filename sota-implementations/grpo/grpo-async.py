"""Asynchronous GRPO on a local Ray cluster: collector actors generate scored groups with their
own copy of the policy while the trainer (this process) takes optimizer steps on what they
produced; weights go back to the collectors through the Ray object store.

    python sota-implementations/grpo/grpo-async.py mode=async                 # the quick start, async
    python sota-implementations/grpo/grpo-async.py mode=async mode.max_staleness=0

A sample's age is the number of weight pushes since the weights that generated it; samples
older than ``mode.max_staleness`` are dropped (``samples_dropped``). Behaviour log-probs come
from the collector (the weights that sampled), so the ratio of a stale sample is exact.
"""

from __future__ import annotations

import signal
import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement

from grpo_utils import checkpoint as ckpt
from grpo_utils.advantages import assign_advantages
from grpo_utils.evaluation import evaluate
from grpo_utils.metrics import MetricsLogger
from grpo_utils.models import load_policy, make_reference, resolve_model_path
from grpo_utils.ray_resources import check_async_options, init_ray, mode_opt, plan_resources, shutdown_ray
from grpo_utils.setup import finish_run, load_rows, make_loss, make_renderer, make_reward, start_run
from grpo_utils.trainer import PolicyTrainer


@hydra.main(config_path="../../config", config_name="grpo_quickstart", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.mode.name != "async":
        sys.exit(f"config error: mode={cfg.mode.name} cannot run with grpo-async.py; use grpo-{cfg.mode.name}.py "
                 "or mode=async")
    run = start_run(cfg, mode="async")
    try:
        check_async_options(cfg)
        plan = plan_resources(cfg, run.device)
    except ValueError as e:
        sys.exit(f"config error: {e}")
    if cfg.rollout.engine != "direct":
        sys.exit(f"config error: rollout.engine={cfg.rollout.engine} is not supported by grpo-async.py; "
                 "use rollout.engine=direct")
    if cfg.resume:
        sys.exit("config error: resume is not supported by grpo-async.py yet; use resume=false")
    if not cfg.num_threads:
        torch.set_num_threads(plan.trainer_threads)  # leave the collectors' cores to them

    loss_fn, reward_fn = make_loss(cfg.loss), make_reward(cfg.reward)
    train_rows, heldout_rows = load_rows(cfg.env, cfg.eval.heldout_size)
    model_path = resolve_model_path(cfg.model.name)  # builtin:quickstart is built once, here, not per actor
    model, tokenizer, _ = load_policy(cfg.model, run.device)
    ref_model = make_reference(model) if loss_fn.needs_reference else None
    renderer = make_renderer(cfg.env, tokenizer, train_rows[0])
    trainer = PolicyTrainer(model, loss_fn, cfg.train, cfg.generation.temperature, ref_model)

    rollout_size = cfg.env.num_prompts * cfg.env.group_size
    updates_per_rollout = cfg.train.epochs * rollout_size // cfg.train.optim_batch_size
    micro_batch_size = cfg.train.optim_batch_size // cfg.train.grad_accum_steps
    max_staleness, push_every = mode_opt(cfg, "max_staleness"), mode_opt(cfg, "weight_update_frequency")
    actor_cfg = OmegaConf.to_container(cfg, resolve=True)
    actor_cfg["model"]["name"] = model_path

    state = {"step": 0, "version": 0, "saved": -1}
    before = None

    def save(step: int) -> None:
        ckpt.save_checkpoint(run.run_dir, step, model, tokenizer,
                             {"step": step, "trainer": trainer.state_dict(), "policy_version": state["version"],
                              "heldout_accuracy_before": before},
                             keep_last=cfg.checkpoint.keep_last)
        state["saved"] = step

    def held_out_eval() -> dict[str, float]:
        return evaluate(model, tokenizer, renderer, reward_fn, heldout_rows, k=cfg.eval.k,
                        temperature=cfg.eval.temperature, top_p=cfg.generation.top_p, top_k=cfg.generation.top_k,
                        max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.seed)

    from grpo_utils.async_collector import CollectorFailed, CollectorPool, payload_to_batch, sample_ages

    logger = MetricsLogger(run.run_dir, backend=cfg.logger, project=cfg.wandb.project,
                           run_name=cfg.wandb.run_name, config=OmegaConf.to_container(cfg, resolve=True),
                           total_steps=cfg.train.max_steps, start_step=0)
    pool, failure = None, None
    t_start = time.perf_counter()
    init_ray(plan)
    # SIGTERM (a scheduler's stop) unwinds like Ctrl-C: checkpoint, kill the actors, stop Ray.
    # Installed after ray.init, which sets its own handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: terminated (SIGTERM)"))
    try:
        pool = CollectorPool(actor_cfg, plan.num_collectors, plan.collector_cpus, plan.collector_gpus,
                             mode_opt(cfg, "buffer_size"), float(mode_opt(cfg, "actor_timeout_s")),
                             loss_fn.rollout_shaping, loss_fn.needs_rollout_log_probs, micro_batch_size)
        if cfg.eval.before_after:  # the collectors are already generating with the same initial weights
            first = held_out_eval()
            before = first["eval/accuracy"]
            logger.log_eval(first, step=0)

        dropped, since_push = 0, 0
        while state["step"] < cfg.train.max_steps:
            payload, queue_size = pool.get()
            batch = payload_to_batch(payload)
            ages = sample_ages(batch["policy_version"], state["version"])
            if int(ages.max()) > max_staleness:
                # A batch comes from one generate round, so its samples share one version: the
                # whole batch (whole groups) is dropped.
                dropped += int((ages > max_staleness).sum())
                continue
            stats = dict(payload["stats"])
            if ref_model is not None:
                trainer.annotate(batch, need_behaviour=False, micro_batch_size=micro_batch_size)
            stats |= assign_advantages(batch, loss_fn, cfg.advantage.estimator, cfg.advantage.scale,
                                       cfg.advantage.eps, cfg.env.group_size)
            stats |= {"staleness/mean": ages.float().mean().item(), "staleness/max": int(ages.max()),
                      "buffer/size": queue_size, "samples_dropped": dropped, "collector": payload["worker"]}
            buffer = ReplayBuffer(storage=LazyTensorStorage(rollout_size), sampler=SamplerWithoutReplacement(),
                                  batch_size=cfg.train.optim_batch_size)
            buffer.extend(batch)
            last_saved = state["step"] // cfg.checkpoint.every_n_steps if cfg.checkpoint.every_n_steps else 0
            t_train, tokens = 0.0, batch["response_mask"].sum().item()
            for _ in range(updates_per_rollout):
                metrics = trainer.optimizer_step(buffer.sample())
                state["step"] += 1
                since_push += 1
                t_train += metrics["time/train_s"]
                metrics["tokens_per_s"] = tokens / (stats["time/generate_s"] + t_train)
                logger.log({**stats, **metrics, "policy_version": state["version"]}, step=state["step"])
                if cfg.eval.every_n_steps and state["step"] % cfg.eval.every_n_steps == 0:
                    logger.log_eval(held_out_eval(), step=state["step"])
                if state["step"] >= cfg.train.max_steps:
                    break
            # Weights are pushed at a batch boundary, so all updates on one batch see one sample age.
            if since_push >= push_every and state["step"] < cfg.train.max_steps:
                state["version"] += 1
                pool.push_weights(model, state["version"])
                since_push = 0
            if cfg.checkpoint.every_n_steps and state["step"] // cfg.checkpoint.every_n_steps > last_saved:
                save(state["step"])
    except CollectorFailed as e:
        failure = str(e)
    except BaseException:
        if state["step"] > 0 and state["saved"] != state["step"]:
            save(state["step"])
        logger.close()
        raise
    finally:
        shutdown_ray(pool.all_actors() if pool is not None else [])

    if failure is not None:
        if state["step"] > 0 and state["saved"] != state["step"]:
            save(state["step"])
        logger.close()
        where = f"; last checkpoint: step {state['saved']}" if state["saved"] > 0 else ""
        sys.exit(f"error: {failure}{where} (stopped at step {state['step']})")

    step = state["step"]
    extra = {"data/skipped_rows": train_rows.skipped + heldout_rows.skipped, "policy_version": state["version"]}
    if cfg.eval.before_after:
        after = held_out_eval()
        logger.log_eval(after, step=step)
        extra |= {"heldout_accuracy_before": before, "heldout_accuracy_after": after["eval/accuracy"]}
    if state["saved"] != step:
        save(step)
    finish_run(run.run_dir, logger, step, t_start, extra)


if __name__ == "__main__":
    main()
