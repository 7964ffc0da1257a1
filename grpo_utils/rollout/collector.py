"""The same rollout as :class:`~grpo_utils.rollout.group.GroupRollout`, through TorchRL's env and
collector: a ``ChatEnv`` whose ``DataLoadingPrimer`` repeats each prompt ``group_size`` times, a
``TransformersWrapper`` in history mode, and an ``LLMCollector`` yielding one batch per step.

Select it with ``rollout=collector``. It is the path to use when a run needs TorchRL env
machinery (env transforms, tools, multi-turn); it produces the same dense batch, so rewards,
advantages, losses and checkpoints are shared. It costs more per step than the default
``rollout=direct`` (see bench/RESULTS.md): the collector stacks and clones lazily stacked
histories on every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from grpo_utils.data.prompts import PromptStream
from grpo_utils.rollout.group import GroupRollout


class _StreamPrompts(IterableDataset):
    """Yields whole prompt batches from the rollout's ``PromptStream``, remembering the last."""

    def __init__(self, stream: PromptStream, prompt_format: str) -> None:
        self.stream = stream
        self.prompt_format = prompt_format
        self.last_rows: list[dict[str, Any]] = []

    def queries(self, rows: list[dict[str, Any]]) -> list[str]:
        return [self.prompt_format.format(**row) for row in rows]

    def __iter__(self):
        while True:
            self.last_rows = self.stream.next_batch()
            yield {"query": self.queries(self.last_rows)}


def make_grouped_env(dataloader: DataLoader, tokenizer, num_prompts: int, group_size: int,
                     system_prompt: str | None):
    """A ``ChatEnv`` of ``num_prompts * group_size`` envs fed by a ``DataLoadingPrimer`` that loads
    ``num_prompts`` prompts and repeats each ``group_size`` times, the repeats contiguous.

    Not ``DatasetChatEnv``: it hands its primer and its ``ChatEnv`` the same batch size, and with
    ``group_repeats=True`` the primer multiplies it by ``repeats`` once more (P*G*G rows). The
    primer must get P and the chat env P*G, so the two are composed here with public constructors.
    """
    from torchrl.envs import TransformedEnv
    from torchrl.envs.llm import ChatEnv
    from torchrl.envs.llm.transforms import DataLoadingPrimer

    base = ChatEnv(batch_size=(num_prompts * group_size,), tokenizer=tokenizer, input_mode="history",
                   system_prompt=system_prompt)
    primer = DataLoadingPrimer(dataloader=dataloader, repeats=group_size, group_repeats=True,
                               batch_size=(num_prompts,))
    return TransformedEnv(base, primer)


class CollectorRollout(GroupRollout):
    """:class:`GroupRollout` whose generation runs through ``LLMCollector`` over a primed ``ChatEnv``."""

    samples_log_probs = False  # the history-mode wrapper's log-probs are not kept
    needs_chat_template = True
    supports_vllm = False  # TorchRL's history-mode TransformersWrapper generates

    def __init__(self, model, tokenizer, renderer, reward_fn, gen_kwargs: dict[str, Any], group_size: int,
                 stream: PromptStream, shaping=None):
        super().__init__(model, tokenizer, renderer, reward_fn, gen_kwargs, group_size, stream, shaping=shaping)
        if not renderer.chat:
            raise ValueError("rollout=collector needs env.chat_template=true (ChatEnv renders chats)")
        self._gen_kwargs = dict(gen_kwargs)
        self._model = model
        self._source: _StreamPrompts | None = None
        self._batches = None
        self.collector = None

    def _build(self) -> None:
        # Built on first use, after a resume has positioned the stream.
        from torchrl.collectors.llm import LLMCollector
        from torchrl.modules.llm import TransformersWrapper

        position = self.stream.state_dict()
        self._source = _StreamPrompts(self.stream, self.renderer.prompt_format)
        num_prompts = self.stream.batch_size
        env = make_grouped_env(DataLoader(self._source, batch_size=None), self.tokenizer, num_prompts,
                               self.group_size, self.renderer.system_prompt)
        policy = TransformersWrapper(self._model, tokenizer=self.tokenizer, input_mode="history", generate=True,
                                     pad_output=True, return_log_probs=False, generate_kwargs=self._gen_kwargs)
        # reset_at_each_iter: every batch comes from a reset at the start of its own iteration, so
        # the env never holds prompts pulled ahead of training (which a checkpoint would skip).
        self.collector = LLMCollector(env, policy=policy, dialog_turns_per_batch=num_prompts * self.group_size,
                                      reset_at_each_iter=True)
        self._batches = iter(self.collector)
        # Building pulled a batch to infer the env's specs: rewind so no prompt is skipped.
        self.stream.load_state_dict(position)

    @torch.no_grad()
    def sample_groups(self) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._build()
        data = next(self._batches).squeeze(1)  # [P*G, 1] dialog turns -> [P*G]
        prompts = self._source.last_rows
        queries = data["query"]
        queries = queries.tolist() if hasattr(queries, "tolist") else list(queries)
        if queries != [q for q in self._source.queries(prompts) for _ in range(self.group_size)]:
            raise RuntimeError("the collector's prompts are not the stream's latest batch in group order")
        prompt = data["tokens", "prompt"]
        prompt_mask = data["masks", "all_attention_mask"][:, : prompt.shape[1]].long()
        rows = [row for row in prompts for _ in range(self.group_size)]
        return rows, prompt, prompt_mask, data["tokens", "response"]
