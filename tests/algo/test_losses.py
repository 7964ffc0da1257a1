"""grpo_utils.algo.losses, the GRPO loss family and its presets in config/loss/, against
independent loop-based references.

Every expected loss and gradient here is written out in plain Python from the papers' formulas;
none of grpo_utils' helpers (advantages, aggregation, KL) is used to compute an expectation.
The rollout-level DAPO parts (grpo_utils.algo.shaping) are in test_shaping.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from omegaconf import OmegaConf

from grpo_utils.algo.losses import (
    AGGREGATIONS,
    BatchNormalizer,
    CISPOLoss,
    ClippedSurrogateLoss,
    GSPOLoss,
    PolicyGradientLoss,
    aggregate,
    build_loss,
    kl_penalty,
    kl_reward_penalty,
    metrics_from_sums,
)
from grpo_utils.algo.shaping import RolloutShaping
from tests.helpers import CONFIG

DTYPE = torch.float64
T = 5  # padded width, and the Dr. GRPO constant (generation.max_new_tokens) in these tests
JUNK = 7.0  # padding value that would dominate any result if it leaked through the mask

# Three groups of three. Group 2 has equal rewards; sequence 2 is empty.
REWARDS = [[1.0, 0.0, 0.5], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
G = 3
LENGTHS = [5, 3, 0, 4, 1, 2, 3, 5, 2]
OLD = [
    [-1.1, -0.4, -2.3, -0.9, -1.7],
    [-0.2, -3.1, -0.8],
    [],
    [-1.4, -0.6, -2.0, -0.3],
    [-2.6],
    [-0.5, -1.2],
    [-0.7, -1.9, -0.25],
    [-2.2, -0.15, -1.05, -0.6, -3.0],
    [-0.45, -1.6],
]
# Token-level log(pi / pi_old): in-range values and values past 1 - 0.2 and 1 + 0.28 on both
# advantage signs.
LOG_RATIOS = [
    [0.0, 0.35, -0.4, 0.1, 0.24],
    [0.3, -0.3, 0.05],
    [],
    [0.5, -0.5, 0.2, 0.0],
    [-0.1],
    [0.4, -0.35],
    [0.3, -0.25, 0.1],
    [-0.4, 0.26, 0.0, -0.1, 0.15],
    [-0.05, 0.2],
]
# GSPO: per-sequence mean log-ratios around its 3e-4 / 4e-4 clip range, plus a zero-mean wiggle.
GSPO_MEANS = [6e-4, -5e-4, 0.0, 2e-4, -1e-4, 3e-3, 6e-4, -5e-4, 1e-4]
WIGGLE = [0.02, -0.03, 0.01, 0.015, -0.015]
GSPO_LOG_RATIOS = [
    [m + w - sum(WIGGLE[:n]) / n for w in WIGGLE[:n]] if n else []
    for m, n in zip(GSPO_MEANS, LENGTHS)
]
REF_OFFSET = [  # log pi_ref - log pi_old
    [0.1, -0.2, 0.3, 0.0, -0.15],
    [-0.25, 0.2, 0.1],
    [],
    [0.05, 0.4, -0.3, 0.2],
    [0.15],
    [-0.1, 0.35],
    [0.2, -0.05, 0.0],
    [-0.3, 0.1, 0.25, -0.2, 0.05],
    [0.12, -0.08],
]
ENTROPY = [
    [1.2, 0.8, 2.1, 0.3, 0.9],
    [1.5, 0.4, 0.7],
    [],
    [0.6, 1.9, 1.1, 0.2],
    [2.4],
    [0.5, 1.3],
    [0.9, 1.4, 0.1],
    [0.3, 0.6, 1.7, 2.2, 0.8],
    [1.0, 0.45],
]
ROLL_GAP = [  # log pi_old - log pi_rollout: the inference/training mismatch
    [0.01, 0.5, -0.2, 0.0, 0.3],
    [-0.1, 0.05, 0.45],
    [],
    [0.02, -0.03, 0.6, 0.1],
    [0.8],
    [0.0, -0.4],
    [0.5, 0.6, 0.3],
    [0.05, -0.05, 0.1, 0.02, 0.0],
    [0.35, 0.1],
]
IS_CAP, IS_THRESHOLD = 1.5, 1.3

# The first two groups alone (six sequences, 15 tokens), under DAPO's clip range: the batch of
# the ClippedSurrogateLoss tests below. Its group 2 has equal rewards (advantages exactly 0) and
# its sequence 2 is empty.
TWO_GROUPS = 6
TWO_GROUP_LENGTHS = LENGTHS[:TWO_GROUPS]
EPS_LOW, EPS_HIGH = 0.2, 0.28

PRESETS = ["grpo", "grpo_clip", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce",
           "reinforce_baseline"]
KIND = {"ClippedSurrogateLoss": "clip", "PolicyGradientLoss": "pg", "GSPOLoss": "gspo",
        "CISPOLoss": "cispo"}


# ----------------------------------------------------------------------------- references


def advantages(estimator: str, scale: str, groups: list[list[float]] = REWARDS,
               eps: float = 1e-6) -> list[float]:
    flat = [r for group in groups for r in group]
    batch_mean = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in flat) / (len(flat) - 1))
    out = []
    for group in groups:
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        for i, r in enumerate(group):
            if estimator == "none":
                out.append(r)
                continue
            if estimator == "rloo":
                centered = r - sum(x for j, x in enumerate(group) if j != i) / (G - 1)
            else:
                centered = r - mean
            if max(group) == min(group):
                centered = 0.0
            divisor = {"group_std": std + eps, "batch_std": batch_std + eps, "none": 1.0}[scale]
            out.append(centered / divisor if centered else 0.0)
    return out


def token_weight(aggregation: str, n: int, lengths: list[int], constant: float = T) -> float:
    num_tokens, num_seqs = sum(lengths), len(lengths)
    return {
        "token_mean": 1.0 / num_tokens,
        "seq_mean_token_mean": 1.0 / (max(n, 1) * num_seqs),
        "seq_mean_token_sum": 1.0 / num_seqs,
        "constant_sum": 1.0 / (constant * num_seqs),
    }[aggregation]


def is_weight(w: float, mode: str | None) -> float:
    if mode is None:
        return 1.0
    if mode == "truncate":
        return min(w, IS_CAP)
    return w if w <= IS_THRESHOLD else 0.0


def kl_value_and_grad(estimator: str, d: float) -> tuple[float, float]:
    """KL estimate with d = log q - log pi, and its derivative with respect to log pi."""
    return {
        "k1": (-d, 1.0),
        "k2": (0.5 * d * d, -d),
        "k3": (math.exp(d) - d - 1, 1 - math.exp(d)),
    }[estimator]


def reference(kind: str, adv: list[float], aggregation: str, *, log_ratios=LOG_RATIOS,
              eps_low: float = 0.2, eps_high: float = 0.2, kl: tuple[str, float] | None = None,
              behaviour_kl: tuple[str, float] | None = None, entropy_coef: float = 0.0,
              is_mode: str | None = None) -> tuple[float, list[list[float]]]:
    """Loss and d loss / d log_probs, sequence by sequence and token by token, over the first
    len(adv) sequences (all of them, or the two-group batch)."""
    lengths = LENGTHS[:len(adv)]
    loss = 0.0
    grad = [[0.0] * T for _ in lengths]
    low, high = 1 - eps_low, 1 + eps_high
    for b, n in enumerate(lengths):
        a = adv[b]
        w = token_weight(aggregation, n, lengths)
        if kind == "gspo" and n:
            # GSPO: s = exp(mean_t log ratio); one clipped term per sequence, counted once per
            # token by the aggregation (so weight w * n); d s / d logp_t = s / n.
            s = math.exp(sum(log_ratios[b]) / n)
            if a > 0 and s > high:
                value, dvalue = -high * a, 0.0
            elif a < 0 and s < low:
                value, dvalue = -low * a, 0.0
            else:
                value, dvalue = -s * a, -a
            iw = is_weight(math.exp(sum(ROLL_GAP[b]) / n), is_mode)
            loss += w * n * iw * value
            for t in range(n):
                grad[b][t] += w * n * iw * dvalue * s / n
        for t in range(n):
            lr = log_ratios[b][t]
            lp = OLD[b][t] + lr
            r = math.exp(lr)
            value = g = 0.0
            if kind == "clip":
                if a > 0 and r > high:
                    value, g = -high * a, 0.0
                elif a < 0 and r < low:
                    value, g = -low * a, 0.0
                else:
                    value, g = -r * a, -r * a
            elif kind == "pg":
                value, g = -a * lp, -a
            elif kind == "cispo":
                c = min(max(r, low), high)
                value, g = -c * a * lp, -c * a
            if kind != "gspo":
                iw = is_weight(math.exp(ROLL_GAP[b][t]), is_mode)
                value, g = iw * value, iw * g
            if kl is not None:
                kv, kg = kl_value_and_grad(kl[0], (OLD[b][t] + REF_OFFSET[b][t]) - lp)
                value, g = value + kl[1] * kv, g + kl[1] * kg
            if behaviour_kl is not None:
                kv, kg = kl_value_and_grad(behaviour_kl[0], OLD[b][t] - lp)
                value, g = value + behaviour_kl[1] * kv, g + behaviour_kl[1] * kg
            value -= entropy_coef * ENTROPY[b][t]
            loss += w * value
            grad[b][t] += w * g
    return loss, grad


TWO_GROUP_ADV = advantages("grpo", "group_std", REWARDS[:2])


def clip_reference(aggregation: str, kl_estimator: str | None, kl_coef: float, entropy_coef: float
                   ) -> tuple[float, list[list[float]], list[list[float]]]:
    """The two-group batch under ClippedSurrogateLoss with DAPO's clip range: the loss and its
    gradients with respect to log_probs and entropy."""
    kl = None if kl_estimator is None else (kl_estimator, kl_coef)
    loss, grad_lp = reference("clip", TWO_GROUP_ADV, aggregation, eps_low=EPS_LOW, eps_high=EPS_HIGH, kl=kl,
                              entropy_coef=entropy_coef)
    grad_ent = [[0.0] * T for _ in TWO_GROUP_LENGTHS]
    for b, n in enumerate(TWO_GROUP_LENGTHS):
        for t in range(n):
            grad_ent[b][t] = -token_weight(aggregation, n, TWO_GROUP_LENGTHS) * entropy_coef
    return loss, grad_lp, grad_ent


# ----------------------------------------------------------------------------- fixtures


def padded(rows: list[list[float]], fill: float = JUNK) -> torch.Tensor:
    return torch.tensor([row + [fill] * (T - len(row)) for row in rows], dtype=DTYPE)


def make_batch(log_ratios=LOG_RATIOS, adv: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The batch of the first len(adv) sequences (all of them by default)."""
    adv = adv if adv is not None else advantages("grpo", "group_std")
    rows = len(adv)
    old, log_ratios, ref_offset = OLD[:rows], log_ratios[:rows], REF_OFFSET[:rows]

    def plus(a_rows, b_rows):
        return [[x + y for x, y in zip(a, b)] for a, b in zip(a_rows, b_rows)]

    return {
        "log_probs": padded(plus(old, log_ratios)).requires_grad_(),
        "old_log_probs": padded(old, fill=-30.0),
        "ref_log_probs": padded(plus(old, ref_offset), fill=-30.0),
        "rollout_log_probs": padded(plus(old, [[-g for g in row] for row in ROLL_GAP[:rows]]), fill=5.0),
        "entropy": padded(ENTROPY[:rows], fill=1e6).requires_grad_(),
        "advantages": torch.tensor(adv, dtype=DTYPE),
        "mask": torch.tensor([[t < n for t in range(T)] for n in LENGTHS[:rows]]),
    }


