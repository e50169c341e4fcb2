"""ctrl_bio.interop: any network and any diffusers scheduler as the core's score model, against closed forms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ctrl_bio.interop import from_diffusers, sde_from_scheduler, wrap_network
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import VPSDE, DiscreteScheduleSDE, DiscreteVPSDE
from ctrl_bio.utils import append_dims


def test_the_core_never_imports_diffusers():
    code = "import sys, ctrl_bio, ctrl_bio.interop, ctrl_bio.hub; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------------------
# wrap_network on a closed form: data x0 ~ N(0, c^2 I), so x_t ~ N(0, v_t I) with v_t = alpha_t^2 c^2 + sigma_t^2.


C = 2.0


class GaussianOracle(torch.nn.Module):
    """The exact prediction of each kind for data N(0, C^2 I) under a VP-SDE, for inputs of any shape."""

    def __init__(self, sde, predicts):
        super().__init__()
        self.sde, self.predicts = sde, predicts

    def forward(self, x, t):
        alpha, sigma = append_dims(self.sde.alpha(t), x.ndim), append_dims(self.sde.sigma(t), x.ndim)
        v_t = alpha**2 * C**2 + sigma**2
        eps, x0 = sigma * x / v_t, alpha * C**2 * x / v_t  # E[eps | x_t], E[x0 | x_t]
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -x / v_t}[self.predicts]


@pytest.mark.parametrize("predicts", ["eps", "x0", "v", "score", "epsilon", "sample", "v_prediction"])
def test_wrap_network_gives_the_exact_score_from_every_prediction(predicts):
    sde = VPSDE()
    canonical = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(predicts, predicts)
    score = wrap_network(GaussianOracle(sde, canonical), predicts=predicts, sde=sde)
    x = torch.randn(6, 3, 5, dtype=torch.float64)  # sequences: the wrapper assumes no shape
    t = torch.linspace(0.05, 1.0, 6, dtype=torch.float64)
    v_t = append_dims(sde.alpha(t) ** 2 * C**2 + sde.sigma(t) ** 2, x.ndim)
    torch.testing.assert_close(score(x, t), -x / v_t, rtol=1e-12, atol=1e-12)
    # A scalar t is broadcast over the batch.
    torch.testing.assert_close(score(x, t[2]), -x / v_t[2], rtol=1e-12, atol=1e-12)


def test_wrapped_network_samples_its_data_law():
    """The exact eps-network of N(0, C^2 I), wrapped, sampled by the core's sampler: the variance comes out C^2."""
    sde = VPSDE()
    score = wrap_network(GaussianOracle(sde, "eps"), predicts="eps", sde=sde)
    g = torch.Generator().manual_seed(0)
    x1 = sde.prior_sampling((4000, 2), generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = euler_maruyama(sde, score, x1, time_grid(200, dtype=torch.float64), generator=g)
    assert abs(float(out.x.var()) - C**2) < 0.2


def test_wrap_network_refuses_bad_arguments():
    sde = VPSDE()
    with pytest.raises(ValueError, match="predicts"):
        wrap_network(torch.nn.Identity(), predicts="noise", sde=sde)
    with pytest.raises(ValueError, match="timestep"):
        wrap_network(torch.nn.Identity(), predicts="eps", sde=sde, time="timestep")

    class Flat(torch.nn.Module):
        def forward(self, x, t):
            return x.flatten(1)

    with pytest.raises(ValueError, match="shape"):
        wrap_network(Flat(), sde=sde)(torch.randn(2, 3, 4), torch.rand(2))


# --------------------------------------------------------------------------------------------------------------------
# diffusers: every beta schedule and every prediction type, on tiny UNets built from configs

diffusers = pytest.importorskip("diffusers")

TINY_UNET = dict(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)
N_STEPS = 100
SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=(torch.linspace(0.05, 0.5, N_STEPS) ** 3).tolist()),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "zero_terminal_snr": dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _scheduler(schedule, prediction_type="epsilon"):
    return diffusers.DDPMScheduler(num_train_timesteps=N_STEPS, prediction_type=prediction_type, clip_sample=False,
                                   **SCHEDULES[schedule])


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNET).eval()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_sde_marginals_equal_the_schedulers_alphas_cumprod(schedule):
    scheduler = _scheduler(schedule)
    sde = sde_from_scheduler(scheduler)
    # A named schedule is kept by its settings (what a saved network records); the rest by alphas_cumprod itself.
    assert isinstance(sde, DiscreteVPSDE) == (schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"))
    abar = scheduler.alphas_cumprod.double().clamp_min(DiscreteScheduleSDE.MIN_ALPHA_CUMPROD)
    t_n = (torch.arange(N_STEPS, dtype=torch.float64) + 1) / N_STEPS  # step n sits at t = (n + 1) / N
    # Equal up to the float32 round-off of the scheduler's own cumulative product.
    torch.testing.assert_close(sde.alpha(t_n) ** 2, abar, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(sde.sigma(t_n) ** 2, 1 - abar, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sde.timestep(t_n), torch.arange(N_STEPS, dtype=torch.float64), rtol=0, atol=1e-12)
    # beta = -2 d/dt log alpha >= 0, piecewise constant: integrating it back gives log alpha.
    grid = torch.linspace(0, 1, 8 * N_STEPS + 1, dtype=torch.float64)
    mid = 0.5 * (grid[1:] + grid[:-1])
    assert (sde.beta(mid) >= 0).all()
    torch.testing.assert_close(-0.5 * torch.cumsum(sde.beta(mid) * (grid[1:] - grid[:-1]), 0),
                               sde.log_alpha(grid[1:]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_converted_score_equals_the_closed_form(unet, schedule, prediction_type):
    scheduler = _scheduler(schedule, prediction_type)
    score, sde = from_diffusers(unet, scheduler)
    n = torch.tensor([3, 40, 77, N_STEPS - 1])
    t = (n.double() + 1) / N_STEPS
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    abar = append_dims(scheduler.alphas_cumprod.double()[n].clamp_min(DiscreteScheduleSDE.MIN_ALPHA_CUMPROD), 4)
    with torch.no_grad():
        raw = unet(x, n).sample.double()
        s = score(x.double(), t)
    x = x.double()
    if prediction_type == "epsilon":
        expected = -raw / (1 - abar).sqrt()
    elif prediction_type == "v_prediction":
        expected = -(abar.sqrt() * raw + (1 - abar).sqrt() * x) / (1 - abar).sqrt()
    else:
        expected = -(x - abar.sqrt() * raw) / (1 - abar)
    torch.testing.assert_close(s, expected, rtol=2e-4, atol=2e-4)
    # Independently: Tweedie's x0_hat from the converted score is the scheduler's own pred_original_sample.
    for i in range(3):  # the zero-SNR last step has sigma = 1, alpha ~ 0: x0_hat is ill-conditioned there
        x0_diffusers = scheduler.step(raw[i:i + 1].float(), int(n[i]), x[i:i + 1].float()).pred_original_sample
        torch.testing.assert_close(sde.denoise(x[i:i + 1], t[i:i + 1], s[i:i + 1]).float(), x0_diffusers,
                                   rtol=1e-3, atol=1e-3)


def test_from_diffusers_conditional_unet_with_a_fixed_prompt():
    from domains.images.stable_diffusion import TINY_UNET as TINY_COND

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_COND).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012,
                                        prediction_type="v_prediction")
    prompt = torch.randn(1, 5, TINY_COND["cross_attention_dim"])
    score, sde = from_diffusers(unet, scheduler, encoder_hidden_states=prompt)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    alpha, sigma = append_dims(sde.alpha(t), 4), append_dims(sde.sigma(t), 4)
    with torch.no_grad():
        v = unet(x, sde.timestep(t), encoder_hidden_states=prompt.expand(3, -1, -1)).sample
        torch.testing.assert_close(score(x, t), -(alpha * v + sigma * x) / sigma, rtol=1e-5, atol=1e-5)
        # Another prompt per call overrides the fixed one.
        other = torch.randn(3, 5, TINY_COND["cross_attention_dim"])
        v2 = unet(x, sde.timestep(t), encoder_hidden_states=other).sample
        torch.testing.assert_close(score(x, t, encoder_hidden_states=other), -(alpha * v2 + sigma * x) / sigma,
                                   rtol=1e-5, atol=1e-5)


def test_ctrl_augments_a_from_diffusers_unet_bit_for_bit_at_zero(unet):
    """UNetAugmentedScore (label embedding in the UNet's time embedding) on from_diffusers' score: at zero
    initialisation the augmented sampler is the pre-trained one, bit for bit, with zero KL."""
    pytest.importorskip("peft")
    import copy

    from domains.images.unet import UNetAugmentedScore

    score, sde = from_diffusers(copy.deepcopy(unet), _scheduler("squaredcos_cap_v2", "v_prediction"))
    g = torch.Generator().manual_seed(0)
    times = time_grid(4)
    x_init, noise = torch.randn(2, 2, 8, 8, generator=g), torch.randn(4, 2, 2, 8, 8, generator=g)
    with torch.no_grad():
        ref = euler_maruyama(sde, score, x_init, times, noise=noise).x
        model = UNetAugmentedScore(score, (3,), lora_rank=2)
        out = euler_maruyama(sde, model.conditioned(torch.tensor([[0], [2]])), x_init, times, noise=noise)
    assert torch.equal(out.x, ref) and torch.equal(out.kl, torch.zeros(2))


# --------------------------------------------------------------------------------------------------------------------
# docs/own_model.md runs as written


def python_blocks(path):
    """The ```python blocks of a Markdown file, in order."""
    import re
    from pathlib import Path

    return re.findall(r"^```python\n(.*?)^```", Path(path).read_text(), flags=re.S | re.M)


def test_own_model_doc_runs(capsys):
    from pathlib import Path

    pytest.importorskip("peft")
    blocks = python_blocks(Path(__file__).resolve().parents[1] / "docs" / "own_model.md")
    assert len(blocks) == 3  # the vector eps-network, the diffusers UNet2DModel, save and share
    for block in blocks:
        exec(compile(block, "<docs/own_model.md>", "exec"), {"__name__": "__own_model__"})
    out = capsys.readouterr().out
    assert "fine-tuned, asked for y = 1" in out and "samples (2, 3, 8, 8)" in out
    assert "saved ['README.md', 'base', 'config.json', 'model.safetensors']" in out
