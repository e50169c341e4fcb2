"""The augmented model: zero initialisation is exact, null labels switch the pathway off."""

import pytest
import torch

from ctrl_bio.model import AugmentedScore, LabelEmbedding, VectorPathway, check_labels
from ctrl_bio.sampling import euler_maruyama, time_grid


def test_zero_init_reproduces_pretrained_sampler_bit_for_bit(small_testbed):
    tb = small_testbed
    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2, 3), hidden=16, depth=2), tb.sde)
    times, noise, x_init = time_grid(30), torch.randn(30, 64, 2), torch.randn(64, 2)
    y = torch.stack([torch.randint(0, 2, (64,)), torch.randint(0, 3, (64,))], 1)
    ref = euler_maruyama(tb.sde, tb.pretrained, x_init, times, noise=noise)
    aug = euler_maruyama(tb.sde, model.conditioned(y), x_init, times, noise=noise)
    assert torch.equal(ref.x, aug.x)
    assert torch.equal(aug.kl, torch.zeros(64))


def test_only_the_pathway_trains_and_null_label_is_pretrained(small_testbed):
    tb = small_testbed
    pathway = VectorPathway(2, (2,), hidden=16, depth=2)
    torch.nn.init.normal_(pathway.out.weight)  # as after training
    model = AugmentedScore(tb.pretrained, pathway, tb.sde)
    assert all(p.requires_grad for p in model.pathway.parameters())
    x, t = torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05
    s_null = model(x, t, torch.full((8, 1), -1))
    torch.testing.assert_close(s_null, tb.pretrained(x, t), atol=0, rtol=0)
    assert not torch.allclose(model(x, t, torch.zeros(8, 1, dtype=torch.long)), s_null)


def test_label_embedding_null_row_stays_zero():
    emb = LabelEmbedding((3, 2), emb_dim=5)
    assert torch.equal(emb(torch.tensor([[0, 1], [-1, -1]])), torch.zeros(2, 5))
    opt = torch.optim.SGD(emb.parameters(), lr=1.0)
    (emb(torch.tensor([[1, 0]])).sum() + emb(torch.tensor([[-1, -1]])).sum()).backward()
    opt.step()
    assert torch.equal(emb(torch.tensor([[-1, -1]])), torch.zeros(1, 5))
    assert not torch.equal(emb(torch.tensor([[1, 0]])), torch.zeros(1, 5))


def test_time_dependent_label_embedding_starts_at_zero_and_varies_with_t():
    emb = LabelEmbedding((3,), emb_dim=5, n_time_features=4)
    y = torch.tensor([[0], [2], [-1]])
    assert torch.equal(emb(y, torch.tensor(0.3)), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="depends on t"):
        emb(y)
    for p in emb.parameters():
        torch.nn.init.normal_(p)
    early, late = emb(y, torch.full((3,), 0.1)), emb(y, torch.tensor(0.9))  # (B,) or scalar t
    assert not torch.allclose(early[:2], late[:2]) and torch.equal(early[2], torch.zeros(5))
    # at t = 0 the sines vanish and the cosines are 1: e_y(0) = e_y + the sum of its cosine rows
    rows = emb.time_tables[0].weight.view(4, 4, 5)
    torch.testing.assert_close(emb(y[:2], torch.tensor(0.0)), emb.tables[0].weight[[0, 2]] + rows[[0, 2], 2:].sum(1))


def test_label_validation():
    with pytest.raises(ValueError, match="shape"):
        check_labels(torch.zeros(4, dtype=torch.long), (2,))
    with pytest.raises(ValueError, match="0..1"):
        check_labels(torch.tensor([[0], [2]]), (2,))


def test_lora_on_a_dilated_convolution_adds_the_dilated_low_rank_branch():
    """match_conv_dilation (peft#3697): the adapted conv is conv(x) + scale * B(A_dilated(x)), same length."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn
    from torch.nn import functional as F

    from ctrl_bio.lora import match_conv_dilation

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 5, 3, padding=4, dilation=4))
    base_w, base_b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2.0, target_modules=["0"]), net, adapter_name="ctrl")
    match_conv_dilation(net)
    layer = net[0]
    with torch.no_grad():
        layer.lora_B["ctrl"].weight.normal_()
    x = torch.randn(2, 3, 30)
    a = F.conv1d(x, layer.lora_A["ctrl"].weight, padding=4, dilation=4)
    expected = F.conv1d(x, base_w, base_b, padding=4, dilation=4) + F.conv1d(a, layer.lora_B["ctrl"].weight)
    assert torch.allclose(net(x), expected, atol=1e-5)


def test_one_vector_pathway_for_both_label_spaces_gives_no_control_to_requests_for_nothing():
    from ctrl_bio.label_space import CategoricalLabels, ContinuousLabels
    from ctrl_bio.sde import VPSDE

    sde = VPSDE()
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    nan = float("nan")
    for labels, y in ((CategoricalLabels((3, 2)), torch.tensor([[0, 1], [2, -1]])),
                      (ContinuousLabels(2, loc=[1.0, 0.0], scale=[2.0, 1.0]), torch.tensor([[0.3, 1.0], [2.0, nan]]))):
        model = AugmentedScore(lambda x, t: -x, VectorPathway(2, labels, hidden=8, depth=1), sde)
        torch.nn.init.normal_(model.pathway.out.weight)
        y3 = torch.cat([y, labels.none(1)])
        assert labels.requested(y3).tolist() == [[True, True], [True, False], [False, False]]
        _, u = model.score_and_control(x, t, y3)
        assert torch.equal(u[2], torch.zeros(2)) and (u[:2].abs() > 0).all()
        assert labels.features(y3).shape == (3, labels.n_features) and not labels.features(y3)[2].any()
        with pytest.raises(ValueError, match="shape"):
            model.conditioned(y3[:, :1])
