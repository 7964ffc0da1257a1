"""Rollout: prompts -> G completions each -> rewards -> group advantages, as one dense batch.

Generation is ONE call of the inference engine (``grpo_utils.inference``: TorchRL's
``TransformersWrapper`` or vLLM) for all P x G completions of a step. Off the shelf, TorchRL's
``LLMCollector`` over a ``DatasetChatEnv`` calls ``generate`` once per repeat and clones lazily
stacked histories (about 10x a bare loop on a tiny model), so prompts are rendered and tokenized
here, once per distinct prompt, and the batch stays a dense ``TensorDict`` that TorchRL's replay
buffer stores without copies.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tensordict import TensorDict

from grpo_utils.algo.advantages import zero_advantage_group_fraction
from grpo_utils.algo.shaping import RolloutShaping, dynamic_sampling_keep, soft_overlong_penalty
from grpo_utils.data.prompts import PromptRenderer, PromptStream
from grpo_utils.inference.transformers import TransformersGenerator
from grpo_utils.rewards import RewardFunction


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id ``generate`` stops on: the tokenizer's EOS and the generation config's (Qwen lists several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def response_mask(response: torch.Tensor, stop_ids: int | list[int]) -> torch.Tensor:
    """True up to and including the first stop token; what ``generate`` pads after it is False.

    A pad id sampled *before* the stop token is a real token and stays in.
    """
    stops = torch.as_tensor(stop_ids if isinstance(stop_ids, (list, tuple)) else [stop_ids])
    is_stop = torch.isin(response, stops)
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return ~after_stop


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, W]`` left-padded with ``pad_id`` (as ``generate`` expects), and the mask."""
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = seq
        mask[i, width - len(seq):] = 1
    return ids, mask


