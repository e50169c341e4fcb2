"""``ctrl-bio sample``: from a finetune run or its exported ``model/`` folder, device, plot and sampler choice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ctrl_bio.cli import main

GMM = ["domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "progress=false"]
TINY_FT = ["plugin.pathway.hidden=32", "plugin.pathway.depth=2", "method.pool_size=1000", "method.sm_batch_size=128",
           "n_steps=20", "method.eval_every=0", "data.n_pairs=200", "reward=exact", "method.sm_steps=5"]


def read_samples(folder: Path) -> list[list[str]]:
    with (folder / "samples.csv").open() as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A tiny finetune run on the exact pre-trained mixture score (the default), with its model/ folder."""
    ft = tmp_path_factory.mktemp("sample") / "ft"
    assert main(["finetune", *GMM, *TINY_FT, f"hydra.run.dir={ft}"]) == 0
    return ft


def test_finetune_exports_a_hub_folder_that_samples_like_the_run(finetuned, tmp_path, monkeypatch):
    folder = finetuned / "model"
    for name in ("config.json", "model.safetensors", "README.md", "base/config.json", "base/model.safetensors"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["ctrl_bio"]["kind"] == "ctrl_model" and config["base_model"] == "base"
    assert config["extra"]["labels"][0]["name"] == "component" and config["extra"]["x_shape"] == [2]
    assert config["estimator"] == "score_matching" and "alpha" in config
    card = (folder / "README.md").read_text()
    assert "`component` (2 classes)" in card and "alpha (KL weight)" in card

    # The folder moves: copied elsewhere and sampled from another working directory, it gives the run's samples.
    import shutil

    moved = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(folder, moved)
    monkeypatch.chdir(tmp_path)
    args = ["y=1", "n=50", "seed=3", "progress=false"]
    assert main(["sample", f"run={finetuned}", *args, f"hydra.run.dir={tmp_path / 's_run'}"]) == 0
    assert main(["sample", f"run={moved}", *args, f"hydra.run.dir={tmp_path / 's_folder'}"]) == 0
    from_run, from_folder = read_samples(tmp_path / "s_run"), read_samples(tmp_path / "s_folder")
    assert len(from_run) == 51 and from_run == from_folder
    assert main(["sample", f"run={finetuned}", "y=1", "n=50", "seed=4", "progress=false",
                 f"hydra.run.dir={tmp_path / 's_other'}"]) == 0
    assert read_samples(tmp_path / "s_other") != from_run  # the comparison above can fail


def test_a_folder_without_ctrl_bio_extra_is_one_line(finetuned, tmp_path, capsys):
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(finetuned / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["extra"]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["sample", f"run={folder}", f"hydra.run.dir={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json has no extra" in err and len(err.splitlines()) == 1


def test_sampler_choice_plot_and_device(finetuned, tmp_path, capsys):
    common = ["y=0", "n=40", "seed=1", "device=cpu", "progress=true"]
    for name, sampler in (("em", "sampler=em"), ("ddim", "sampler=ddim"), ("ddim2", "sampler=ddim")):
        assert main(["sample", f"run={finetuned / 'model'}", *common, sampler,
                     f"hydra.run.dir={tmp_path / name}"]) == 0
        assert (tmp_path / name / "samples.png").stat().st_size > 1000
    em, ddim = read_samples(tmp_path / "em"), read_samples(tmp_path / "ddim")
    assert len(ddim) == 41 and ddim == read_samples(tmp_path / "ddim2") and ddim != em
    # DDIM lands on the mixture too: its samples are as likely under it as Euler-Maruyama's (on average mixture
    # samples score -3.6 nats, N(0, I) draws -7.2).
    import torch

    from domains.gmm.testbed import make_testbed

    mixture = make_testbed(dim=2, n_components=4, n_classes=2, seed=0).mixture
    loglik = {k: mixture.log_prob(torch.tensor([[float(v) for v in r[:2]] for r in rows[1:]])).mean().item()
              for k, rows in (("em", em), ("ddim", ddim))}
    assert abs(loglik["em"] - loglik["ddim"]) < 1.0, loglik
    assert "plot:" in capsys.readouterr().out

    assert main(["sample", f"run={finetuned}", "sampler=heun", f"hydra.run.dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sampler must be em (Euler-Maruyama) or ddim" in err and len(err.splitlines()) == 1


def test_ddim_with_the_exact_score_maps_the_prior_to_a_gaussian_data_law():
    """For x_0 ~ N(m, diag v), p_t = N(alpha_t m, alpha_t^2 v + sigma_t^2): DDIM with this exact score carries N(0, I)
    at t = 1 to the data law at t_end (the probability-flow ODE's transport), its error shrinking with the steps."""
    import torch

    from ctrl_bio.sampling import ddim, time_grid
    from ctrl_bio.sde import VPSDE

    torch.manual_seed(0)
    sde, m, v = VPSDE(), torch.tensor([1.5, -2.0]), torch.tensor([0.25, 2.0])

    def score(x, t):
        a, s2 = sde.alpha(t)[:, None], sde.sigma(t)[:, None] ** 2
        return (a * m - x) / (a**2 * v + s2)

    z = torch.randn(100_000, 2, generator=torch.Generator().manual_seed(0))
    z = (z - z.mean(0)) / z.std(0)  # exactly N(0, I)'s first two moments: what is left is the sampler's error
    t_end = torch.tensor(1e-3)
    mean_end = sde.alpha(t_end) * m
    var_end = sde.alpha(t_end) ** 2 * v + sde.sigma(t_end) ** 2
    errors = []
    for n_steps in (20, 500):
        x = ddim(sde, score, z, time_grid(n_steps, 1e-3, spacing="quadratic"))
        errors.append((x.var(0) / var_end - 1).abs().max().item())
    assert errors[1] < 0.01 < errors[0]
    assert torch.allclose(x.mean(0), mean_end, atol=0.02)  # the start's alpha_1 m = 0.007 m offset, carried along
    assert torch.equal(ddim(sde, score, z[:5], time_grid(7)), ddim(sde, score, z[:5], time_grid(7)))
