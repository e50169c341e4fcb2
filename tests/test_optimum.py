"""The optimum of J as a row: importance resampling of a pool by p(y|x)^tilt, its KL, and fraction_of_optimum."""

import math

import pytest
import torch

from ctrl_bio.harness import Row
from ctrl_bio.objective import WeightedPool
from ctrl_bio.optimum import add_fraction_of_optimum, draw_per_request, draw_tilted


def test_tilted_draw_matches_the_weights_and_its_kl_is_that_of_the_reweighting():
    """A pool of two points, p(y=0 | x) = 0.8 / 0.2: tilted by 2 the first point has weight 16/17 for y = 0; the KL of
    the reweighted law to the uniform pool is sum_i w_i log(2 w_i); the ESS is Kish's."""
    x0 = torch.tensor([[1.0], [-1.0]])
    log_probs = torch.tensor([[0.8, 0.2], [0.2, 0.8]]).log()
    pool = WeightedPool(x0, [log_probs], tilt=2.0)
    y = torch.zeros(20000, 1, dtype=torch.long)
    draw = draw_tilted(pool, y, torch.Generator().manual_seed(0))
    w = torch.tensor([16 / 17, 1 / 17], dtype=torch.float64)
    assert abs(float((draw.x[:, 0] == 1.0).double().mean()) - float(w[0])) < 0.01
    assert math.isclose(float(draw.kl[0]), float((w * (2 * w).log()).sum()), rel_tol=1e-5)
    assert math.isclose(draw.ess, float(1 / (w**2).sum()), rel_tol=1e-6)
    both = draw_tilted(pool, torch.tensor([[0], [1]]), torch.Generator().manual_seed(0))
    assert torch.allclose(both.kl[0], both.kl[1])  # the two labels are mirror images


def test_per_request_draw_follows_each_requests_own_weights():
    """Continuous labels tilt each request differently: request 0 weights the pool (1, 3) by exp, request 1 is
    uniform (KL 0, ESS = N), request 2 puts all its weight on item 1 (ESS 1, KL log N)."""
    log_w = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [-1e4, 0.0]])
    draws = [draw_per_request(log_w, torch.Generator().manual_seed(s)) for s in range(4000)]
    index = torch.stack([d.index for d in draws]).double()
    assert abs(float(index[:, 0].mean()) - 0.75) < 0.03 and abs(float(index[:, 1].mean()) - 0.5) < 0.03
    assert bool((index[:, 2] == 1).all())
    d = draws[0]
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert math.isclose(float(d.kl[0]), float((w * (2 * w).log()).sum()), rel_tol=1e-5)
    assert math.isclose(float(d.kl[1]), 0.0, abs_tol=1e-7) and math.isclose(float(d.kl[2]), math.log(2), rel_tol=1e-5)
    assert torch.allclose(d.ess, torch.tensor([1 / 0.625, 2.0, 1.0]))


def test_fraction_of_optimum_is_the_share_of_the_optimums_gain_for_learned_rows_only():
    rows = [Row("pretrained", "a", {"accuracy": 0.3}), Row("optimum", "a", {"accuracy": 0.7}),
            Row("ctrl", "a", {"accuracy": 0.6}), Row("real_data", "a", {"accuracy": 0.9}),
            Row("cfg", "a", {"accuracy": 0.2}), Row("ctrl", "b", {"accuracy": 0.5})]
    add_fraction_of_optimum(rows)
    assert math.isclose(rows[2].metrics["fraction_of_optimum"], 0.75)
    assert math.isclose(rows[4].metrics["fraction_of_optimum"], -0.25)
    assert "fraction_of_optimum" not in rows[0].metrics | rows[1].metrics | rows[3].metrics
    assert "fraction_of_optimum" not in rows[5].metrics  # label b has no reference rows


def test_the_plot_shows_the_rows_between_floor_and_optimum_and_needs_both(tmp_path):
    from ctrl_bio.plots import plot_fraction_of_optimum

    rows = [Row("pretrained", "a", {"accuracy": 0.3}), Row("optimum", "a", {"accuracy": 0.7}),
            Row("ctrl", "a", {"accuracy": 0.6})]
    add_fraction_of_optimum(rows)
    path = plot_fraction_of_optimum(rows, tmp_path / "f.png")
    assert path is not None and path.stat().st_size > 1000
    assert plot_fraction_of_optimum(rows[:1] + rows[2:], tmp_path / "g.png") is None
    assert not (tmp_path / "g.png").exists()


