"""ConvScoreNet(context=...): a sequence-wide path (pooled features or self-attention) beside the dilated
convolutions (issue 24: a regulatory sequence reads as one cell type from end to end)."""
from __future__ import annotations

import pytest
import torch

from ctrl_bio.nets import ConvScoreNet
from ctrl_bio.sde import VPSDE
from ctrl_bio.training.runs import export_network, load_network

SMALL = {"hidden": 16, "n_blocks": 4, "emb_dim": 16, "n_fourier": 8, "kernel_size": 3}


def _net(context: str, seed: int = 0) -> ConvScoreNet:
    torch.manual_seed(seed)
    return ConvScoreNet(VPSDE(), context=context, **SMALL)


def _randomise_context_path(net: ConvScoreNet) -> None:
    """Give the zero-initialised global projections (and attention outputs) weights, as training would."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "global_proj" in name or "attn.out_proj" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("context", ["pool", "attention"])
def test_untrained_context_path_leaves_the_local_network_unchanged(context):
    local, wide = _net("local"), _net(context)
    missing = wide.load_state_dict(local.state_dict(), strict=False).missing_keys
    assert missing and all("global_proj" in k or "attn" in k for k in missing)
    x, t = torch.randn(3, 4, 40), torch.full((3,), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(wide(x, t), local(x, t))


@pytest.mark.parametrize("context", ["pool", "attention"])
def test_trained_context_path_moves_the_score_at_every_position(context):
    net = _net(context)
    x, t = torch.randn(2, 4, 200), torch.full((2,), 0.5)
    with torch.no_grad():
        before = net(x, t)
        _randomise_context_path(net)
        moved = (net(x, t) - before).abs().amax(dim=(0, 1))
    assert moved.min() > 1e-3  # every position, the far ends included


@pytest.mark.parametrize("context", ["pool", "attention"])
def test_context_network_round_trips_through_its_checkpoint_and_stays_length_agnostic(context, tmp_path):
    net = _net(context)
    _randomise_context_path(net)
    export_network(net, tmp_path / "score.safetensors")
    loaded = load_network(tmp_path, net.sde)
    assert loaded.config["context"] == context
    for length in (24, 57):
        x, t = torch.randn(2, 4, length), torch.full((2,), 0.3)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t), net(x, t))


def test_local_network_config_does_not_name_context_and_unknown_context_is_refused():
    assert "context" not in _net("local").config  # every checkpoint written before the option reads the same
    with pytest.raises(ValueError, match="context must be"):
        ConvScoreNet(VPSDE(), context="transformer", **SMALL)
