"""Training loops under Lightning: per-step randomness, a killed run resumed bit for bit, DDP on 2 CPU processes."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctrl_bio.finetune import build_phases
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.training import CTRLModule, build_trainer, fit, step_generator, trainable_state
from ctrl_bio.training.runs import merge_metrics_after_resume, stash_metrics_before_resume

ROOT = Path(__file__).resolve().parent.parent
TINY = ["domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "data.n_pairs=200", "progress=false",
        "reward=exact", "plugin.pathway.hidden=16", "plugin.pathway.depth=2", "method.pool_size=400",
        "method.sm_batch_size=64", "method.batch_size=16", "method.eval_every=4", "method.eval_batch_size=32",
        "n_steps=8", "trainer.log_every_n_steps=1"]


class KillAt(L.Callback):
    """SIGKILL the process at the end of training step ``step`` (after any checkpoint of an earlier step)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveRankParams(L.Callback):
    """Each rank writes its trainable parameters to ``<dir>/rank<r>.safetensors`` when training ends."""

    def __init__(self, dir: str):
        self.dir = dir

    def on_train_end(self, trainer, pl_module):
        params = {k: v.detach().clone().contiguous() for k, v in trainable_state(pl_module.model).items()}
        save_file(params, os.path.join(self.dir, f"rank{trainer.global_rank}.safetensors"))


