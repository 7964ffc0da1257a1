"""The GRPO training loop shared by ``grpo-sync.py``, ``grpo-async.py`` and scripts.

What differs between the modes is only where a batch comes from (the local rollout, one Ray
collector asked for each batch, or a pool of collectors streaming into a queue: see
:func:`grpo_utils.train.sources.batch_source`) and how often the weights are pushed back. Every step is:

    batch = source.collect()                # P prompts x G completions, scored
    prepare(batch)                          # behaviour/reference log-probs, advantages
    for each optimizer step on the batch:   # train.epochs passes in optim_batch_size mini-batches
        step, log, evaluate
    push the weights every N steps          # policy_version += 1, at a batch boundary
    checkpoint at a batch boundary
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from grpo_utils import build
from grpo_utils.distributed import ranks
from grpo_utils.distributed.ranks import RankFailed
from grpo_utils.errors import CheckpointError, GRPOError, Terminated
from grpo_utils.models.check import ModelInfo, check_model_name, check_same_architecture
from grpo_utils.train import checkpoint as ckpt
from grpo_utils.train import sources
from grpo_utils.train.run import prepare_process
from grpo_utils.train.state import TrainState


class GRPOLoop:
    """``setup()`` builds everything (raising a :class:`~grpo_utils.errors.GRPOError` before any
    model loads when the config or the machine is wrong), ``train()`` runs to ``train.max_steps``,
    ``save_checkpoint()`` writes ``checkpoints/step_<N>/``, ``cleanup()`` releases the batch
    source and writes ``final_model/`` and ``summary.json``. An error or Ctrl-C inside
    ``train()`` checkpoints the step reached before it propagates. A write the disk fails
    (checkpoint, ``metrics.jsonl``, ``final_model/``, ``summary.json``) stops the run with a
    one-line :class:`~grpo_utils.errors.CheckpointError` naming the checkpoint still intact,
    without a further checkpoint: the run resumes exactly from that one once there is room.

    ``model``/``tokenizer`` (and ``ref_model``) given in memory (the Python API) replace loading
    ``model.name``; ``model.name`` must still name a directory holding the same weights where
    another process or engine loads them (Ray collectors, vLLM)."""

    def __init__(self, cfg: DictConfig, mode: str, run_dir: str | Path, model=None, tokenizer=None, ref_model=None):
        self.cfg, self.mode, self.run_dir = cfg, mode, Path(run_dir)
        self._given = (model, tokenizer, ref_model)
        self.state = TrainState()
        self.source = self.logger = None
        self._source_open = False
        self._checkpoint: Path | None = None  # the checkpoint of state.saved_step

    def setup(self) -> None:
        cfg = self.cfg
        self.device = prepare_process(cfg, self.mode)
        build.check_given_reference(cfg, self._given[2])  # before any model loads
        self.loss_fn = build.loss(cfg.loss)
        self.reward_fn = build.reward(cfg)
        self.train_rows, self.heldout_rows = build.rows(cfg.env, cfg.eval.heldout_size)
        # Verified against its manifest (damaged newer ones passed over) before any model loads.
        point = ckpt.resume_point(cfg.resume, self.run_dir)
        if point is not None and point.note:
            print(point.note)
        if point is None and (note := ckpt.fresh_start_note(cfg.resume, self.run_dir)):
            print(note, file=sys.stderr)
        if point is not None:  # a LoRA checkpoint resumes only as LoRA, with the same adapter shape
            from grpo_utils.models.lora import check_checkpoint

            shown = ckpt.shown_path(point.path, self.run_dir)
            check_checkpoint(point.path, cfg.train_model.lora, shown)
            check_same_architecture(point.path, self._model_info(), "resume", shown)

        # The other trainer ranks start now and load their shards while this process loads the policy.
        self.ranks = ranks.start(cfg, self.device) if cfg.train_model.num_devices > 1 else None
        try:
            self._build_parts(point)
        except BaseException:
            if self.ranks is not None:
                self.ranks.abort()
            raise

    def _model_info(self) -> ModelInfo | None:
        """What the policy's config.json says (an in-memory model's config), read without loading."""
        given = self._given[0]
        if given is not None:
            return ModelInfo(None, given.config.to_dict()) if hasattr(given, "config") else None
        return check_model_name(self.cfg.model.name, tokenizer=False)

    def _build_parts(self, point: ckpt.ResumePoint | None) -> None:
        """Load the models, build the trainer (collective with the other ranks), evaluator, logger
        and batch source, and restore ``point``'s state: :meth:`setup` after the cheap checks."""
        cfg = self.cfg
        resume_from = point.path if point is not None else None
        given_model, given_tokenizer, given_ref = self._given
        if given_model is None:
            self.model, self.tokenizer = build.policy(cfg, self.device)
        else:
            self.model, self.tokenizer = build.given_policy(cfg, given_model, given_tokenizer, self.device)
        ref_model = None
        if self.loss_fn.needs_reference:
            ref_model = build.reference(cfg, self.model, self.device, given=given_ref)
        self.renderer = build.renderer(cfg.env, self.tokenizer, self.train_rows[0])
        self.train_rows, self.heldout_rows = build.prompts_that_fit(cfg, self.model, self.tokenizer, self.renderer,
                                                                    train=self.train_rows, test=self.heldout_rows)
        if point is not None:  # after the reference copied the initial policy, before the trainer shards it
            ckpt.load_model_weights(resume_from, self.model)
        self.trainer = build.trainer(cfg, self.model, self.loss_fn, ref_model, group=self.ranks)
        saved: dict[str, Any] = {}
        if point is not None:
            saved = point.state
            self.trainer.load_state_dict(saved["trainer"])
            self.state = TrainState.from_checkpoint(saved)
            self._checkpoint = resume_from

        # The run's own engine when it has one in this process (vLLM, local sync); built below.
        self._evaluate = build.held_out_evaluator(cfg, self.model, self.tokenizer, self.renderer, self.reward_fn,
                                                  self.heldout_rows, engine=lambda: self.source.eval_engine(self.model))
        try:
            self.logger = build.logger(cfg, self.run_dir, start_step=self.state.step)
        except OSError as error:  # metrics.jsonl could not be set up (e.g. a full disk)
            failure = self._write_failure(error)
            if failure is None:
                raise
            raise failure from None
        try:
            self.source = sources.batch_source(cfg, self.mode, self, resume_from, self.state)
        except BaseException:
            self.logger.close()
            raise
        self._source_open = True
        if resume_from is not None:  # last: nothing above may draw from the restored RNG streams
            ckpt.restore_rng_state(saved["rng"])
            print(f"Resumed from {resume_from} at step {self.state.step}")

        updates_per_batch = cfg.train.epochs * cfg.env.num_prompts * cfg.env.group_size // cfg.train.optim_batch_size
        # Behaviour log-probs are needed when a batch is reused for several updates, for a KL
        # penalty in the reward, or to correct the sampler's log-probs; with one update per batch
        # the policy that sampled is the one being trained (ratio exactly 1). Ray collectors send
        # them with the batch, computed with the weights that sampled. With vLLM they are always
        # computed here, from the current weights: vLLM's own are the batch's rollout_log_probs,
        # so the mismatch (and staleness, in async) is measured and, with loss.is_correction,
        # corrected between the two.
        self.need_behaviour = (updates_per_batch > 1 or self.loss_fn.kl_in_reward
                               or self.loss_fn.needs_rollout_log_probs or cfg.inference_model.backend == "vllm")
        self.micro_batch_size = cfg.train.optim_batch_size // cfg.train.grad_accum_steps
        self.push_every = sources.push_every(cfg, self.mode)
        self.advantages = build.advantage_stage(cfg, self.loss_fn)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the trained weights."""
        self.trainer.publish()
        return self._evaluate()

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        # Plain ints: OmegaConf lookups on every step cost more than the loop's own work.
        max_steps, eval_every, ckpt_every = cfg.train.max_steps, cfg.eval.every_n_steps, cfg.checkpoint.every_n_steps
        self.t_start = time.perf_counter()
        try:
            if cfg.eval.before_after and state.heldout_accuracy_before is None:
                first = self.evaluate()
                state.heldout_accuracy_before = first["eval/accuracy"]
                self.logger.log_eval(first, step=0)
            since_push = 0
            while state.step < max_steps:
                batch, stats = self.source.collect()
                stats |= self.prepare(batch)
                checkpoints_before = state.step // ckpt_every if ckpt_every else 0
                for metrics in self.trainer.train_on_batch(batch, stats["time/generate_s"]):
                    state.step += 1
                    since_push += 1
                    self.logger.log({**stats, **metrics, "policy_version": state.policy_version, **self._memory()},
                                    step=state.step)
                    if eval_every and state.step % eval_every == 0:
                        self.logger.log_eval(self.evaluate(), step=state.step)
                    if state.step >= max_steps:
                        break
                # At a batch boundary, so every update on one batch sees one sample age.
                if since_push >= self.push_every:
                    state.policy_version += 1
                    since_push = 0
                    if state.step < max_steps:
                        self.trainer.publish()
                        self.source.sync_weights(self.model, state.policy_version)
                if ckpt_every and state.step // ckpt_every > checkpoints_before:
                    self.save_checkpoint()  # at a batch boundary: resuming replays nothing, skips nothing
        except BaseException as error:
            self._close_source()
            # A write the disk failed (a checkpoint, a metrics line) stops without another
            # checkpoint: the last one written agrees with metrics.jsonl, and is named.
            failure = self._write_failure(error)
            saved = state.saved_step
            if failure is None and not isinstance(error, RankFailed):  # a lost rank cannot help save
                try:
                    saved = self.save_checkpoint()
                except CheckpointError as save_failed:
                    failure = save_failed
            self.logger.close()
            self.trainer.close()  # the other trainer ranks stop (after the checkpoint they helped gather)
            if failure is not None:
                raise failure from None
            if isinstance(error, GRPOError | KeyboardInterrupt | Terminated):
                error.checkpoint_step = saved if saved > 0 else None
            raise

    def _memory(self) -> dict[str, float]:
        """This process's peak GPU memory so far (``torch.cuda.max_memory_allocated``), on CUDA only:
        what to compare with the card's memory when sizing a batch or a model."""
        if self.device.type != "cuda":
            return {}
        return {"perf/peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def prepare(self, batch) -> dict[str, float]:
        """Behaviour and reference log-probs, then advantages. A Ray collector sends the former,
        and the latter too unless a KL-in-reward penalty needs the trainer's reference model."""
        self.trainer.annotate(batch, need_behaviour=self.need_behaviour and "old_log_probs" not in batch.keys(),
                              micro_batch_size=self.micro_batch_size)
        return {} if "advantage" in batch.keys() else self.advantages(batch)

    def save_checkpoint(self) -> int:
        """Write ``checkpoints/step_<step>/`` unless that step is saved already; returns the newest
        saved step (-1: none)."""
        state = self.state
        if state.step > 0 and state.step != state.saved_step:
            self.trainer.publish()
            payload = state.to_checkpoint(self.trainer.state_dict(), self.source.checkpoint_state())
            self._checkpoint = ckpt.save_checkpoint(self.run_dir, state.step, self.model, self.tokenizer, payload,
                                                    keep_last=self.cfg.checkpoint.keep_last,
                                                    layout=self.cfg.checkpoint.layout)
            state.saved_step = state.step
        return state.saved_step

    def cleanup(self) -> dict[str, Any]:
        """Evaluate once more (unless the last step's evaluation is logged already: by the loop, or
        by the run this one resumes), release the batch source, write the last checkpoint,
        ``final_model/`` and ``summary.json``, print the summary; returns the summary."""
        from grpo_utils.train.metrics import format_summary, plot_reward_curve, write_summary

        cfg, state = self.cfg, self.state
        extra = {"data/skipped_rows": self.train_rows.skipped + self.heldout_rows.skipped,
                 "policy_version": state.policy_version}
        try:
            try:  # evaluated before the source closes: it may hold the engine evaluation generates with
                if cfg.eval.before_after:
                    after = self._logged_eval(state.step)
                    if after is None:
                        after = self.evaluate()
                        self.logger.log_eval(after, step=state.step)
                    extra |= {"heldout_accuracy_before": state.heldout_accuracy_before,
                              "heldout_accuracy_after": after["eval/accuracy"]}
            finally:
                self._close_source()
            self.save_checkpoint()
            self.trainer.publish()
            ckpt.save_final_model(self.run_dir, self.model, self.tokenizer, checkpoint=self._checkpoint)
            self.trainer.close()
            self.logger.close()
            summary = write_summary(self.run_dir, steps_done=state.step,
                                    wall_time_s=time.perf_counter() - self.t_start, extra=extra)
            plot = plot_reward_curve(self.run_dir)
        except Exception as error:
            self.logger.close()
            failure = self._write_failure(error)
            if failure is None:
                raise
            raise failure from None
        print(format_summary(summary))
        print(f"Run directory: {self.run_dir}" + (f"  (reward curve: {plot.name})" if plot else ""))
        return summary

    def _logged_eval(self, step: int) -> dict[str, Any] | None:
        """The evaluation already logged for ``step``, if the logger can tell (a custom one may not)."""
        logged = getattr(self.logger, "logged_eval", None)
        return logged(step) if logged is not None else None

    def _write_failure(self, error: BaseException) -> CheckpointError | None:
        """``error`` as the one-line CheckpointError when the disk failed a write of the run's
        (naming the checkpoint still intact), else None."""
        return error if isinstance(error, CheckpointError) else ckpt.write_error(error, self.run_dir)

    def _close_source(self) -> None:
        if self._source_open:
            self._source_open = False
            self.source.close()
