"""Hydra multirun (-m) for sweeps: one job per combination, each in its own run directory, a summary line per job."""

from __future__ import annotations

import csv
import json

from ctrl_bio.cli import main, sweep_jobs

SMOKE = ["suite=gmm", "domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "suite.n_eval=100",
         "suite.n_steps=5", "suite.n_floor_draws=1", "suite.methods=[pretrained,real_data]", "progress=false"]


def test_a_seed_sweep_of_the_gmm_suite_runs_each_job_in_its_own_directory(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["benchmark", "-m", *SMOKE, "seed=0,1", f"hydra.sweep.dir={sweep}"]) == 0
    out = capsys.readouterr().out
    assert "multirun: 2 job(s) of ctrl-bio benchmark" in out
    assert "job 0: seed=0: done" in out and "job 1: seed=1: done" in out and "2/2 job(s) done" in out
    results = [json.loads((sweep / str(n) / "results.json").read_text()) for n in (0, 1)]
    assert [r["method"] for r in results[0]["rows"]] == ["pretrained", "real_data"]
    # Each job composed its own seed: another mixture draw, other samples, other numbers.
    assert results[0]["rows"][0]["metrics"] != results[1]["rows"][0]["metrics"]
    with (sweep / "jobs.csv").open() as fh:
        jobs = list(csv.DictReader(fh))
    assert [(j["job"], j["status"], j["run_dir"]) for j in jobs] == [("0", "0", str(sweep / "0")),
                                                                     ("1", "0", str(sweep / "1"))]
    assert "seed=1" in jobs[1]["overrides"] and "suite.methods=[pretrained,real_data]" in jobs[1]["overrides"]


def test_a_failing_job_does_not_stop_the_others(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["benchmark", "-m", *SMOKE, "suite.n_eval=100,-3", f"hydra.sweep.dir={sweep}"]) != 0
    out = capsys.readouterr().out
    assert "job 0: suite.n_eval=100: done" in out and "job 1: suite.n_eval=-3: failed (exit" in out
    assert (sweep / "0" / "results.json").is_file() and "1/2 job(s) done" in out


def test_sweep_expansion_and_a_sweep_without_m(tmp_path, capsys):
    assert sweep_jobs(["seed=range(0,3)", "label=glob(logistic*)", "suite.methods=[a,b]"]) == [
        [f"seed={s}", f"label={lab}", "suite.methods=[a,b]"] for s in range(3) for lab in ("logistic_a", "logistic_b")]
    assert main(["benchmark", *SMOKE, "seed=0,1", f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ctrl-bio: error: 'seed=0,1' is a sweep: add -m to run one job per value (ctrl-bio benchmark -m ...)"
    assert main(["benchmark", "-m", *SMOKE, "seed=0,1", f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    assert "give hydra.sweep.dir instead" in capsys.readouterr().err


def test_a_training_command_sweeps_too(tmp_path, capsys):
    """finetune -m: each job a finished run of its own (pathway, model/ folder, its own config), not one shared."""
    sweep = tmp_path / "sweep"
    tiny = ["domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "progress=false", "reward=exact",
            "plugin.pathway.hidden=16", "plugin.pathway.depth=1", "method.pool_size=300", "method.sm_batch_size=64",
            "n_steps=10", "method.eval_every=0", "data.n_pairs=100", "method.sm_steps=3"]
    assert main(["finetune", "-m", *tiny, "method.gamma=1.0,2.0", f"hydra.sweep.dir={sweep}"]) == 0
    assert "job 0: method.gamma=1.0: done" in capsys.readouterr().out
    for n, gamma in ((0, 1.0), (1, 2.0)):
        assert (sweep / str(n) / "pathway.safetensors").is_file() and (sweep / str(n) / "model/config.json").is_file()
        assert json.loads((sweep / str(n) / "model/config.json").read_text())["gamma"] == gamma