def two_group_batch() -> dict[str, torch.Tensor]:
    return make_batch(adv=TWO_GROUP_ADV)


def run(loss_fn, batch, rows=slice(None), *, ref=True, rollout=False, normalizer=None):
    return loss_fn(
        batch["log_probs"][rows], batch["old_log_probs"][rows], batch["advantages"][rows],
        batch["mask"][rows],
        ref_log_probs=batch["ref_log_probs"][rows] if ref else None,
        entropy=batch["entropy"][rows],
        normalizer=normalizer or BatchNormalizer.from_mask(batch["mask"]),
        rollout_log_probs=batch["rollout_log_probs"][rows] if rollout else None,
    )


@functools.cache
def composed(name: str) -> dict:
    """The quick-start config with ``loss=<name>``, composed by Hydra as a recipe would (resolved)."""
    from hydra import compose, initialize_config_dir

    import grpo_utils.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONFIG), version_base="1.3"):
        cfg = compose("grpo_quickstart", overrides=[f"loss={name}", f"generation.max_new_tokens={T}"])
    return OmegaConf.to_container(cfg, resolve=True)


def preset(name: str) -> dict:
    """The ``loss`` section of the composed preset; its advantage and shaping are in ``composed``."""
    return dict(composed(name)["loss"])


def build(name: str, **overrides):
    return build_loss({**preset(name), **overrides})