class GroupRollout:
    """Draws prompts from ``stream``, samples ``group_size`` completions for each, scores them.

    The default rollout engine (``rollout=direct``) and the base of the others: an engine named
    with ``rollout._target_`` takes this constructor and yields the same batches from ``collect()``.
    """

    #: The engine can keep the sampler's own log-probs (for ``loss.is_correction``).
    samples_log_probs = True
    #: The engine renders prompts itself and needs the chat template.
    needs_chat_template = False
    #: The engine can generate with any ``grpo_utils.inference`` generator (``backend=vllm`` too).
    supports_vllm = True

    def __init__(self, model, tokenizer, renderer: PromptRenderer, reward_fn: RewardFunction,
                 gen_kwargs: dict[str, Any], group_size: int, stream: PromptStream,
                 keep_rollout_log_probs: bool = False, shaping: RolloutShaping | None = None, generator=None):
        """``generator`` (default: a ``TransformersGenerator`` over ``model``) is the inference engine
        (``grpo_utils.inference``); one that does not share ``model``'s weights gets them in
        :meth:`sync_weights`."""
        self.stream = stream
        self.shaping = shaping or RolloutShaping()
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.reward_fn = reward_fn
        self.group_size = group_size
        self.max_new_tokens = gen_kwargs["max_new_tokens"]
        self.keep_rollout_log_probs = keep_rollout_log_probs
        if generator is None:
            generator = TransformersGenerator(model, tokenizer, gen_kwargs, return_log_probs=keep_rollout_log_probs)
        self.generator = generator
        self.last_rollout_log_probs: torch.Tensor | None = None
        self.last_token_versions: torch.Tensor | None = None
        self._probe_diff: float | None = None
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.policy_version = 0

    def encode_prompts(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask; each distinct prompt is rendered and tokenized once."""
        # Repeats of a prompt are the same row object: render and tokenize each one once, pad the
        # distinct prompts, then gather their rows (the same tensors as padding every row).
        slot: dict[int, int] = {}
        distinct: list[torch.Tensor] = []
        for row in rows:
            if id(row) not in slot:
                text = self.renderer(row)
                cached = self._prompt_cache.get(text)
                if cached is None:
                    cached = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                    self._prompt_cache[text] = cached
                slot[id(row)] = len(distinct)
                distinct.append(cached)
        ids, mask = left_pad(distinct, self.pad_token_id)
        index = torch.tensor([slot[id(row)] for row in rows])
        return ids[index], mask[index]

    def data_state(self) -> dict[str, int]:
        """Position of the next prompts this rollout will train on (saved in checkpoints)."""
        return self.stream.state_dict()

    def checkpoint_state(self) -> dict:
        """What a checkpoint stores of this source: the prompt-stream position."""
        return {"prompts": self.data_state()}

    def load_data_state(self, state: dict) -> None:
        """Accepts this class's state or a Ray rollout's (``mode.ray=true`` checkpoints)."""
        if "collector" in state:
            if state["collector"] is None:
                return
            state = state["collector"]["prompts"]
        self.stream.load_state_dict(state)

    @torch.no_grad()
    def generate(self, rows: list[dict[str, Any]],
                 seed_key: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt ids, prompt mask and response ids for ``rows`` (one completion per row);
        ``seed_key`` seeds engines that sample with per-request seeds (vLLM)."""
        prompt, prompt_mask = self.encode_prompts(rows)
        response, log_probs = self.generator.generate(prompt, prompt_mask, seed_key)
        if self.keep_rollout_log_probs:
            self.last_rollout_log_probs = log_probs
        # per token, the policy version that sampled it (vLLM with in-flight weight updates)
        self.last_token_versions = getattr(self.generator, "last_token_versions", None)
        return prompt, prompt_mask, response

    def sample_groups(self) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next prompts, each repeated ``group_size`` times (contiguous), and their completions."""
        # The stream position before the draw identifies this generation round, in a resumed run too.
        seed_key = tuple(self.stream.state_dict().values())
        rows = [row for row in self.stream.next_batch() for _ in range(self.group_size)]
        return (rows, *self.generate(rows, seed_key))

    def _sample_scored(self) -> dict[str, Any]:
        """One generation round: rows, tensors and task rewards of ``num_prompts`` groups."""
        rows, prompt, prompt_mask, response = self.sample_groups()
        resp_mask = response_mask(response, self.stop_ids)
        # The mask is a prefix (up to and including the first stop token): decode that many ids.
        completions = self.tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(response.tolist(), resp_mask.sum(-1).tolist())], skip_special_tokens=True)
        prompts = [self.renderer(row) for row in rows] if self.reward_fn.uses_prompt else None
        scores, failures = self.reward_fn(completions, rows, prompts)
        part = {"rows": rows, "prompt": prompt, "prompt_mask": prompt_mask, "response": response,
                "response_mask": resp_mask, "scores": scores, "failures": failures,
                "timeouts": self.reward_fn.last_timeouts,
                "reward": torch.tensor([sc["reward"] for sc in scores], dtype=torch.float32)}
        if self.keep_rollout_log_probs:
            part["rollout_log_probs"] = self.last_rollout_log_probs.float()
        if self.last_token_versions is not None:
            part["token_version"] = self.last_token_versions
        return part

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Tag the next samples with ``version``; a generator with weights of its own (vLLM) gets
        ``model``'s, then the probe checks it holds them (raising ``WeightSyncError`` if not)."""
        if not self.generator.shares_weights:
            self.generator.load_weights(model)
            probe_ids = self.encode_prompts(self.stream.rows[:1])[0][0].tolist()
            diff = self.generator.check_sync(model, probe_ids, version)
            if diff is not None:
                self._probe_diff = diff
        self.policy_version = version

    def eval_engine(self, model: torch.nn.Module):
        """What held-out evaluation generates with: this rollout's own engine when it keeps weights
        of its own (vLLM), loaded with ``model``'s first (an evaluation may fall between two syncs);
        None when the generator is ``model`` itself (evaluation then generates with ``model``)."""
        if self.generator.shares_weights:
            return None
        self.generator.load_weights(model)
        return self.generator

    def close(self) -> None:
        """Release the generator (a vLLM engine; the Ray rollout shuts its actors down here)."""
        self.generator.close()

    def collect(self, shaping: RolloutShaping | None = None,
                policy_version: int | None = None) -> tuple[TensorDict, dict[str, float]]:
        """One step's batch of ``num_prompts * group_size`` scored samples, groups contiguous,
        tagged with ``policy_version`` (default: the version set by :meth:`sync_weights`).

        With ``shaping.dynamic_sampling`` (DAPO), groups whose rewards are all equal are dropped
        and more groups are generated (at most ``max_resample_rounds`` extra rounds) to refill
        the batch; if still short, dropped groups top it up so its size never changes. With
        ``shaping.overlong_penalty`` the soft overlong punishment is added to the reward.
        Advantages are assigned later (:class:`grpo_utils.algo.advantages.AdvantageStage`), once
        reference log-probs exist for a KL-in-reward penalty.
        """
        shaping = shaping or self.shaping
        policy_version = self.policy_version if policy_version is None else policy_version
        G, t0 = self.group_size, time.perf_counter()
        part = self._sample_scored()
        num_groups = len(part["rows"]) // G
        rounds, dropped = 0, 0
        if shaping.dynamic_sampling:
            kept, spare = [], []
            while True:
                keep = dynamic_sampling_keep(part["reward"], G)
                dropped += int((~keep).sum())
                kept += [(part, g) for g in keep.nonzero().flatten().tolist()]
                spare += [(part, g) for g in (~keep).nonzero().flatten().tolist()]
                if len(kept) >= num_groups or rounds >= shaping.max_resample_rounds:
                    break
                rounds += 1
                part = self._sample_scored()
            part = _merge_groups((kept + spare)[:num_groups], G, self.pad_token_id)
        t_gen = time.perf_counter() - t0

        rows, response, resp_mask = part["rows"], part["response"], part["response_mask"]
        lengths = resp_mask.sum(-1)
        truncated = ~torch.isin(response, torch.tensor(self.stop_ids)).any(-1)
        rewards = part["reward"]
        if shaping.overlong_penalty > 0:
            rewards = rewards + soft_overlong_penalty(lengths, self.max_new_tokens, shaping.overlong_cache_len,
                                                      shaping.overlong_penalty)
        extra = {key: part[key] for key in ("rollout_log_probs", "token_version") if key in part}
        batch = TensorDict(
            {
                **extra,
                "input_ids": torch.cat([part["prompt"], response], dim=1),
                "attention_mask": torch.cat([part["prompt_mask"], resp_mask.long()], dim=1),
                "response_mask": resp_mask,
                "truncated": truncated,
                "reward": rewards,
                "policy_version": torch.full((len(rows),), policy_version, dtype=torch.long),
            },
            batch_size=[len(rows)],
        )
        scores = part["scores"]
        stats = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rows) > 1 else 0.0,
            "prompt_length/mean": part["prompt_mask"].sum(-1).float().mean().item(),
            "response_length/mean": lengths.float().mean().item(),
            "response_length/max": lengths.max().item(),
            "truncated_fraction": truncated.float().mean().item(),
            "zero_advantage_groups": zero_advantage_group_fraction(rewards, G),
            "reward/failures": float(part["failures"]),
            "reward/timeouts": float(part.get("timeouts", 0)),
            "time/generate_s": t_gen,
        }
        if self._probe_diff is not None:  # the probe after the sync that produced these weights
            stats["weight_sync/probe_max_abs_diff"] = self._probe_diff
            self._probe_diff = None
        if "token_version" in part:  # in-flight weight updates: how much of the batch newer weights sampled
            newer = (part["token_version"] > policy_version) & resp_mask
            stats.update({"inflight/new_token_fraction": newer.sum().item() / max(1, resp_mask.sum().item()),
                          "inflight/versions_spanned": float(part["token_version"][resp_mask].max() - policy_version)})
        if shaping.dynamic_sampling:
            stats.update({"dynamic_sampling/groups_dropped": float(dropped),
                          "dynamic_sampling/rounds": float(rounds + 1)})
        for key in sorted({k for sc in scores for k in sc} - {"reward"}):
            stats[f"reward/{key}"] = sum(sc.get(key, 0.0) for sc in scores) / len(scores)
        return batch, stats