def start_cli(args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}")
    return subprocess.Popen([sys.executable, "-m", "ctrl_bio.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(args, cwd=ROOT):
    return finish(start_cli(args, cwd))


def test_step_generator_is_a_function_of_seed_step_rank_and_stream():
    draw = lambda *key: torch.rand(4, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    others = [draw(1, 5, 0), draw(0, 6, 0), draw(0, 5, 1), draw(0, 5, 0, 1)]
    assert all(not torch.equal(draw(0, 5, 0), o) for o in others)


def test_ctrl_module_trains_only_the_pathway_and_reaches_the_label(small_testbed):
    tb = small_testbed
    label = tb.component_label

    def accuracy(model):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (500, 1), generator=g)
        with torch.no_grad():
            x = euler_maruyama(tb.sde, model.conditioned(y), torch.randn(500, 2, generator=g), time_grid(30),
                               generator=g).x
        return float((label.bayes_label(x) == y[:, 0]).float().mean())

    model = AugmentedScore(tb.pretrained, VectorPathway(2, (2,), hidden=32, depth=2), tb.sde)
    phases = build_phases("score_matching", sm_steps=300, sm_batch_size=256, sm_lr=1e-2, pool_size=2000)
    module = CTRLModule(model, tb.sde, LogLikelihoodReward([label.log_prob]), LabelPrior([label.class_probs()]), (2,),
                        phases=phases, n_steps=30, eval_every=0, seed=1)
    before = accuracy(model)
    fit(build_trainer(None, {"accelerator": "cpu", "devices": 1}, max_steps=module.total_steps, progress=False),
        module)
    assert before < 0.6 and accuracy(model) > 0.75
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith("pathway.")]


@pytest.mark.parametrize("estimator", ["adjoint_matching", "soft_value", "rollout_control"])
def test_finetune_command_runs_every_estimator(estimator, tmp_path):
    """`ctrl-bio finetune` runs the suites' estimators (one interface, :func:`ctrl_bio.finetune.build_phases`):
    a score-matching warm start, then the named estimator, each phase logged and the pathway trained."""
    args = TINY + [f"method.estimator={estimator}", "method.warm_start=true", "method.sm_steps=2", "method.steps=3",
                   "method.value_steps=4", "method.value_batch_size=32", "method.rollout_anchors=8",
                   "method.rollout_k=2", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(["finetune", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(row["phase"]) for row in rows if row["loss"]] == [0.0, 0.0, 1.0, 1.0, 1.0]
    weights = load_file(tmp_path / "pathway.safetensors")
    assert any(not torch.equal(w, torch.zeros_like(w)) for k, w in weights.items() if k.endswith("out.weight"))


def test_killed_finetune_resumes_to_the_same_parameters(tmp_path):
    # Hybrid: 6 score-matching steps then 4 pathwise ones; checkpoint every 4, killed at step 7 (in the second
    # phase, three steps after the last checkpoint), so the resumed run crosses the phase boundary from a checkpoint.
    # The evaluation after 4 steps is logged before the checkpoint of step 4: the resumed run must keep its row.
    args = TINY + ["method.estimator=hybrid", "method.sm_steps=6", "method.steps=4", "checkpoint_every=4"]
    whole = start_cli(["finetune", *args, f"hydra.run.dir={tmp_path}/whole"])
    killed = finish(start_cli(["finetune", *args, f"hydra.run.dir={tmp_path}/killed",
                               "callbacks=[{_target_:test_training.KillAt,step:7}]"]))
    whole = finish(whole)
    assert whole.returncode == 0, whole.stderr
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "killed/pathway.safetensors").exists()
    assert torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    resumed = run_cli(["finetune", f"resume={tmp_path}/killed", "callbacks=[]"])
    assert resumed.returncode == 0, resumed.stderr
    # One row per step: the killed process's rows before its checkpoint (0-3) are kept, and the resumed process
    # logged 4-9 only, so it continued rather than restarted (a restart would log 0-3 a second time).
    rows = list(csv.DictReader((tmp_path / "killed/metrics.csv").open()))
    assert [int(row["step"]) for row in rows if row["loss"]] == list(range(10))
    assert [int(row["step"]) for row in rows if row["objective"]] == [4, 8]
    a, b = load_file(tmp_path / "whole/pathway.safetensors"), load_file(tmp_path / "killed/pathway.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("out.weight"))


def test_resumed_runs_keep_the_metrics_logged_before_their_checkpoint(tmp_path):
    """Lightning's CSVLogger deletes metrics.csv on resume: the rows before the checkpoint are stashed and merged back;
    rows the killed process logged after its checkpoint are dropped, since the resumed run logs those steps again."""
    def write(rows, columns):
        with (tmp_path / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)

    write([{"epoch": 0, "loss": 10 - k, "step": k} for k in range(10)], ["epoch", "loss", "step"])
    stash_metrics_before_resume(tmp_path, resume_step=5)
    # The resumed process is killed again after logging steps 5-7; a second resume from step 6.
    write([{"epoch": 0, "loss": 1, "step": k} for k in range(5, 8)], ["epoch", "loss", "step"])
    stash_metrics_before_resume(tmp_path, resume_step=6)
    write([{"epoch": 0, "loss": 0.5, "step": k, "lr": 1e-3} for k in range(6, 9)], ["epoch", "loss", "step", "lr"])
    merge_metrics_after_resume(tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(9))
    assert [r["loss"] for r in rows[:6]] == ["10", "9", "8", "7", "6", "1"]
    assert rows[0]["lr"] == "" and rows[-1]["lr"] == "0.001"
    assert not (tmp_path / "metrics.before_resume.csv").exists()
    merge_metrics_after_resume(tmp_path)  # a run that was not resumed: nothing to merge, the file is untouched
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 9


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(tmp_path):
    # No hydra.run.dir: the default ${now:...} directory must be the same one for both processes.
    out = tmp_path / "params"
    out.mkdir()
    proc = run_cli(["finetune", *TINY, "method.sm_steps=6", "trainer.strategy=ddp", "trainer.devices=2",
                    "trainer.accelerator=cpu", f"callbacks=[{{_target_:test_training.SaveRankParams,dir:'{out}'}}]"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs" / "finetune").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "checkpoints/last.ckpt").is_file() and (runs[0] / "pathway.safetensors").is_file()
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    final = load_file(runs[0] / "pathway.safetensors")
    assert all(torch.equal(final[k], r0[k]) for k in final)


def test_exported_network_round_trips_and_refuses_another_sde(tmp_path):
    from ctrl_bio.nets import VectorScoreNet
    from ctrl_bio.sde import VPSDE
    from ctrl_bio.training import export_network, load_network

    net = VectorScoreNet(VPSDE(), 3, hidden=8, depth=1)
    export_network(net, tmp_path / "score.safetensors")
    again = load_network(tmp_path, VPSDE())
    x, t = torch.randn(4, 3), torch.rand(4)
    assert torch.equal(net(x, t), again(x, t)) and not any(p.requires_grad for p in again.parameters())
    with pytest.raises(ValueError, match="trained with SDE"):
        load_network(tmp_path / "score.safetensors", VPSDE(beta_max=10.0))


def test_finetune_command_refuses_a_pool_size_its_estimator_ignores(tmp_path):
    """rollout_control draws its own trajectories: a pool size set for it would be ignored, so it is refused by name."""
    args = TINY + ["method.estimator=rollout_control", "method.pool_size=64", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(["finetune", *args])
    assert proc.returncode != 0
    assert "method.pool_size=64 has no effect" in proc.stderr