def objective_args(loss_fn) -> dict:
    kind = KIND[type(loss_fn).__name__]
    args = {"log_ratios": GSPO_LOG_RATIOS if kind == "gspo" else LOG_RATIOS}
    if kind != "pg":
        args.update(eps_low=loss_fn.clip_eps_low, eps_high=loss_fn.clip_eps_high)
    return {"kind": kind, **args}


def assert_matches(out, batch, expected_loss, expected_grad) -> None:
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-12)
    torch.testing.assert_close(batch["log_probs"].grad, torch.tensor(expected_grad, dtype=DTYPE),
                               rtol=0, atol=1e-12)


def clipped_loss(aggregation: str, **kwargs) -> ClippedSurrogateLoss:
    """ClippedSurrogateLoss with DAPO's clip range (and T as the Dr. GRPO constant)."""
    return ClippedSurrogateLoss(
        clip_eps_low=EPS_LOW,
        clip_eps_high=EPS_HIGH,
        aggregation=aggregation,
        constant_normalizer=T if aggregation == "constant_sum" else None,
        **kwargs,
    )


# ----------------------------------------------------------------------------- ClippedSurrogateLoss


def test_batch_exercises_every_branch() -> None:
    """Guard the fixture: both clip sides, zero advantages and an empty sequence all occur."""
    assert all(a == 0.0 for a in TWO_GROUP_ADV[3:]) and TWO_GROUP_ADV[0] > 0 > TWO_GROUP_ADV[1]
    clipped_high = [r for r in LOG_RATIOS[0] if math.exp(r) > 1 + EPS_HIGH]
    clipped_low = [r for r in LOG_RATIOS[1] + LOG_RATIOS[2] if math.exp(r) < 1 - EPS_LOW]
    assert len(clipped_high) == 1 and len(clipped_low) == 1
    assert 0 in TWO_GROUP_LENGTHS


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", [None, "k1", "k2", "k3"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_loss_and_gradients_match_reference(
    aggregation: str, kl_estimator: str | None, entropy_coef: float
) -> None:
    kl_coef = 0.0 if kl_estimator is None else 0.05
    loss_fn = clipped_loss(
        aggregation,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator or "k3",
        entropy_coef=entropy_coef,
    )
    batch = two_group_batch()
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

    expected_loss, expected_grad_lp, expected_grad_ent = clip_reference(
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
    loss_fn = clipped_loss("token_mean", kl_coef=0.1, kl_estimator="k3")
    batch = two_group_batch()
    out = loss_fn(
        batch["log_probs"],
        batch["old_log_probs"],
        batch["advantages"],
        batch["mask"],
        ref_log_probs=batch["ref_log_probs"],
        entropy=batch["entropy"],
        normalizer=BatchNormalizer.from_mask(batch["mask"]),
    )
    tokens = [(b, t) for b, n in enumerate(TWO_GROUP_LENGTHS) for t in range(n)]

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
        "loss/policy": clip_reference("token_mean", None, 0.0, 0.0)[0],
    }
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        metric = out.metrics[name]
        assert metric.dim() == 0 and not metric.requires_grad, name
        assert metric.item() == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("loss_fn", [ClippedSurrogateLoss(is_correction="truncate", is_cap=IS_CAP),
                                     GSPOLoss(is_correction="mask", is_mask_threshold=IS_THRESHOLD)],
                         ids=["clip", "gspo"])
def test_the_sums_of_parts_give_the_whole_batch_metrics(loss_fn) -> None:
    """What trainer ranks do with a micro-batch split among them: the parts' ``sums`` added up give
    every metric of the whole (ragged) batch, where averaging the parts' metrics would not."""
    batch = make_batch(GSPO_LOG_RATIOS) if isinstance(loss_fn, GSPOLoss) else make_batch()
    whole = run(loss_fn, batch, rollout=True)
    parts = [run(loss_fn, batch, slice(a, b), rollout=True) for a, b in ((0, 2), (2, 5), (5, 9))]
    added = {k: sum(p.sums[k] for p in parts) for k in whole.sums}
    combined = metrics_from_sums(added)
    assert combined.keys() == whole.metrics.keys() >= {"loss/policy", "entropy", "kl_ref", "ess", "mismatch_ess",
                                                      "is_weight/mean", "clip_fraction"}
    for key, value in whole.metrics.items():
        assert combined[key].item() == pytest.approx(value.item(), abs=1e-12), key
    averaged = {k: sum(p.metrics[k] for p in parts) / len(parts) for k in whole.metrics}
    assert any(abs(averaged[k] - whole.metrics[k]) > 1e-3 for k in ("entropy", "loss/policy"))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("splits", [[0, 3, 6], [0, 1, 4, 6]], ids=["2-micro", "3-micro"])
