"""Reward classifiers: calibration lowers ECE; labels add their log-likelihoods."""

import pytest
import torch
from torch import nn

from ctrl_bio.reward import (
    LabelPrior,
    LogLikelihoodReward,
    expected_calibration_error,
    fit_temperature,
    mlp_classifier,
    train_classifier,
)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    n = 4000
    y = torch.randint(0, 3, (n,), generator=g)
    true_logits = torch.randn(n, 3, generator=g) + 2.0 * nn.functional.one_hot(y, 3)
    y = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)  # calibrated at T = 1
    over = 4.0 * true_logits
    t = fit_temperature(over, y)
    assert t == pytest.approx(4.0, rel=0.15)
    assert expected_calibration_error((over / t).softmax(1), y) < 0.5 * expected_calibration_error(over.softmax(1), y)


def test_train_classifier_reports_and_calibrates(small_testbed):
    tb = small_testbed
    g = torch.Generator().manual_seed(1)
    x, comp = tb.mixture.sample(600, g)
    y = tb.component_label.classes[comp]
    clf, report = train_classifier(mlp_classifier(2, 2, hidden=32), x, y, epochs=60, generator=g)
    assert report.calib_size == 120 and report.train_size == 480
    assert report.accuracy > 0.9
    assert report.nll_after <= report.nll_before + 1e-6  # the fitted T minimises held-out NLL
    assert not any(p.requires_grad for p in clf.parameters())
    torch.testing.assert_close(clf(x).exp().sum(1), torch.ones(600))


def test_several_labels_add_log_likelihoods():
    f1 = lambda x: torch.log_softmax(x[:, :2], 1)  # noqa: E731
    f2 = lambda x: torch.log_softmax(x[:, 2:], 1)  # noqa: E731
    x, y = torch.randn(5, 5), torch.tensor([[0, 2], [1, 0], [1, 1], [0, 0], [1, 2]])
    r = LogLikelihoodReward([f1, f2])(x, y)
    torch.testing.assert_close(r, f1(x).gather(1, y[:, :1]).squeeze(1) + f2(x).gather(1, y[:, 1:]).squeeze(1))
    with pytest.raises(ValueError, match="shape"):
        LogLikelihoodReward([f1, f2])(x, y[:, :1])


def test_label_prior_is_a_product_of_marginals():
    prior = LabelPrior.from_labels([torch.tensor([0, 0, 0, 1]), torch.tensor([1, 2])], (2, 3))
    y = prior.sample(20_000, torch.Generator().manual_seed(0))
    assert y[:, 0].float().mean() == pytest.approx(0.25, abs=0.02)
    assert (y[:, 1] == 0).sum() == 0
    torch.testing.assert_close(prior.log_prob(torch.tensor([[0, 1]])), torch.log(torch.tensor([0.75 * 0.5])))
