"""ConvScoreNet(output="categorical"): a score whose posterior mean is a softmax over categories plus the exact
one-position Gaussian likelihood (issue 24)."""
from __future__ import annotations

import pytest
import torch

from ctrl_bio.nets import ConvScoreNet
from ctrl_bio.sde import VPSDE
from ctrl_bio.training.runs import export_network, load_network


def _one_hot(idx: torch.Tensor) -> torch.Tensor:
    return 2 * torch.nn.functional.one_hot(idx, 4).permute(0, 2, 1).float() - 1


@pytest.fixture()
def net() -> ConvScoreNet:
    torch.manual_seed(0)
    return ConvScoreNet(VPSDE(), hidden=16, n_blocks=2, emb_dim=16, n_fourier=8, output="categorical")


@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_untrained_network_is_the_exact_denoiser_of_uniform_independent_bases(net, t):
    sde = net.sde
    x0 = _one_hot(torch.randint(0, 4, (6, 24)))
    tt = torch.full((6,), t)
    x_t = sde.perturb(x0, tt, torch.randn_like(x0))
    with torch.no_grad():
        x0_hat = sde.denoise(x_t, tt, net(x_t, tt))
    alpha, sigma = sde.alpha(tt)[0], sde.sigma(tt)[0]
    # Bayes with p(base) = 1/4 per position: p(c | x_t) ∝ N(x_t; alpha v_c, sigma^2 I), by direct evaluation.
    v = _one_hot(torch.arange(4)[None, :]).squeeze(0).T  # (4 categories, 4 channels)
    log_lik = -((x_t.permute(0, 2, 1)[:, :, None, :] - alpha * v) ** 2).sum(-1) / (2 * sigma**2)
    exact = (torch.softmax(log_lik, dim=-1) @ v).permute(0, 2, 1)
    torch.testing.assert_close(x0_hat, exact, atol=1e-4, rtol=1e-4)


def test_low_noise_denoiser_returns_the_clean_sequence_whatever_the_logits(net):
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.normal_(0, 3.0)  # confident, wrong context logits
    x0 = _one_hot(torch.randint(0, 4, (4, 24)))
    tt = torch.full((4,), 0.01)
    x_t = net.sde.perturb(x0, tt, torch.randn_like(x0))
    with torch.no_grad():
        torch.testing.assert_close(net.sde.denoise(x_t, tt, net(x_t, tt)), x0, atol=1e-3, rtol=0)


def test_forward_pair_without_label_matches_forward_and_a_trained_logit_layer_moves_the_score(net):
    x, t = torch.randn(3, 4, 24), torch.full((3,), 0.4)
    with torch.no_grad():
        s, s_pre = net.forward_pair(x, t, torch.zeros(3, 16))
        torch.testing.assert_close(s_pre, net(x, t))
        torch.testing.assert_close(s, s_pre)
        net.conv_out.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
        assert (net(x, t) - s_pre).abs().max() > 0.1


def test_categorical_network_round_trips_through_its_checkpoint(net, tmp_path):
    with torch.no_grad():
        net.conv_out.weight.normal_()
    export_network(net, tmp_path / "score.safetensors")
    loaded = load_network(tmp_path, net.sde)
    assert loaded.output == "categorical"
    x, t = torch.randn(2, 4, 24), torch.full((2,), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), net(x, t))


def test_unknown_output_is_refused():
    with pytest.raises(ValueError, match="output must be"):
        ConvScoreNet(VPSDE(), hidden=16, n_blocks=2, emb_dim=16, output="logits")