def test_clipped_micro_batches_sum_to_full_batch(aggregation: str, splits: list[int]) -> None:
    """Gradient accumulation with the whole-batch normalizer reproduces the full-batch step."""
    loss_fn = clipped_loss(aggregation, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)

    def run(bounds: list[int]) -> tuple[float, torch.Tensor, torch.Tensor]:
        batch = two_group_batch()
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

    full_loss, full_grad_lp, full_grad_ent = run([0, len(TWO_GROUP_LENGTHS)])
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
    batch = two_group_batch()
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
    num_tokens = sum(TWO_GROUP_LENGTHS)
    full_adv = advantages.expand(mask.shape) if per_token_advantages else advantages[:, None]
    expected_grad = torch.where(mask, -full_adv / num_tokens, 0.0)
    torch.testing.assert_close(log_probs.grad, expected_grad, rtol=0, atol=1e-14)
    # On-policy the loss is -sum(A) / N, which equals the sum of the expected gradient.
    assert out.loss.item() == pytest.approx(expected_grad.sum().item(), abs=1e-14)
    assert out.metrics["ratio/mean"].item() == 1.0
    assert out.metrics["clip_fraction"].item() == 0.0
    assert out.metrics["approx_kl_behaviour"].item() == 0.0


def test_clipped_non_finite_padding_does_not_leak() -> None:
    batch = two_group_batch()
    pad = ~batch["mask"]
    log_probs = batch["log_probs"].detach().masked_fill(pad, float("nan")).requires_grad_()
    entropy = batch["entropy"].detach().masked_fill(pad, float("inf")).requires_grad_()
    ref = batch["ref_log_probs"].masked_fill(pad, float("inf"))
    old = batch["old_log_probs"].masked_fill(pad, float("inf"))
    for aggregation in AGGREGATIONS:
        log_probs.grad = entropy.grad = None
        out = clipped_loss(aggregation, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)(
            log_probs, old, batch["advantages"], batch["mask"],
            ref_log_probs=ref, entropy=entropy,
            normalizer=BatchNormalizer.from_mask(batch["mask"]),
        )
        out.loss.backward()
        expected = clip_reference(aggregation, "k3", 0.1, 0.01)[0]
        assert out.loss.item() == pytest.approx(expected, abs=1e-12)
        assert torch.isfinite(log_probs.grad).all() and (log_probs.grad[pad] == 0).all()
        assert torch.isfinite(entropy.grad).all() and (entropy.grad[pad] == 0).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_sequences_give_zero_not_nan(aggregation: str) -> None:
    batch = two_group_batch()
    rows = slice(2, 3)  # the zero-length sequence alone, as its own micro-batch
    loss_fn = clipped_loss(aggregation, kl_coef=0.1, entropy_coef=0.01)
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
    batch = two_group_batch()
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


# ----------------------------------------------------------------------------- presets


PAPER_SETTINGS = {
    # name: (class, clip_eps_low, clip_eps_high, aggregation, advantage estimator, scale)
    "grpo": (ClippedSurrogateLoss, 0.2, 0.2, "token_mean", "grpo", "group_std"),
    "grpo_clip": (ClippedSurrogateLoss, 0.2, 0.2, "token_mean", "grpo", "group_std"),
    "dr_grpo": (ClippedSurrogateLoss, 0.2, 0.2, "constant_sum", "grpo", "none"),
    "dapo": (ClippedSurrogateLoss, 0.2, 0.28, "token_mean", "grpo", "group_std"),
    "gspo": (GSPOLoss, 3e-4, 4e-4, "seq_mean_token_mean", "grpo", "group_std"),
    "cispo": (CISPOLoss, 1.0, 0.28, "token_mean", "grpo", "group_std"),
    "rloo": (PolicyGradientLoss, None, None, "seq_mean_token_sum", "rloo", "none"),
    "reinforce": (PolicyGradientLoss, None, None, "seq_mean_token_sum", "none", "none"),
    "reinforce_baseline": (PolicyGradientLoss, None, None, "seq_mean_token_sum", "grpo", "none"),
}
PAPER_NAMES = {"grpo": "GRPO", "grpo_clip": "GRPO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO",
               "gspo": "GSPO", "cispo": "CISPO", "rloo": "RLOO", "reinforce": "REINFORCE",
               "reinforce_baseline": "REINFORCE"}


