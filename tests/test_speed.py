"""Fast checks of the 1-D score network and the speed suite (no timing assertions: speed is a benchmark)."""

from __future__ import annotations

import math

import pytest
import torch

from ctrl_bio.model import EmbeddingAugmentedScore
from ctrl_bio.nets import ConvScoreNet
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE
from ctrl_bio.speed import _tensor_peak_bytes, run_speed_suite


def tiny_net(**kwargs) -> ConvScoreNet:
    return ConvScoreNet(VPSDE(), hidden=16, n_blocks=2, emb_dim=16, n_fourier=8, **kwargs)


@pytest.mark.parametrize("length", [200, 37])
def test_conv_score_net_keeps_the_input_shape(length: int) -> None:
    net = tiny_net()
    x, t = torch.randn(3, 4, length), torch.rand(3)
    assert net(x, t).shape == (3, 4, length)
    assert net(x, t, torch.randn(3, 16)).shape == (3, 4, length)
    assert net(x, torch.tensor(0.5)).shape == (3, 4, length)


def test_conv_score_net_is_a_score_of_its_eps_prediction() -> None:
    sde, net = VPSDE(), tiny_net()
    x, t = torch.randn(2, 4, 20), torch.rand(2)
    torch.testing.assert_close(net(x, t), -net.predict_eps(x, t) / sde.sigma(t)[:, None, None])


def test_extra_embedding_reaches_the_output() -> None:
    net = tiny_net()
    x, t = torch.randn(2, 4, 20), torch.rand(2)
    assert not torch.allclose(net(x, t, torch.randn(2, 16)), net(x, t))


def test_conv_score_net_has_about_a_million_parameters_at_defaults() -> None:
    n = sum(p.numel() for p in ConvScoreNet(VPSDE()).parameters())
    assert 700_000 <= n <= 1_500_000


def test_conv_score_net_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="shape"):
        tiny_net()(torch.randn(2, 3, 10), torch.rand(2))


def test_zero_label_embedding_reproduces_the_frozen_net_bit_for_bit() -> None:
    sde, net = VPSDE(), tiny_net()
    model = EmbeddingAugmentedScore(net, (4,), 16)
    gen = torch.Generator().manual_seed(0)
    n_steps, shape = 6, (5, 4, 24)
    x_init, noise = torch.randn(shape, generator=gen), torch.randn(n_steps, *shape, generator=gen)
    times = time_grid(n_steps)
    y = torch.tensor([[0], [1], [2], [3], [-1]])
    with torch.no_grad():
        ref = euler_maruyama(sde, net, x_init, times, noise=noise)
        out = euler_maruyama(sde, model.conditioned(y), x_init, times, noise=noise)
    assert torch.equal(out.x, ref.x)
    assert torch.equal(out.kl, torch.zeros(5))


def test_tensor_tracker_sees_a_temporary_allocation() -> None:
    def make_and_drop() -> None:
        big = torch.ones(1_000_000)  # 4 MB, freed on return
        del big

    peak = _tensor_peak_bytes(make_and_drop)
    assert peak is None or peak >= 4_000_000


def test_speed_suite_on_a_tiny_config_returns_finite_positive_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    # One thread in the measurement processes: on a shared 2-core machine two OpenMP threads per process
    # can wait on each other for whole time slices. The tensor tracker is tested above, so it is skipped.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_speed_suite(batch_size=2, n_steps=4, length=16, hidden=16, n_blocks=2, emb_dim=16, repeats=1,
                             device="cpu", track_tensors=False)
    assert result.suite == "speed"
    (row,) = result.rows
    assert (row.method, row.label) == ("ctrl", "celltype-like 4 classes")
    for name in ("overhead_ratio", "overhead_ratio_checkpointed", "memory_ratio_100_25"):
        assert math.isfinite(row.metrics[name]) and row.metrics[name] > 0, name
    assert row.metrics["n_parameters"] > 0
    assert "memory_method" in result.info


def test_forward_pair_shares_the_trunk_and_matches_two_forwards() -> None:
    net = ConvScoreNet(VPSDE(), hidden=16, n_blocks=4, emb_dim=16, label_blocks=2)
    x, t, emb = torch.randn(3, 4, 20), torch.rand(3), torch.randn(3, 16)
    s, s_pre = net.forward_pair(x, t, emb)
    torch.testing.assert_close(s, net(x, t, emb))
    torch.testing.assert_close(s_pre, net(x, t))
    with pytest.raises(ValueError, match="label_blocks"):
        ConvScoreNet(VPSDE(), n_blocks=4, label_blocks=5)


def test_speed_suite_runs_from_the_command_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ctrl-bio benchmark suite=speed`` composes (no label, so no ``data.n_pairs``) and writes its table.

    The measurement processes are run in this process: what is checked here is the command line, the processes
    themselves are covered by the test above.
    """
    import json

    from ctrl_bio import speed
    from ctrl_bio.cli import main

    monkeypatch.setattr(speed, "in_fresh_process", lambda function, env=None, **kw: getattr(speed, function)(**kw))
    run_dir = tmp_path / "run"
    code = main(["benchmark", "suite=speed", "suite.batch_size=2", "suite.n_steps=3", "suite.length=16",
                 "suite.hidden=16", "suite.n_blocks=2", "suite.emb_dim=16", "suite.repeats=1", "suite.label_blocks=1",
                 "+suite.track_tensors=false", "device=cpu", f"hydra.run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    (row,) = results["rows"]
    assert results["suite"] == "speed" and row["metrics"]["n_steps"] == 3
    assert row["metrics"]["overhead_ratio"] > 0
    assert (run_dir / "results.md").is_file()
