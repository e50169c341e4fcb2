"""``seed`` seeds the pathway too: an untrained pathway's random weights are drawn again from it, as if the model had
been built under ``torch.manual_seed(seed)``; a trained one is left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrl_bio import finetune
from ctrl_bio.lora import LoRAAugmentedScore
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.nets import ConvScoreNet, VectorScoreNet
from ctrl_bio.pathway_seed import reseed_untrained_pathway
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sde import VPSDE

SDE = VPSDE()
PRIOR = LabelPrior([torch.tensor([0.5, 0.5])])


def vector_model() -> AugmentedScore:
    torch.manual_seed(123)  # the pre-trained network: the same in every build
    base = VectorScoreNet(SDE, 2, hidden=16).requires_grad_(False)
    return AugmentedScore(base, VectorPathway(2, (2,), hidden=16), SDE)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("kind", ["vector", "lora"])
def test_an_unseeded_build_gets_the_weights_a_seeded_build_has(kind):
    """Two builds from different global generator states end equal to the build made right after
    ``torch.manual_seed(seed)``, random layers and peft LoRA adapters alike; their zero parts stay zero."""
    x_shape = (2,) if kind == "vector" else (4, 6)

    def build(global_seed: int) -> nn.Module:
        if kind == "vector":
            torch.manual_seed(123)
            base = VectorScoreNet(SDE, 2, hidden=16).requires_grad_(False)
            torch.manual_seed(global_seed)
            return AugmentedScore(base, VectorPathway(2, (2,), hidden=16), SDE)
        torch.manual_seed(123)
        net = ConvScoreNet(SDE, channels_in=4, hidden=8, n_blocks=1, emb_dim=8, n_fourier=4)
        torch.manual_seed(global_seed)
        return LoRAAugmentedScore(net, (2,), lora_rank=2, lora_targets=("conv1", "conv2"))

    if kind == "lora":
        pytest.importorskip("peft")
    reference = trainable(build(7))
    a, b = build(1), build(2)
    assert not all(torch.equal(v, trainable(a)[k]) for k, v in reference.items())  # unseeded: they differ
    for model in (a, b):
        assert reseed_untrained_pathway(model, 7, x_shape, PRIOR)
        got = trainable(model)
        assert all(torch.equal(got[k], v) for k, v in reference.items()), kind
    assert any(not v.any() for v in reference.values())  # the zero-initialised part (output layer, LoRA B) is zero


def test_a_trained_pathway_is_left_alone():
    model = vector_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    before = trainable(model)
    assert not reseed_untrained_pathway(model, 0, (2,), PRIOR)
    assert all(torch.equal(v, trainable(model)[k]) for k, v in before.items())


class RowZeroPathway(nn.Module):
    """A pathway whose zero output comes from one zero row of a random table: a re-draw would not keep it zero."""

    n_classes = (2,)

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(3, 2)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, x, t, y, s_pre, sde):
        return self.table(torch.zeros_like(y[:, 0])) * torch.ones_like(x)


def test_layers_whose_new_draw_would_move_the_control_keep_their_weights():
    """A zero that is not a whole tensor (one row of a table), or a trained copy of the pre-trained network (equal to
    it, not random): their new draws would make the control non-zero, so they keep what they had."""
    base = VectorScoreNet(SDE, 2, hidden=8).requires_grad_(False)
    rows = AugmentedScore(base, RowZeroPathway(), SDE)
    pytest.importorskip("peft")
    net = ConvScoreNet(SDE, channels_in=4, hidden=8, n_blocks=1, emb_dim=8, n_fourier=4)
    copy = LoRAAugmentedScore(net, (2,), lora_rank=0, lora_targets=(), train_copy=True)
    for model, x_shape in ((rows, (2,)), (copy, (4, 6))):
        before = trainable(model)
        assert reseed_untrained_pathway(model, 0, x_shape, PRIOR) == 0
        assert all(torch.equal(v, trainable(model)[k]) for k, v in before.items())


def test_finetune_runs_on_unseeded_builds_are_identical():
    """The user's case: the same ``finetune(..., seed=3)`` on two models built without seeding gives the same run."""
    reward = LogLikelihoodReward([lambda x0: torch.stack([torch.nn.functional.logsigmoid(-4 * x0[:, 0]),
                                                          torch.nn.functional.logsigmoid(4 * x0[:, 0])], dim=1)])
    results = []
    for global_seed in (11, 12):
        torch.manual_seed(123)
        base = VectorScoreNet(SDE, 2, hidden=16).requires_grad_(False)
        torch.manual_seed(global_seed)
        model = AugmentedScore(base, VectorPathway(2, (2,), hidden=16), SDE)
        finetune(model, SDE, reward, PRIOR, (2,), sm_steps=20, sm_batch_size=32, pool_size=64, n_steps=10,
                 eval_every=1000, progress=False, seed=3)
        results.append(trainable(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