def _merge_groups(groups: list[tuple[dict[str, Any], int]], group_size: int, pad_id: int) -> dict[str, Any]:
    """Concatenate chosen groups from several generation rounds, re-padding prompts (left) and
    responses (right) to common widths."""
    def rows_of(part, g):
        return slice(g * group_size, (g + 1) * group_size)

    prompt_w = max(part["prompt"].shape[1] for part, _ in groups)
    resp_w = max(part["response"].shape[1] for part, _ in groups)
    out: dict[str, list] = {k: [] for k in ("rows", "prompt", "prompt_mask", "response", "response_mask",
                                            "scores", "reward", "rollout_log_probs", "token_version")}
    failures, timeouts = {}, {}
    for part, g in groups:
        sl = rows_of(part, g)
        prompt, pmask = part["prompt"][sl], part["prompt_mask"][sl]
        pad_p = prompt_w - prompt.shape[1]
        out["prompt"].append(torch.nn.functional.pad(prompt, (pad_p, 0), value=pad_id))
        out["prompt_mask"].append(torch.nn.functional.pad(pmask, (pad_p, 0), value=0))
        resp, rmask = part["response"][sl], part["response_mask"][sl]
        pad_r = resp_w - resp.shape[1]
        out["response"].append(torch.nn.functional.pad(resp, (0, pad_r), value=pad_id))
        out["response_mask"].append(torch.nn.functional.pad(rmask, (0, pad_r), value=False))
        for key in ("rollout_log_probs", "token_version"):
            if key in part:
                out[key].append(torch.nn.functional.pad(part[key][sl], (0, pad_r)))
        out["rows"] += part["rows"][sl]
        out["scores"] += part["scores"][sl]
        out["reward"].append(part["reward"][sl])
        failures[id(part)] = part["failures"]
        timeouts[id(part)] = part.get("timeouts", 0)
    merged = {"rows": out["rows"], "prompt": torch.cat(out["prompt"]), "prompt_mask": torch.cat(out["prompt_mask"]),
              "response": torch.cat(out["response"]), "response_mask": torch.cat(out["response_mask"]),
              "scores": out["scores"], "reward": torch.cat(out["reward"]), "failures": sum(failures.values()),
              "timeouts": sum(timeouts.values())}
    for key in ("rollout_log_probs", "token_version"):
        if out[key]:
            merged[key] = torch.cat(out[key])
    return merged