def test_every_preset_is_tested() -> None:
    assert sorted(p.stem for p in (CONFIG / "loss").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_file_format_and_paper_settings(name: str) -> None:
    """A preset names its paper first, its class with ``_target_``, and only keys of that class;
    the composed ``loss`` section has exactly the class's keys (the rest come from the class's
    schema), and the advantage and shaping stages are the paper's."""
    lines = (CONFIG / "loss" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# ") and PAPER_NAMES[name] in lines[1] + lines[2]
    assert any(str(year) in lines[1] for year in (1992, 2024, 2025))
    cls, low, high, aggregation, estimator, scale = PAPER_SETTINGS[name]
    own = OmegaConf.load(CONFIG / "loss" / f"{name}.yaml").get("loss", {})
    assert set(own) <= {"_target_", *cls.config_keys()}, name
    assert own.get("_target_", f"{cls.__module__}.{cls.__name__}") == f"{cls.__module__}.{cls.__name__}"
    cfg = composed(name)
    assert sorted(cfg["loss"]) == sorted(["_target_", *cls.config_keys()]), name
    loss_fn = build(name)
    assert type(loss_fn) is cls
    assert (loss_fn.aggregation, cfg["advantage"]["estimator"], cfg["advantage"]["scale"]) == (
        aggregation, estimator, scale)
    if low is not None:
        assert (loss_fn.clip_eps_low, loss_fn.clip_eps_high) == (low, high)
    assert loss_fn.kl_coef == 0.0 and loss_fn.entropy_coef == 0.0
    assert loss_fn.is_correction == "none"
    if name == "dr_grpo":
        assert loss_fn.constant_normalizer == T  # ${generation.max_new_tokens}
    shaping = RolloutShaping(**cfg["shaping"])
    if name == "dapo":
        assert shaping.dynamic_sampling and shaping.overlong_penalty == 1.0
    else:
        assert shaping == RolloutShaping()


def test_grpo_clip_is_grpo() -> None:
    assert composed("grpo_clip") == composed("grpo")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_compose_through_hydra(name: str) -> None:
    from hydra import compose, initialize_config_dir

    from grpo_utils.build import loss as make_loss

    with initialize_config_dir(config_dir=str(CONFIG), version_base="1.3"):
        cfg = compose("grpo_quickstart", overrides=[f"loss={name}"])
    loss_fn = make_loss(cfg.loss)
    assert type(loss_fn) is PAPER_SETTINGS[name][0]
    if name == "dr_grpo":
        assert loss_fn.constant_normalizer == cfg.generation.max_new_tokens


# ----------------------------------------------------------------------------- objectives


def test_fixture_exercises_every_branch() -> None:
    adv = advantages("grpo", "group_std")
    assert adv[0] > 0 > adv[1] and adv[7] > 0 > adv[6] and all(a == 0 for a in adv[3:6])
    ratios = [(adv[b], math.exp(x)) for b, row in enumerate(LOG_RATIOS) for x in row]
    assert any(a > 0 and r > 1.28 for a, r in ratios) and any(a < 0 and r < 0.8 for a, r in ratios)
    assert any(a < 0 and r > 1.28 for a, r in ratios) and any(a > 0 and r < 0.8 for a, r in ratios)
    seq = [(adv[b], math.exp(sum(row) / len(row))) for b, row in enumerate(GSPO_LOG_RATIOS) if row]
    assert any(a > 0 and s > 1 + 4e-4 for a, s in seq)
    assert any(a < 0 and s < 1 - 3e-4 for a, s in seq)
    assert any(a < 0 and 1 - 3e-4 < s < 1 + 4e-4 for a, s in seq)
    gaps = [math.exp(g) for row in ROLL_GAP for g in row]
    assert any(w > IS_CAP for w in gaps) and any(IS_THRESHOLD < w <= IS_CAP for w in gaps)
    assert 0 in LENGTHS


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", PRESETS)
def test_objective_loss_and_gradient(name: str, aggregation: str) -> None:
    """Each preset's objective, on the advantages its paper uses, under every aggregation."""
    adv = advantages(composed(name)["advantage"]["estimator"], composed(name)["advantage"]["scale"])
    loss_fn = build(name, aggregation=aggregation, constant_normalizer=T)
    args = objective_args(loss_fn)
    batch = make_batch(args["log_ratios"], adv)
    out = run(loss_fn, batch, ref=False)
    assert_matches(out, batch, *reference(adv=adv, aggregation=aggregation, **args))


@pytest.mark.parametrize("is_mode", [None, "truncate", "mask"])
@pytest.mark.parametrize("name", ["dapo", "gspo", "cispo", "rloo"])
def test_shared_terms_on_every_objective(name: str, is_mode: str | None) -> None:
    """KL to the reference and to the behaviour policy (k3), entropy, and IS correction."""
    cfg = preset(name)
    adv = advantages(composed(name)["advantage"]["estimator"], composed(name)["advantage"]["scale"])
    loss_fn = build(name, kl_coef=0.05, kl_estimator="k3", kl_in="loss", entropy_coef=0.01,
                    behaviour_kl_coef=0.02, is_correction=is_mode or "none", is_cap=IS_CAP,
                    is_mask_threshold=IS_THRESHOLD)
    args = objective_args(loss_fn)
    batch = make_batch(args["log_ratios"], adv)
    out = run(loss_fn, batch, rollout=True)
    # kl_estimator serves both KL terms; test_behaviour_kl_estimators covers k1 and k2.
    expected = reference(adv=adv, aggregation=cfg["aggregation"], kl=("k3", 0.05),
                         behaviour_kl=("k3", 0.02), entropy_coef=0.01, is_mode=is_mode, **args)
    assert_matches(out, batch, *expected)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_behaviour_kl_estimators(estimator: str) -> None:
    adv = advantages("grpo", "group_std")
    loss_fn = CISPOLoss(clip_eps_low=0.2, behaviour_kl_coef=0.3, kl_estimator=estimator)
    batch = make_batch(adv=adv)
    expected = reference("cispo", adv, "token_mean", eps_low=0.2, eps_high=0.28,
                         behaviour_kl=(estimator, 0.3))
    assert_matches(run(loss_fn, batch, ref=False), batch, *expected)


def test_gspo_gradient_is_the_papers() -> None:
    """grad J = 1/G sum_i s_i A_i / |y_i| sum_t grad log pi(y_it) over unclipped sequences."""
    adv = advantages("grpo", "group_std")
    batch = make_batch(GSPO_LOG_RATIOS, adv)
    out = run(GSPOLoss(), batch, ref=False)
    out.loss.backward()
    expected = torch.zeros(len(LENGTHS), T, dtype=DTYPE)
    for i, n in enumerate(LENGTHS):
        if not n:
            continue
        s = math.exp(sum(GSPO_LOG_RATIOS[i]) / n)
        clipped = (adv[i] > 0 and s > 1 + 4e-4) or (adv[i] < 0 and s < 1 - 3e-4)
        if not clipped:
            expected[i, :n] = -s * adv[i] / (n * len(LENGTHS))  # the loss is -J
    torch.testing.assert_close(batch["log_probs"].grad, expected, rtol=0, atol=1e-14)
    assert (batch["log_probs"].grad[0] == 0).all() and (batch["log_probs"].grad[1] == 0).all()
    assert out.metrics["clip_fraction/high"].item() == pytest.approx(5 / 25)
    assert out.metrics["clip_fraction/low"].item() == pytest.approx(3 / 25)


def test_gspo_needs_sequence_advantages() -> None:
    batch = make_batch(GSPO_LOG_RATIOS)
    per_token = batch["advantages"][:, None].expand(-1, T)
    with pytest.raises(ValueError, match="advantages"):
        GSPOLoss()(batch["log_probs"], batch["old_log_probs"], per_token, batch["mask"],
                   normalizer=BatchNormalizer.from_mask(batch["mask"]))


def test_cispo_keeps_gradient_of_clipped_tokens() -> None:
    adv = advantages("grpo", "group_std")
    batch = make_batch(adv=adv)
    out = run(CISPOLoss(clip_eps_low=0.2, clip_eps_high=0.28), batch, ref=False)
    out.loss.backward()
    grad, mask = batch["log_probs"].grad, batch["mask"]
    nonzero_adv = torch.tensor(adv, dtype=DTYPE)[:, None].ne(0).expand(-1, T) & mask
    assert (grad[nonzero_adv] != 0).all()  # every token with signal, clipped or not
    tokens = [(b, t) for b, n in enumerate(LENGTHS) for t in range(n)]
    high = sum(math.exp(LOG_RATIOS[b][t]) > 1.28 for b, t in tokens) / len(tokens)
    low = sum(math.exp(LOG_RATIOS[b][t]) < 0.8 for b, t in tokens) / len(tokens)
    assert out.metrics["clip_fraction/high"].item() == pytest.approx(high, abs=1e-12)
    assert out.metrics["clip_fraction/low"].item() == pytest.approx(low, abs=1e-12)
    assert high > 0 and low > 0


# ----------------------------------------------------------------------------- equivalences


def on_policy_grad(loss_fn, adv) -> torch.Tensor:
    """Gradient w.r.t. the log-probs when they equal the behaviour ones (ratio exactly 1)."""
    batch = make_batch(adv=adv)
    log_probs = batch["old_log_probs"].clone().requires_grad_()
    loss_fn(log_probs, batch["old_log_probs"], batch["advantages"], batch["mask"],
            normalizer=BatchNormalizer.from_mask(batch["mask"])).loss.backward()
    return log_probs.grad


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_on_policy_grpo_equals_reinforce_with_baseline(aggregation: str) -> None:
    """Ratio 1: the clipped surrogate's gradient is the plain policy gradient."""
    adv = advantages("grpo", "group_std")
    grads = [on_policy_grad(loss_fn, adv) for loss_fn in (
        build("grpo", aggregation=aggregation, constant_normalizer=T),
        build("reinforce_baseline", aggregation=aggregation, constant_normalizer=T))]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cispo_without_active_clip_is_the_policy_gradient(aggregation: str) -> None:
    adv = advantages("grpo", "group_std")
    kwargs = {"aggregation": aggregation, "constant_normalizer": T}
    # Off-policy with no clip active: the importance-weighted policy gradient -r * A.
    unclipped = {"clip_eps_low": 1.0, "clip_eps_high": 100.0}
    grads = []
    for loss_fn in (CISPOLoss(**unclipped, **kwargs), ClippedSurrogateLoss(**unclipped, **kwargs)):
        batch = make_batch(adv=adv)
        run(loss_fn, batch, ref=False).loss.backward()
        grads.append(batch["log_probs"].grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)
    # On-policy: exactly the plain policy gradient -A.
    grads = [on_policy_grad(loss_fn, adv) for loss_fn in (build("cispo", **kwargs), PolicyGradientLoss(**kwargs))]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("splits", [[0, 4, 9], [0, 1, 2, 6, 9]], ids=["2-micro", "4-micro"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("name", PRESETS)
def test_micro_batches_sum_to_full_batch(name: str, aggregation: str, splits: list[int]) -> None:
    """Whole-batch normalizer + split by sequences = the unsplit gradient, for every objective
    (GSPO included: its ratio only involves the sequence's own tokens) and every aggregation,
    with every shared term and the IS correction on."""
    loss_fn = build(name, aggregation=aggregation, constant_normalizer=T, kl_coef=0.05,
                    kl_in="loss", behaviour_kl_coef=0.02, entropy_coef=0.01,
                    is_correction="truncate", is_cap=IS_CAP)
    log_ratios = GSPO_LOG_RATIOS if name == "gspo" else LOG_RATIOS

    def accumulate(bounds: list[int]) -> tuple[float, torch.Tensor, torch.Tensor]:
        batch = make_batch(log_ratios)
        normalizer = BatchNormalizer.from_mask(batch["mask"])
        total = 0.0
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out = run(loss_fn, batch, slice(start, stop), rollout=True, normalizer=normalizer)
            out.loss.backward()
            total += out.loss.item()
        return total, batch["log_probs"].grad, batch["entropy"].grad

    full = accumulate([0, len(LENGTHS)])
    micro = accumulate(splits)
    assert full[1].abs().sum() > 0
    assert micro[0] == pytest.approx(full[0], abs=1e-12)
    torch.testing.assert_close(micro[1], full[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(micro[2], full[2], rtol=0, atol=1e-12)


def test_gspo_split_inside_a_sequence_is_not_exact() -> None:
    """GSPO's ratio couples a sequence's tokens: splitting along T changes the gradient (the
    trainer never does; it splits along B only)."""
    batch = make_batch(GSPO_LOG_RATIOS)
    normalizer = BatchNormalizer.from_mask(batch["mask"])
    run(GSPOLoss(), batch, normalizer=normalizer).loss.backward()
    whole = batch["log_probs"].grad.clone()
    batch = make_batch(GSPO_LOG_RATIOS)
    for cols in (slice(0, 2), slice(2, T)):
        part = {k: v[:, cols] if v.dim() == 2 else v for k, v in batch.items()}
        GSPOLoss()(part["log_probs"], part["old_log_probs"], part["advantages"], part["mask"],
                   normalizer=normalizer).loss.backward()
    assert not torch.allclose(batch["log_probs"].grad, whole)


# ----------------------------------------------------------------------------- KL placement


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_reward_penalty(estimator: str) -> None:
    batch = make_batch()
    penalty = kl_reward_penalty(batch["old_log_probs"], batch["ref_log_probs"], batch["mask"],
                                estimator, 0.1)
    expected = [0.1 * sum(kl_value_and_grad(estimator, REF_OFFSET[b][t])[0] for t in range(n))
                for b, n in enumerate(LENGTHS)]
    torch.testing.assert_close(penalty, torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-14)
    assert not penalty.requires_grad
    loss_fn = build("rloo", kl_coef=0.1, kl_estimator=estimator)
    assert loss_fn.kl_in_reward and loss_fn.needs_reference
    torch.testing.assert_close(
        loss_fn.reward_penalty(batch["old_log_probs"], batch["ref_log_probs"], batch["mask"]),
        penalty)
    in_loss = build("rloo", kl_coef=0.1, kl_in="loss")
    assert not in_loss.kl_in_reward and in_loss.needs_reference
    assert in_loss.reward_penalty(batch["old_log_probs"], batch["ref_log_probs"],
                                  batch["mask"]).tolist() == [0.0] * len(LENGTHS)


def test_kl_in_reward_leaves_the_loss_alone() -> None:
    adv = advantages("grpo", "group_std")
    batch = make_batch(adv=adv)
    loss_fn = build("grpo", kl_coef=0.5, kl_in="reward")
    out = run(loss_fn, batch)
    assert_matches(out, batch, *reference("clip", adv, "token_mean"))
    tokens = [(b, t) for b, n in enumerate(LENGTHS) for t in range(n)]
    kl = sum(kl_value_and_grad("k3", REF_OFFSET[b][t] - LOG_RATIOS[b][t])[0] for b, t in tokens)
    assert out.metrics["kl_ref"].item() == pytest.approx(kl / len(tokens), abs=1e-12)
    # The reference log-probs are not needed by the loss itself in this mode.
    batch = make_batch(adv=adv)
    assert run(loss_fn, batch, ref=False).loss.item() == pytest.approx(out.loss.item(), abs=1e-14)


# ----------------------------------------------------------------------------- IS correction


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_is_correction_metrics(mode: str) -> None:
    loss_fn = ClippedSurrogateLoss(is_correction=mode, is_cap=IS_CAP,
                                   is_mask_threshold=IS_THRESHOLD)
    out = run(loss_fn, make_batch(), ref=False, rollout=True)
    tokens = [(b, t) for b, n in enumerate(LENGTHS) for t in range(n)]
    w = [math.exp(ROLL_GAP[b][t]) for b, t in tokens]
    applied = [is_weight(x, mode) for x in w]
    limit = IS_CAP if mode == "truncate" else IS_THRESHOLD
    expected = {
        "mismatch_kl": sum(math.exp(g) - 1 - g for g in (ROLL_GAP[b][t] for b, t in tokens))
        / len(tokens),
        "mismatch_ess": sum(w) ** 2 / (len(w) * sum(x * x for x in w)),
        "is_weight/mean": sum(applied) / len(applied),
        "is_weight/corrected_fraction": sum(x > limit for x in w) / len(w),
    }
    for key, value in expected.items():
        assert out.metrics[key].item() == pytest.approx(value, abs=1e-12), key
        assert not out.metrics[key].requires_grad


def test_gspo_is_correction_is_per_sequence() -> None:
    loss_fn = GSPOLoss(is_correction="truncate", is_cap=IS_CAP)
    out = run(loss_fn, make_batch(GSPO_LOG_RATIOS), ref=False, rollout=True)
    seq_w = {b: math.exp(sum(ROLL_GAP[b]) / n) for b, n in enumerate(LENGTHS) if n}
    per_token = [min(seq_w[b], IS_CAP) for b, n in enumerate(LENGTHS) for _ in range(n)]
    assert out.metrics["is_weight/mean"].item() == pytest.approx(
        sum(per_token) / len(per_token), abs=1e-12)


@pytest.mark.parametrize("mode", ["none", "truncate", "mask"])
def test_without_rollout_log_probs_is_correction_does_nothing(mode: str) -> None:
    batch = make_batch()
    plain = run(ClippedSurrogateLoss(), batch, ref=False)
    corrected = run(ClippedSurrogateLoss(is_correction=mode, is_cap=1.01, is_mask_threshold=1.01),
                    batch, ref=False)
    assert corrected.loss.item() == plain.loss.item()
    assert set(corrected.metrics) == set(plain.metrics)
    assert not any(k.startswith(("mismatch", "is_weight")) for k in plain.metrics)


def test_mismatch_metrics_logged_even_without_correction() -> None:
    batch = make_batch()
    out = run(ClippedSurrogateLoss(), batch, ref=False, rollout=True)
    assert "mismatch_kl" in out.metrics and "is_weight/mean" not in out.metrics
    assert out.loss.item() == run(ClippedSurrogateLoss(), batch, ref=False).loss.item()


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("name", PRESETS)
def test_metrics_are_detached_scalars_and_ess_is_normalized(name: str) -> None:
    loss_fn = build(name, kl_coef=0.05, kl_in="loss")
    batch = make_batch(GSPO_LOG_RATIOS if name == "gspo" else LOG_RATIOS)
    out = run(loss_fn, batch, rollout=True)
    for key in ("loss/policy", "clip_fraction", "clip_fraction/low", "clip_fraction/high",
                "ratio/mean", "ess", "approx_kl_behaviour", "kl_ref", "entropy", "mismatch_kl"):
        metric = out.metrics[key]
        assert metric.dim() == 0 and not metric.requires_grad and torch.isfinite(metric), key
    assert 0 < out.metrics["ess"].item() <= 1
    if name == "gspo":
        ratios = [math.exp(sum(row) / len(row)) for row in GSPO_LOG_RATIOS for _ in row]
    else:
        ratios = [math.exp(x) for row in LOG_RATIOS for x in row]
    expected = sum(ratios) ** 2 / (len(ratios) * sum(r * r for r in ratios))
    assert out.metrics["ess"].item() == pytest.approx(expected, abs=1e-12)
    if name in ("rloo", "reinforce", "reinforce_baseline"):
        assert out.metrics["clip_fraction"].item() == 0.0


def test_on_policy_ess_is_one() -> None:
    batch = make_batch()
    out = ClippedSurrogateLoss()(batch["old_log_probs"].clone(), batch["old_log_probs"],
                                 batch["advantages"], batch["mask"],
                                 normalizer=BatchNormalizer.from_mask(batch["mask"]))
    assert out.metrics["ess"].item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("name", PRESETS)
def test_non_finite_padding_does_not_leak(name: str) -> None:
    batch = make_batch(GSPO_LOG_RATIOS if name == "gspo" else LOG_RATIOS)
    pad = ~batch["mask"]
    batch["log_probs"] = batch["log_probs"].detach().masked_fill(pad, float("nan")).requires_grad_()
    batch["entropy"] = batch["entropy"].detach().masked_fill(pad, float("inf")).requires_grad_()
    for key in ("ref_log_probs", "old_log_probs", "rollout_log_probs"):
        batch[key] = batch[key].masked_fill(pad, float("inf"))
    loss_fn = build(name, kl_coef=0.1, kl_in="loss", entropy_coef=0.01, behaviour_kl_coef=0.1,
                    is_correction="mask", is_mask_threshold=IS_THRESHOLD)
    out = run(loss_fn, batch, rollout=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grad = batch["log_probs"].grad
    assert torch.isfinite(grad).all() and (grad[pad] == 0).all()
    assert torch.isfinite(batch["entropy"].grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


# ----------------------------------------------------------------------------- validation


def _Advantage(estimator: str = "grpo", scale: str = "group_std"):
    from grpo_utils.algo.advantages import AdvantageStage

    return AdvantageStage(estimator, scale, 1e-6, G)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (ClippedSurrogateLoss, {"kl_in": "advantage"}, "kl_in='advantage'"),
        (PolicyGradientLoss, {"is_correction": "clip"}, "is_correction='clip'"),
        (GSPOLoss, {"is_cap": 0.0}, "is_cap"),
        (CISPOLoss, {"is_mask_threshold": float("nan")}, "is_mask_threshold"),
        (ClippedSurrogateLoss, {"behaviour_kl_coef": -0.1}, "behaviour_kl_coef"),
        # The advantage and shaping settings left the loss: their own stages check them.
        (_Advantage, {"estimator": "ppo"}, "advantage.estimator='ppo'"),
        (_Advantage, {"scale": "rank"}, "advantage.scale='rank'"),
        (_Advantage, {"estimator": "none", "scale": "group_std"}, "advantage.scale='group_std'"),
        (RolloutShaping, {"dynamic_sampling": "yes"}, "dynamic_sampling"),
        (RolloutShaping, {"max_resample_rounds": -1}, "max_resample_rounds"),
        (RolloutShaping, {"max_resample_rounds": 1.5}, "max_resample_rounds"),
        (RolloutShaping, {"overlong_mask": 1}, "overlong_mask"),
        (RolloutShaping, {"overlong_penalty": -1.0}, "overlong_penalty"),
        (RolloutShaping, {"overlong_cache_len": 0}, "overlong_cache_len"),
        (GSPOLoss, {"clip_eps_low": -1e-4}, "clip_eps_low"),
        (CISPOLoss, {"clip_eps_high": float("nan")}, "clip_eps_high"),
        (PolicyGradientLoss, {"aggregation": "sum"}, "aggregation='sum'"),
        (GSPOLoss, {"aggregation": "constant_sum"}, "constant_normalizer"),
        (CISPOLoss, {"kl_estimator": "k4"}, "kl_estimator='k4'"),
    ],
)
def test_bad_values_raise_one_line_naming_the_key(cls, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace("(", r"\(")) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls", [ClippedSurrogateLoss, PolicyGradientLoss, GSPOLoss, CISPOLoss])
def test_unknown_key_is_named(cls) -> None:
    with pytest.raises(TypeError, match="kl_coeff"):
        cls(kl_coeff=0.1)


def test_policy_gradient_loss_has_no_clip() -> None:
    with pytest.raises(TypeError, match="clip_eps_low"):
        PolicyGradientLoss(clip_eps_low=0.2)
    assert "clip_eps_low" not in PolicyGradientLoss.config_keys()


def test_build_loss_without_target_accepts_shared_keys() -> None:
    loss_fn = build_loss({"clip_eps_high": 0.28, "is_correction": "truncate", "kl_in": "reward"})
    assert isinstance(loss_fn, ClippedSurrogateLoss)
    assert (loss_fn.is_correction, loss_fn.kl_in) == ("truncate", "reward")
    assert loss_fn.needs_rollout_log_probs
    with pytest.raises(ValueError, match="typo"):
        build_loss({"typo": 1})
