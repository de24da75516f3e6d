"""Losses against PyTorch float64 autograd, with the peers' own formulations (skipped without torch)."""

import numpy as np
import pytest

from refslm import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def kl_rows(log_target_dist, log_input_dist):
    """KL(target || input) per token with PyTorch's kl_div (log_target=True), summed over the vocabulary."""
    return F.kl_div(log_input_dist, log_target_dist, reduction="none", log_target=True).sum(-1)


def trl_generalized_jsd(s, t, beta):
    """TRL GKDTrainer.generalized_jsd_loss's per-token values (logits already divided by temperature)."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if beta == 0:
        return kl_rows(lt, ls)
    if beta == 1:
        return kl_rows(ls, lt)
    b = torch.tensor(beta, dtype=s.dtype)
    lm = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
    return b * kl_rows(lt, lm) + (1 - b) * kl_rows(ls, lm)


def distillm_skew(s, t, alpha, reverse):
    """DistiLLM skew KL(p || a p + (1-a) q) and skew reverse KL(q || (1-a) p + a q), per token."""
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    if reverse:
        return (q * (F.log_softmax(s, -1) - torch.log((1 - alpha) * p + alpha * q))).sum(-1)
    return (p * (F.log_softmax(t, -1) - torch.log(alpha * p + (1 - alpha) * q))).sum(-1)


def torch_divergence(kind, s, t, beta):
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kind == "forward_kl":
        return kl_rows(lt, ls)
    if kind == "reverse_kl":
        return kl_rows(ls, lt)
    if kind == "jsd":
        return trl_generalized_jsd(s, t, beta)
    return distillm_skew(s, t, beta, reverse=kind == "skew_reverse_kl")


def reduce(per_token, reduction, mask):
    """PyTorch batchmean (/ size(0)) when unmasked; TRL sum / kept tokens when masked."""
    if mask is not None:
        per_token = per_token * mask
    kept = per_token.numel() if mask is None else mask.sum()
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "batchmean" and mask is None:
        return per_token.sum() / per_token.shape[0]
    return per_token.sum() / kept


def torch_value_and_grad(fn, s):
    x = torch.tensor(s, requires_grad=True)
    value = fn(x)
    value.sum().backward()
    return value.detach().numpy(), x.grad.numpy()


def logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_divergences_match_torch(kind, reduction, masked, beta):
    s, t = logits(1, (2, 4, 9)), logits(2, (2, 4, 9))
    mask = np.random.default_rng(3).random((2, 4)) < 0.6 if masked else None
    T = 1.7
    v, g = losses.divergence(kind, s, t, beta=beta, temperature=T, scale_by_t2=True, mask=mask, reduction=reduction)
    tm = None if mask is None else torch.tensor(mask, dtype=torch.float64)
    tv, tg = torch_value_and_grad(
        lambda x: T * T * reduce(torch_divergence(kind, x / T, torch.tensor(t) / T, beta), reduction, tm), s)
    np.testing.assert_allclose(v, tv, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g, tg, rtol=1e-11, atol=1e-15)  # atol: ulps of O(1) terms (alpha 1: loss == 0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_cross_entropy_matches_torch(reduction, label_smoothing):
    s = logits(4, (3, 5, 8))
    y = np.random.default_rng(5).integers(0, 8, (3, 5))
    y[0, :2] = -100
    v, g = losses.cross_entropy(s, y, label_smoothing=label_smoothing, reduction=reduction)
    tv, tg = torch_value_and_grad(
        lambda x: F.cross_entropy(x.reshape(-1, 8), torch.tensor(y).reshape(-1), ignore_index=-100,
                                  label_smoothing=label_smoothing, reduction=reduction), s)
    np.testing.assert_allclose(v, tv.reshape(np.shape(v)), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g, tg, rtol=1e-12, atol=1e-17)


def test_public_code_mode_matches_the_mu_training_step():
    # microsoft/encoder-decoder-slm KDModel: vocab cut to the smaller one, kl_div batchmean over B*T rows
    # (padding included), CE with ignore_index = pad 0 on the full student vocabulary; 0.9 KD + 0.1 CE
    s, t = logits(6, (2, 5, 12)), logits(7, (2, 5, 10))
    y = np.array([[3, 4, 5, 0, 0], [7, 1, 0, 0, 0]])
    v, g = losses.kd_loss(s, t, y, mode="public_code")

    def mu(x):
        kd = F.kl_div(F.log_softmax(x[..., :10].reshape(-1, 10), -1),
                      F.log_softmax(torch.tensor(t).reshape(-1, 10), -1), reduction="batchmean", log_target=True)
        ce = F.cross_entropy(x.reshape(-1, 12), torch.tensor(y).reshape(-1), ignore_index=0)
        return 0.9 * kd + 0.1 * ce

    tv, tg = torch_value_and_grad(mu, s)
    np.testing.assert_allclose(v, tv, rtol=1e-13)
    np.testing.assert_allclose(g, tg, rtol=1e-12, atol=1e-17)


def test_paper_mode_reverse_kl_matches_torch():
    s, t = logits(8, (2, 5, 7)), logits(9, (2, 5, 7))
    y = np.array([[3, 4, 5, 0, 0], [6, 1, 2, 2, 0]])
    v, g = losses.kd_loss(s, t, y, temperature=2.0, scale_by_t2=True)
    keep = torch.tensor(y != 0, dtype=torch.float64)

    def paper(x):
        kd = (kl_rows(F.log_softmax(x / 2, -1), F.log_softmax(torch.tensor(t) / 2, -1)) * keep).sum() / keep.sum()
        ce = F.cross_entropy(x.reshape(-1, 7), torch.tensor(y).reshape(-1), ignore_index=0)
        return 0.9 * 4 * kd + 0.1 * ce

    tv, tg = torch_value_and_grad(paper, s)
    np.testing.assert_allclose(v, tv, rtol=1e-13)
    np.testing.assert_allclose(g, tg, rtol=1e-12, atol=1e-17)


def test_forward_kl_with_banned_student_entry_matches_torch():
    # teacher mass where the student is -inf: both give +inf and the same finite gradient q - p
    s = np.array([[0.0, -np.inf, 1.0, 2.0]])
    t = np.array([[0.0, 1.0, 0.3, 0.5]])  # (a teacher -inf entry makes torch's value NaN: 0 * -inf; ours 0)
    v, g = losses.forward_kl(s, t)
    tv, tg = torch_value_and_grad(lambda x: kl_rows(F.log_softmax(torch.tensor(t), -1), F.log_softmax(x, -1)), s)
    assert v == np.inf and tv[0] == np.inf
    np.testing.assert_allclose(g, tg, rtol=1e-14)
