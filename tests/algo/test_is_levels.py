"""The inference/training mismatch correction's levels (``loss.is_level``): token, sequence and
geometric weights, truncated or masked, checked by value against hand-computed weights, with the
metrics they log (fraction corrected, effective sample size) and no overflow for long sequences."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_utils.algo.losses import BatchNormalizer, ClippedSurrogateLoss, GSPOLoss, PolicyGradientLoss

# log(pi_old / pi_rollout) per token; sequence 0 has 3 tokens, sequence 1 has 2 (then padding)
MISMATCH = torch.tensor([[0.5, 0.4, -0.1, 0.0], [-0.3, 1.2, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])


def expected(level: str, mode: str, bound: float) -> torch.Tensor:
    """The weights written out: per token exp(m); per sequence exp(sum m) or exp(mean m)."""
    rows = []
    for m, mask in zip(MISMATCH.tolist(), MASK.tolist()):
        real = [x for x, keep in zip(m, mask) if keep]
        if level == "token":
            ws = [math.exp(x) for x in m]
        else:
            s = sum(real) if level == "sequence" else sum(real) / len(real)
            ws = [math.exp(s)] * len(m)
        if mode == "truncate":
            ws = [min(w, bound) for w in ws]
        else:
            ws = [0.0 if w > bound else w for w in ws]
        rows.append(ws)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_weights_by_value(level, mode):
    bound = 1.5
    loss = ClippedSurrogateLoss(is_correction=mode, is_cap=bound, is_mask_threshold=bound, is_level=level)
    weights, corrected = loss.is_weights(torch.where(MASK, MISMATCH, 0.0), MASK)
    want = expected(level, mode, bound)
    assert torch.allclose(weights[MASK], want[MASK], rtol=1e-12, atol=0)
    # which tokens were corrected (bound 1.5 = e^0.405): tokens 0.5 and 1.2; sequence sums 0.8 and 0.9
    # (both over); geometric means 0.267 (under) and 0.45 (over)
    by_level = {"token": [[True, False, False, False], [False, True, False, False]],
                "sequence": [[True, True, True, False], [True, True, False, False]],
                "geometric": [[False, False, False, False], [True, True, False, False]]}
    assert corrected.tolist() == by_level[level]


def test_levels_default_to_the_objectives_own():
    assert ClippedSurrogateLoss(is_correction="truncate").is_level == "token"
    assert PolicyGradientLoss(is_correction="truncate").is_level == "token"
    assert GSPOLoss(is_correction="truncate").is_level == "geometric"
    assert GSPOLoss(is_correction="truncate", is_level="token").is_level == "token"
    with pytest.raises(ValueError, match="is_level"):
        ClippedSurrogateLoss(is_level="sentence")


def test_a_long_sequence_product_does_not_overflow():
    """500 tokens with log ratio 2 each: the sequence ratio is e^1000 (inf in float64)."""
    mismatch = torch.full((1, 500), 2.0, dtype=torch.float64)
    mask = torch.ones(1, 500, dtype=torch.bool)
    for mode in ("truncate", "mask"):
        loss = ClippedSurrogateLoss(is_correction=mode, is_cap=2.0, is_mask_threshold=2.0, is_level="sequence")
        weights, corrected = loss.is_weights(mismatch, mask)
        assert torch.isfinite(weights).all() and corrected.all()
        assert weights.max().item() == pytest.approx(2.0 if mode == "truncate" else 0.0)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_the_weights_scale_the_policy_gradient_and_are_logged(level):
    """On-policy (ratio 1, no clipping) the policy term's gradient per token is -A * w / tokens:
    the weight multiplies it exactly; the logged fraction corrected and ESS are those of ``w``.
    Masked at 2.4: token 1.2 of sequence 1 (token), sequence 1 (sum 0.9), nothing (geometric)."""
    bound = 2.4
    old = torch.randn(MASK.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rollout = old - torch.where(MASK, MISMATCH, 0.0)
    log_probs = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = ClippedSurrogateLoss(is_correction="mask", is_mask_threshold=bound, is_level=level)
    out = loss(log_probs, old, adv, MASK, rollout_log_probs=rollout, normalizer=BatchNormalizer.from_mask(MASK))
    out.loss.backward()
    w = expected(level, "mask", bound)
    tokens = MASK.sum().item()
    want_grad = torch.where(MASK, -adv[:, None] * w / tokens, 0.0)
    assert torch.allclose(log_probs.grad, want_grad, atol=1e-12)
    real = w[MASK]
    assert (real == 0).sum().item() == {"token": 1, "sequence": 2, "geometric": 0}[level]
    assert out.metrics["is_weight/mean"].item() == pytest.approx(real.mean().item())
    assert out.metrics["is_weight/corrected_fraction"].item() == pytest.approx((real == 0).double().mean().item())
    ess = real.sum() ** 2 / (len(real) * (real**2).sum())
    assert out.metrics["is_weight/ess"].item() == pytest.approx(ess.item())