def test_the_optimum_row_tilts_n_pre_trained_samples_shared_with_best_of_n(tmp_path):
    """``baselines.optimum.n`` reaches the row: its pool is that many pre-trained samples (the ``pretrained`` row's
    and best_of_n's chunks first, projected), tilted by p(y|x)^(gamma/alpha) of the reward."""
    from types import SimpleNamespace

    from ctrl_bio.reward import LogLikelihoodReward
    from ctrl_bio.rows import RowRunner

    calls = []

    def sample(score_fn_for, y, seed_offset=2000):
        calls.append(seed_offset)
        g = torch.Generator().manual_seed(seed_offset)
        return torch.randn(y.shape[0], 1, generator=g), torch.zeros(y.shape[0])

    ctx = SimpleNamespace(domain=SimpleNamespace(project=torch.sign), seed=0, n_classes=(2,), pretrained=None,
                          sample=sample, n_steps=5, y_eval=torch.tensor([[0], [1], [0], [1]]))
    runner = RowRunner(ctx, {"gamma": 8.0, "alpha": 2.0}, {}, {"optimum": {"n": 10}}, tmp_path, False, {})
    runner._reward = LogLikelihoodReward([lambda x: torch.cat([x, -x], 1).mul(3.0).log_softmax(1)])
    x, kl, extra = runner.row_optimum()
    assert calls == [7000, 7001, 7002]  # ceil(10 / 4) chunks of the pretrained row's seeds
    assert runner.info["optimum"] == {"pool_size": 10, "tilt": 4.0, "ess": extra["effective_sample_size"],
                                      "reward": "classifier"}
    assert set(x.unique().tolist()) <= {-1.0, 1.0}  # projected
    assert (x[:, 0] == torch.tensor([1.0, -1.0, 1.0, -1.0])).float().mean() >= 0.75  # label 0 wants x > 0
    assert (kl > 0).all()
    runner.pretrained_chunk(0)
    assert calls == [7000, 7001, 7002]  # best_of_n reuses them


def exact_sign(domain):
    """An exact binned label for the test below: class 0 below 0, class 1 above."""
    from ctrl_bio.labels import bin_log_prob

    return bin_log_prob(lambda x: x[:, 0], [0.0])


def _runner(tmp_path, optimum: dict):
    from types import SimpleNamespace

    from ctrl_bio.reward import LogLikelihoodReward
    from ctrl_bio.rows import RowRunner

    def sample(score_fn_for, y, seed_offset=2000):
        return torch.randn(y.shape[0], 1, generator=torch.Generator().manual_seed(seed_offset)), torch.zeros(y.shape[0])

    ctx = SimpleNamespace(domain=SimpleNamespace(project=torch.sign), seed=0, n_classes=(2,), pretrained=None,
                          sample=sample, n_steps=5, y_eval=torch.tensor([[0], [1]] * 8),
                          specs=[{"name": "sign", "exact": {"callable": "test_optimum:exact_sign"}}])
    runner = RowRunner(ctx, {"gamma": 4.0}, {}, {"optimum": optimum}, tmp_path, False, {})
    # The reward classifier wants the opposite of the exact label: the two optima are told apart.
    runner._reward = LogLikelihoodReward([lambda x: torch.cat([x, -x], 1).mul(3.0).log_softmax(1)])
    return runner


def test_the_optimum_of_the_exact_reward_is_what_ctrl_pg_optimises(tmp_path):
    """``baselines.optimum.reward=exact`` tilts by the label's exact function (ctrl_pg's and ddpo's reward) instead of
    the reward classifier; anything else is refused in one line."""
    x, _, _ = _runner(tmp_path, {"n": 64, "reward": "exact"}).row_optimum()
    wanted = torch.tensor([-1.0, 1.0] * 8)
    assert torch.equal(x[:, 0], wanted)  # the exact label's tilt p^4 with log p = log 1e-6 off the bin: conditioning
    x_classifier, _, _ = _runner(tmp_path, {"n": 64}).row_optimum()
    assert (x_classifier[:, 0] == -wanted).float().mean() >= 0.75
    with pytest.raises(ValueError, match="classifier or exact"):
        _runner(tmp_path, {"reward": "oracle"}).row_optimum()


def test_a_baseline_setting_no_row_reads_is_refused(tmp_path):
    from ctrl_bio.rows import check_baselines

    with pytest.raises(ValueError, match=r"suite.baselines.optimum.nn: the optimum row reads only n, reward"):
        _runner(tmp_path, {"nn": 3})
    with pytest.raises(ValueError, match="suite.baselines.best_of_m: no such baseline row"):
        check_baselines({"best_of_m": {"n": 4}})
    check_baselines({"classifier_guidance": {"hidden": 64, "steps": 10}})  # forwarded to the domain's network


@pytest.mark.parametrize("suite", ["dna", "molecules", "images"])
def test_every_shipped_baseline_setting_is_read(suite):
    from pathlib import Path

    from omegaconf import OmegaConf

    from ctrl_bio.rows import check_baselines

    path = Path(__file__).resolve().parents[1] / "configs" / "suite" / f"{suite}.yaml"
    baselines = OmegaConf.to_container(OmegaConf.load(path).suite.baselines, resolve=False)
    assert "optimum" in baselines
    check_baselines(baselines)
