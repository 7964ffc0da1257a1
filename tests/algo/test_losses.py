"""Tests for grpo_utils.algo.losses against independent, loop-based reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from grpo_utils.algo.losses import (
    AGGREGATIONS,
    BatchNormalizer,
    ClippedSurrogateLoss,
    aggregate,
    build_loss,
    kl_penalty,
)

DTYPE = torch.float64
EPS_LOW, EPS_HIGH = 0.2, 0.28
MAX_LEN = 5  # Dr. GRPO constant for the hand-made batch
JUNK = 7.0  # padding value that would dominate any result if it leaked through the mask

# Two groups of three completions. Group 2 has equal rewards, so its advantages are exactly 0.
# Sequence 2 is empty, to check that zero-length sequences cause no NaN.
REWARDS = [[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]]
LENGTHS = [5, 3, 0, 4, 1, 2]
# log(pi / pi_old) per valid token: a mix of in-range ratios and ratios beyond both clip bounds.
LOG_RATIOS = [
    [0.0, 0.35, -0.4, 0.1, 0.24],
    [0.3, -0.3, 0.05],
    [],
    [0.5, -0.5, 0.2, 0.0],
    [-0.1],
    [0.4, -0.35],
]
OLD = [
    [-1.1, -0.4, -2.3, -0.9, -1.7],
    [-0.2, -3.1, -0.8],
    [],
    [-1.4, -0.6, -2.0, -0.3],
    [-2.6],
    [-0.5, -1.2],
]
REF_OFFSET = [  # log pi_ref - log pi_old
    [0.1, -0.2, 0.3, 0.0, -0.15],
    [-0.25, 0.2, 0.1],
    [],
    [0.05, 0.4, -0.3, 0.2],
    [0.15],
    [-0.1, 0.35],
]
ENTROPY = [
    [1.2, 0.8, 2.1, 0.3, 0.9],
    [1.5, 0.4, 0.7],
    [],
    [0.6, 1.9, 1.1, 0.2],
    [2.4],
    [0.5, 1.3],
]


def group_advantages(rewards: list[list[float]]) -> list[float]:
    """GRPO advantages: (r - group mean) / (group std + eps)."""
    out = []
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out.extend((r - mean) / (std + 1e-6) for r in group)
    return out


ADVANTAGES = group_advantages(REWARDS)


def padded(rows: list[list[float]], fill: float = JUNK) -> torch.Tensor:
    return torch.tensor([row + [fill] * (MAX_LEN - len(row)) for row in rows], dtype=DTYPE)


def make_batch() -> dict[str, torch.Tensor]:
    lp_rows = [[o + d for o, d in zip(o_row, d_row)] for o_row, d_row in zip(OLD, LOG_RATIOS)]
    ref_rows = [[o + d for o, d in zip(o_row, d_row)] for o_row, d_row in zip(OLD, REF_OFFSET)]
    return {
        "log_probs": padded(lp_rows).requires_grad_(),
        "old_log_probs": padded(OLD, fill=-30.0),
        "ref_log_probs": padded(ref_rows, fill=-30.0),
        "entropy": padded(ENTROPY, fill=1e6).requires_grad_(),
        "advantages": torch.tensor(ADVANTAGES, dtype=DTYPE),
        "mask": torch.tensor([[t < n for t in range(MAX_LEN)] for n in LENGTHS]),
    }


def reference(
    aggregation: str, kl_estimator: str | None, kl_coef: float, entropy_coef: float
) -> tuple[float, list[list[float]], list[list[float]]]:
    """Loss and gradients w.r.t. log_probs and entropy, from scalar formulas in plain loops."""
    num_tokens, num_seqs = sum(LENGTHS), len(LENGTHS)
    loss = 0.0
    grad_lp = [[0.0] * MAX_LEN for _ in LENGTHS]
    grad_ent = [[0.0] * MAX_LEN for _ in LENGTHS]
    for b, length in enumerate(LENGTHS):
        adv = ADVANTAGES[b]
        weight = {
            "token_mean": 1.0 / num_tokens,
            "seq_mean_token_mean": 1.0 / (max(length, 1) * num_seqs),
            "seq_mean_token_sum": 1.0 / num_seqs,
            "constant_sum": 1.0 / (MAX_LEN * num_seqs),
        }[aggregation]
        for t in range(length):
            ratio = math.exp(LOG_RATIOS[b][t])
            if adv > 0 and ratio > 1 + EPS_HIGH:
                value, grad = -(1 + EPS_HIGH) * adv, 0.0
            elif adv < 0 and ratio < 1 - EPS_LOW:
                value, grad = -(1 - EPS_LOW) * adv, 0.0
            else:
                value, grad = -ratio * adv, -ratio * adv
            if kl_estimator is not None:
                lp = OLD[b][t] + LOG_RATIOS[b][t]
                d = (OLD[b][t] + REF_OFFSET[b][t]) - lp  # log pi_ref - log pi
                kl, dkl = {
                    "k1": (-d, 1.0),
                    "k2": (0.5 * d * d, -d),
                    "k3": (math.exp(d) - d - 1, 1 - math.exp(d)),
                }[kl_estimator]
                value += kl_coef * kl
                grad += kl_coef * dkl
            value -= entropy_coef * ENTROPY[b][t]
            loss += weight * value
            grad_lp[b][t] = weight * grad
            grad_ent[b][t] = -weight * entropy_coef
    return loss, grad_lp, grad_ent


def make_loss(aggregation: str, **kwargs) -> ClippedSurrogateLoss:
    return ClippedSurrogateLoss(
        clip_eps_low=EPS_LOW,
        clip_eps_high=EPS_HIGH,
        aggregation=aggregation,
        constant_normalizer=MAX_LEN if aggregation == "constant_sum" else None,
        **kwargs,
    )


def test_batch_exercises_every_branch() -> None:
    """Guard the fixture: both clip sides, zero advantages and an empty sequence all occur."""
    assert all(a == 0.0 for a in ADVANTAGES[3:]) and ADVANTAGES[0] > 0 > ADVANTAGES[1]
    clipped_high = [r for r in LOG_RATIOS[0] if math.exp(r) > 1 + EPS_HIGH]
    clipped_low = [r for r in LOG_RATIOS[1] + LOG_RATIOS[2] if math.exp(r) < 1 - EPS_LOW]
    assert len(clipped_high) == 1 and len(clipped_low) == 1
    assert 0 in LENGTHS


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", [None, "k1", "k2", "k3"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_loss_and_gradients_match_reference(
    aggregation: str, kl_estimator: str | None, entropy_coef: float
) -> None:
    kl_coef = 0.0 if kl_estimator is None else 0.05
    loss_fn = make_loss(
        aggregation,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator or "k3",
        entropy_coef=entropy_coef,
    )
    batch = make_batch()
    out = loss_fn(
        batch["log_probs"],
        batch["old_log_probs"],
        batch["advantages"],
        batch["mask"],
        ref_log_probs=batch["ref_log_probs"] if kl_estimator else None,
        entropy=batch["entropy"],
        normalizer=BatchNormalizer.from_mask(batch["mask"]),
    )
    out.loss.backward()

    expected_loss, expected_grad_lp, expected_grad_ent = reference(
        aggregation, kl_estimator, kl_coef, entropy_coef
    )
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-12)
    torch.testing.assert_close(
        batch["log_probs"].grad, torch.tensor(expected_grad_lp, dtype=DTYPE), rtol=0, atol=1e-12
    )
    if entropy_coef == 0:
        assert batch["entropy"].grad is None  # logged only, not part of the graph
    else:
        torch.testing.assert_close(
            batch["entropy"].grad, torch.tensor(expected_grad_ent, dtype=DTYPE), rtol=0, atol=1e-12
        )


def test_metrics_are_detached_token_means() -> None:
    loss_fn = make_loss("token_mean", kl_coef=0.1, kl_estimator="k3")
    batch = make_batch()
    out = loss_fn(
        batch["log_probs"],
        batch["old_log_probs"],
        batch["advantages"],
        batch["mask"],
        ref_log_probs=batch["ref_log_probs"],
        entropy=batch["entropy"],
        normalizer=BatchNormalizer.from_mask(batch["mask"]),
    )
    tokens = [(b, t) for b, n in enumerate(LENGTHS) for t in range(n)]

    def mean(f) -> float:
        return sum(f(b, t) for b, t in tokens) / len(tokens)

    def k3(d: float) -> float:
        return math.exp(d) - d - 1

    expected = {
        "ratio/mean": mean(lambda b, t: math.exp(LOG_RATIOS[b][t])),
        "entropy": mean(lambda b, t: ENTROPY[b][t]),
        "kl_ref": mean(lambda b, t: k3(REF_OFFSET[b][t] - LOG_RATIOS[b][t])),
        "approx_kl_behaviour": mean(lambda b, t: k3(-LOG_RATIOS[b][t])),
        "clip_fraction/low": 1 / 15,
        "clip_fraction/high": 1 / 15,
        "clip_fraction": 2 / 15,
        # Normalized effective sample size of the ratios: (sum w)^2 / (n * sum w^2).
        "ess": mean(lambda b, t: math.exp(LOG_RATIOS[b][t])) ** 2
        / mean(lambda b, t: math.exp(2 * LOG_RATIOS[b][t])),
        # Token mean of the policy term only, i.e. the token_mean loss without the KL term.
        "loss/policy": reference("token_mean", None, 0.0, 0.0)[0],
    }
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        metric = out.metrics[name]
        assert metric.dim() == 0 and not metric.requires_grad, name
        assert metric.item() == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("splits", [[0, 3, 6], [0, 1, 4, 6]], ids=["2-micro", "3-micro"])
def test_micro_batches_sum_to_full_batch(aggregation: str, splits: list[int]) -> None:
    """Gradient accumulation with the whole-batch normalizer reproduces the full-batch step."""
    loss_fn = make_loss(aggregation, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)

    def run(bounds: list[int]) -> tuple[float, torch.Tensor, torch.Tensor]:
        batch = make_batch()
        normalizer = BatchNormalizer.from_mask(batch["mask"])
        total = 0.0
        for start, stop in zip(bounds[:-1], bounds[1:]):
            rows = slice(start, stop)
            out = loss_fn(
                batch["log_probs"][rows],
                batch["old_log_probs"][rows],
                batch["advantages"][rows],
                batch["mask"][rows],
                ref_log_probs=batch["ref_log_probs"][rows],
                entropy=batch["entropy"][rows],
                normalizer=normalizer,
            )
            out.loss.backward()
            total += out.loss.item()
        return total, batch["log_probs"].grad, batch["entropy"].grad

    full_loss, full_grad_lp, full_grad_ent = run([0, len(LENGTHS)])
    micro_loss, micro_grad_lp, micro_grad_ent = run(splits)
    assert full_grad_lp.abs().sum() > 0
    assert micro_loss == pytest.approx(full_loss, abs=1e-10)
    torch.testing.assert_close(micro_grad_lp, full_grad_lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(micro_grad_ent, full_grad_ent, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("clip_eps_high", "expected_high"), [(0.2, 2 / 9), (0.28, 1 / 9)])
def test_clip_fractions_on_constructed_case(clip_eps_high: float, expected_high: float) -> None:
    # Row 0 has A > 0, so only ratios above 1 + eps_high clip; row 1 has A < 0, so only ratios
    # below 1 - eps_low clip. Ratios past the *other* bound are not clipped. 9 valid tokens.
    ratios = [
        [1.5, 1.25, 0.5, 1.1, 1.0, 1.0],  # high-clipped: 1.5, and 1.25 only when eps_high < 0.25
        [0.5, 1.5, 0.9, 0.7, 0.6, 0.1],  # low-clipped: 0.5, 0.7, 0.6; last entry is padding
    ]
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 5 + [False]])
    old = torch.full((2, 6), -1.0, dtype=DTYPE)
    log_probs = (old + torch.tensor(ratios, dtype=DTYPE).log()).requires_grad_()
    advantages = torch.tensor([1.0, -1.0], dtype=DTYPE)
    loss_fn = ClippedSurrogateLoss(clip_eps_low=0.2, clip_eps_high=clip_eps_high)
    out = loss_fn(
        log_probs, old, advantages, mask, normalizer=BatchNormalizer.from_mask(mask)
    )
    assert out.metrics["clip_fraction/low"].item() == pytest.approx(3 / 9, abs=1e-12)
    assert out.metrics["clip_fraction/high"].item() == pytest.approx(expected_high, abs=1e-12)
    assert out.metrics["clip_fraction"].item() == pytest.approx(3 / 9 + expected_high, abs=1e-12)

    # Exactly the clipped (and padded) tokens receive no gradient.
    out.loss.backward()
    high_clipped = [True, clip_eps_high < 0.25, False, False, False, False]
    expected_zero = torch.tensor(
        [high_clipped, [True, False, False, True, True, True]]
    ) | ~mask
    assert torch.equal(log_probs.grad == 0, expected_zero)


@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_on_policy_gradient_is_minus_advantage_over_tokens(per_token_advantages: bool) -> None:
    batch = make_batch()
    log_probs = batch["old_log_probs"].clone().requires_grad_()
    mask = batch["mask"]
    if per_token_advantages:
        advantages = torch.linspace(-1.0, 1.5, mask.numel(), dtype=DTYPE).reshape(mask.shape)
    else:
        advantages = batch["advantages"]
    out = ClippedSurrogateLoss()(
        log_probs, batch["old_log_probs"], advantages, mask,
        normalizer=BatchNormalizer.from_mask(mask),
    )
    out.loss.backward()
    num_tokens = sum(LENGTHS)
    full_adv = advantages.expand(mask.shape) if per_token_advantages else advantages[:, None]
    expected_grad = torch.where(mask, -full_adv / num_tokens, 0.0)
    torch.testing.assert_close(log_probs.grad, expected_grad, rtol=0, atol=1e-14)
    # On-policy the loss is -sum(A) / N, which equals the sum of the expected gradient.
    assert out.loss.item() == pytest.approx(expected_grad.sum().item(), abs=1e-14)
    assert out.metrics["ratio/mean"].item() == 1.0
    assert out.metrics["clip_fraction"].item() == 0.0
    assert out.metrics["approx_kl_behaviour"].item() == 0.0


def test_non_finite_padding_does_not_leak() -> None:
    batch = make_batch()
    pad = ~batch["mask"]
    log_probs = batch["log_probs"].detach().masked_fill(pad, float("nan")).requires_grad_()
    entropy = batch["entropy"].detach().masked_fill(pad, float("inf")).requires_grad_()
    ref = batch["ref_log_probs"].masked_fill(pad, float("inf"))
    old = batch["old_log_probs"].masked_fill(pad, float("inf"))
    for aggregation in AGGREGATIONS:
        log_probs.grad = entropy.grad = None
        out = make_loss(aggregation, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)(
            log_probs, old, batch["advantages"], batch["mask"],
            ref_log_probs=ref, entropy=entropy,
            normalizer=BatchNormalizer.from_mask(batch["mask"]),
        )
        out.loss.backward()
        expected = reference(aggregation, "k3", 0.1, 0.01)[0]
        assert out.loss.item() == pytest.approx(expected, abs=1e-12)
        assert torch.isfinite(log_probs.grad).all() and (log_probs.grad[pad] == 0).all()
        assert torch.isfinite(entropy.grad).all() and (entropy.grad[pad] == 0).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_sequences_give_zero_not_nan(aggregation: str) -> None:
    batch = make_batch()
    rows = slice(2, 3)  # the zero-length sequence alone, as its own micro-batch
    loss_fn = make_loss(aggregation, kl_coef=0.1, entropy_coef=0.01)
    for normalizer in (BatchNormalizer.from_mask(batch["mask"]),
                       BatchNormalizer.from_mask(batch["mask"][rows])):
        out = loss_fn(
            batch["log_probs"][rows], batch["old_log_probs"][rows], batch["advantages"][rows],
            batch["mask"][rows], ref_log_probs=batch["ref_log_probs"][rows],
            entropy=batch["entropy"][rows], normalizer=normalizer,
        )
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert (batch["log_probs"].grad == 0).all()
        assert all(v.item() == 0.0 for v in out.metrics.values())


def test_aggregate_uses_given_normalizer_not_local_counts() -> None:
    per_token = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], dtype=DTYPE)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    normalizer = BatchNormalizer(num_tokens=10.0, num_sequences=4.0)
    assert aggregate(per_token, mask, "token_mean", normalizer).item() == pytest.approx(0.6)
    assert aggregate(per_token, mask, "seq_mean_token_mean", normalizer).item() == pytest.approx(
        (1.5 + 3.0) / 4
    )
    assert aggregate(per_token, mask, "seq_mean_token_sum", normalizer).item() == pytest.approx(1.5)
    assert aggregate(
        per_token, mask, "constant_sum", normalizer, constant=3.0
    ).item() == pytest.approx(0.5)


def test_kl_penalty_formulas() -> None:
    log_probs = torch.tensor([-1.0, -0.5, -2.0], dtype=DTYPE)
    ref = torch.tensor([-1.5, -0.5, -1.0], dtype=DTYPE)
    d = [-0.5, 0.0, 1.0]  # ref - log_probs
    expected = {
        "k1": [-x for x in d],
        "k2": [0.5 * x * x for x in d],
        "k3": [math.exp(x) - x - 1 for x in d],
    }
    for estimator, values in expected.items():
        torch.testing.assert_close(
            kl_penalty(log_probs, ref, estimator), torch.tensor(values, dtype=DTYPE)
        )


def test_batch_normalizer_from_mask() -> None:
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    assert BatchNormalizer.from_mask(mask) == BatchNormalizer(num_tokens=5.0, num_sequences=3.0)
    with pytest.raises(ValueError, match="num_tokens"):
        BatchNormalizer(num_tokens=-1.0, num_sequences=1.0)
    with pytest.raises(ValueError, match="mask"):
        BatchNormalizer.from_mask(mask.long())


def test_needs_reference() -> None:
    assert not ClippedSurrogateLoss().needs_reference
    assert ClippedSurrogateLoss(kl_coef=0.01).needs_reference
    assert ClippedSurrogateLoss(entropy_coef=0.01).needs_entropy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"aggregation": "mean"}, "aggregation='mean'"),
        ({"kl_estimator": "k4"}, "kl_estimator='k4'"),
        ({"clip_eps_low": -0.1}, "clip_eps_low"),
        ({"clip_eps_high": float("nan")}, "clip_eps_high"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"entropy_coef": -0.1}, "entropy_coef"),
        ({"aggregation": "constant_sum"}, "constant_normalizer"),
        ({"aggregation": "constant_sum", "constant_normalizer": 0}, "constant_normalizer"),
    ],
)
def test_bad_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        ClippedSurrogateLoss(**kwargs)
    if field.startswith("aggregation="):
        assert "token_mean" in str(info.value)  # lists the allowed values


def test_missing_inputs_and_bad_shapes_raise() -> None:
    batch = make_batch()
    args = (batch["log_probs"], batch["old_log_probs"], batch["advantages"], batch["mask"])
    normalizer = BatchNormalizer.from_mask(batch["mask"])
    with pytest.raises(ValueError, match="ref_log_probs"):
        ClippedSurrogateLoss(kl_coef=0.1)(*args, normalizer=normalizer)
    with pytest.raises(ValueError, match="entropy"):
        ClippedSurrogateLoss(entropy_coef=0.1)(*args, normalizer=normalizer)
    with pytest.raises(ValueError, match="advantages"):
        ClippedSurrogateLoss()(*args[:2], batch["advantages"][:3], args[3], normalizer=normalizer)
    with pytest.raises(ValueError, match="mask"):
        ClippedSurrogateLoss()(*args[:3], batch["mask"].double(), normalizer=normalizer)
    with pytest.raises(ValueError, match="aggregation='sum'"):
        aggregate(batch["log_probs"], batch["mask"], "sum", normalizer)
    with pytest.raises(ValueError, match="kl_estimator='k5'"):
        kl_penalty(batch["log_probs"], batch["ref_log_probs"], "k5")


def test_build_loss() -> None:
    cfg = {"clip_eps_high": 0.28, "aggregation": "constant_sum", "constant_normalizer": 512}
    for config in (cfg, OmegaConf.create(cfg)):
        loss_fn = build_loss(config)
        assert isinstance(loss_fn, ClippedSurrogateLoss)
        assert (loss_fn.clip_eps_high, loss_fn.aggregation) == (0.28, "constant_sum")
        assert loss_fn.constant_normalizer == 512
    targeted = build_loss({"_target_": "grpo_utils.algo.losses.ClippedSurrogateLoss", "kl_coef": 0.1})
    assert isinstance(targeted, ClippedSurrogateLoss) and targeted.needs_reference
    with pytest.raises(ValueError, match="clip_eps"):
        build_loss({"clip_eps": 0.2})
