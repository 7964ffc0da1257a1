"""Sequence packing: a padded batch's sequences laid end to end in a few rows, no padding between.

A GRPO batch is left-padded prompts followed by right-padded completions, so every row is as long
as the longest prompt plus the longest completion. When completion lengths are skewed (4 to 256
tokens), most of a padded forward is spent on padding. Packed, each sequence's real tokens are
copied into a row next to others (first-fit, longest first, rows no longer than the longest
sequence), its positions restart at 0, and attention never crosses a sequence boundary.

transformers builds that block-diagonal causal mask itself from position ids that restart
(``masking_utils.find_packed_sequence_indices``) when the 2-D attention mask is None AND no
key/value cache is passed: ``use_cache=False`` is required, or the mask silently becomes a plain
causal mask over the whole row (tests/algo/test_packing.py reproduces both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """Rows of packed sequences and where each response token sits in them.

    ``input_ids``/``position_ids`` are ``[R, C]``; a row's tail after its last sequence is filler
    (positions restarting at 0, so it is a sequence of its own that nothing reads). For every
    response token ``k`` of the padded batch, ``logit_row[k], logit_col[k]`` is the packed position
    whose logits predict it, ``target[k]`` its id, and ``out_row[k], out_col[k]`` its place in the
    padded ``[B, T]`` response layout.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    logit_row: torch.Tensor
    logit_col: torch.Tensor
    target: torch.Tensor
    out_row: torch.Tensor
    out_col: torch.Tensor
    shape: tuple[int, int]


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens: longest first, each
    into the first row with room (first-fit decreasing: at most 11/9 of the optimal row count + 1)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
         pad_id: int = 0) -> PackedBatch:
    """Pack a batch laid out as the rollout makes it: ``input_ids[:, :response_start]`` a
    left-padded prompt, the rest a right-padded response, ``attention_mask`` 1 on real tokens."""
    mask = attention_mask.bool()
    batch, width = input_ids.shape
    prompt_len = mask[:, :response_start].sum(-1).tolist()
    response_len = mask[:, response_start:].sum(-1).tolist()
    if min(prompt_len) < 1:
        raise ValueError("packing needs at least one prompt token per sequence (it predicts the first response token)")
    lengths = [p + r for p, r in zip(prompt_len, response_len)]
    capacity = max(lengths)
    rows = first_fit_rows(lengths, capacity)
    ids = torch.full((len(rows), capacity), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    pos = torch.zeros((len(rows), capacity), dtype=torch.long, device=input_ids.device)
    logit_row, logit_col, out_row, out_col = [], [], [], []
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            p, n = prompt_len[i], lengths[i]
            ids[r, offset:offset + n] = input_ids[i, response_start - p:response_start - p + n]
            pos[r, offset:offset + n] = torch.arange(n)
            # response token j (at packed offset + p + j) is predicted by the logits one before it
            m = n - p
            logit_row += [r] * m
            logit_col += range(offset + p - 1, offset + n - 1)
            out_row += [i] * m
            out_col += range(m)
            offset += n
        pos[r, offset:] = torch.arange(capacity - offset)
    device = input_ids.device
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    logit_row_t, logit_col_t = as_index(logit_row), as_index(logit_col)
    return PackedBatch(ids, pos, logit_row_t, logit_col_t, ids[logit_row_t, logit_col_t + 1],
                       as_index(out_row), as_index(out_col), (batch, width - response_start))


def unpack(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Per-response-token ``values`` (packed order) back in the padded ``[B, T]`` layout, zeros
    where the padded batch has no response token."""
    out = values.new_zeros(packed.shape)
    return out.index_put((packed.out_row, packed.out_col), values)


def padding_fraction(attention_mask: torch.Tensor) -> float:
    """The share of a padded batch's positions that hold no token (what packing saves)."""
    return 1.0 - attention_mask.float().mean().item()


def token_budget_groups(lengths: list[int], budget: int, packed: bool, parts: int = 1) -> list[list[int]]:
    """Sequence indices grouped into micro-batches that each cost at most ``budget`` tokens: the
    sum of their lengths when ``packed``, else their count times the longest (what a padded
    forward computes). Longest first, each group filled greedily, so similar lengths share a
    group; a sequence longer than ``budget`` is a group of its own. With ``parts`` > 1 (trainer
    ranks, one group each per micro-step) groups are split further until their number is a
    multiple of ``parts`` (always possible when ``len(lengths)`` is)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            cost = (sum(lengths[j] for j in group) + lengths[i] if packed
                    else (len(group) + 1) * max(lengths[group[0]], lengths[i]))
            if cost <= budget:
                group.append(i)
                continue
        groups.append([i])
    while len(groups) % parts:
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        if len(groups[largest]) < 2:
            raise ValueError(f"{len(lengths)} sequences cannot form a multiple of {parts} micro-batches")
        group = groups.pop(largest)
        groups[largest:largest] = [group[: len(group) // 2], group[len(group) // 2:]]
    return groups


def trim_padding(batch, prompt_keys: tuple[str, ...] = ("input_ids", "attention_mask")):
    """``batch`` (a TensorDict laid out as the rollout makes it) without the columns that are
    padding in every row: leading prompt columns and trailing response columns. Keys in
    ``prompt_keys`` span prompt + response; every other 2-D key is response-aligned (mask,
    log-probs). A micro-batch of short sequences then costs its own width, not the mini-batch's."""
    mask = batch["attention_mask"].bool()
    response = batch["response_mask"]
    width, resp_width = mask.shape[1], response.shape[1]
    start = width - resp_width
    used = mask[:, :start].any(0).nonzero()
    first = int(used[0]) if len(used) else start
    used = response.any(0).nonzero()
    last = int(used[-1]) + 1 if len(used) else 1
    out = batch.empty()
    for key, value in batch.items():
        if key in prompt_keys:
            out[key] = value[:, first:start + last]
        elif value.ndim == 2 and value.shape[1] == resp_width:
            out[key] = value[:, :last]
        else:
            out[key] = value
    return out
