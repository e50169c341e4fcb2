"""``ctrl-bio pretrain | train-classifier | finetune | sample`` end to end on tiny settings, and their bad input."""

import csv
import json

import lightning as L
import pytest
import torch

from ctrl_bio.cli import main
from ctrl_bio.nets import VectorScoreNet
from domains.gmm.domain import learned_pretrained, pretrained_quality
from domains.gmm.testbed import make_testbed

GMM = ["domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "progress=false", "trainer.log_every_n_steps=1"]
TINY_FT = ["plugin.pathway.hidden=32", "plugin.pathway.depth=2", "method.pool_size=2000", "method.sm_batch_size=256",
           "n_steps=30", "method.eval_every=0", "data.n_pairs=400"]


class PoisonAt(L.Callback):
    """Turn the trainable parameters into NaN at the start of training step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def test_help_lists_every_command_with_an_example(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "train-classifier", "finetune", "sample", "benchmark"):
        assert f"\n  {command} " in out and f"e.g. ctrl-bio {command}" in out


def test_pretrain_lowers_the_distance_to_the_mixture_and_feeds_finetune(tmp_path):
    run = tmp_path / "pre"
    assert main(["pretrain", *GMM, "steps=400", "batch_size=256", "plugin.n_train=5000", "plugin.score_net.hidden=64",
                 "checkpoint_every=200", f"hydra.run.dir={run}"]) == 0
    for name in ("score.safetensors", "score.json", "quality.json", "config.yaml", "metrics.csv", "run.log",
                 "checkpoints/last.ckpt", "checkpoints/step=400.ckpt"):
        assert (run / name).is_file(), name
    trained = json.loads((run / "quality.json").read_text())
    testbed = make_testbed(dim=2, n_components=4, n_classes=2, seed=0)
    torch.manual_seed(0)
    untrained = pretrained_quality(testbed, VectorScoreNet(testbed.sde, 2, hidden=64))
    # 400 steps get most of the way (4,000 reach the noise floor: docs/training.md).
    assert trained["distance_to_mixture"] < 0.1 * untrained["distance_to_mixture"]
    net = learned_pretrained(testbed, checkpoint=str(run))
    x, t = torch.randn(5, 2), torch.full((5,), 0.3)
    assert not any(p.requires_grad for p in net.parameters()) and net(x, t).shape == (5, 2)

    ft = tmp_path / "ft"
    assert main(["finetune", *GMM, *TINY_FT, "reward=exact", "pretrained=learned", f"pretrained.checkpoint={run}",
                 "method.sm_steps=5", f"hydra.run.dir={ft}"]) == 0
    assert (ft / "pathway.safetensors").is_file()


def test_classifier_finetune_and_sample_end_to_end(tmp_path, capsys):
    clf = tmp_path / "clf"
    assert main(["train-classifier", *GMM, "data.n_pairs=400", "label.component.training.epochs=30",
                 f"hydra.run.dir={clf}"]) == 0
    meta = json.loads((clf / "classifiers/component.json").read_text())
    assert meta["n_classes"] == 2 and meta["report"]["accuracy"] > 0.8
    assert {"ece_before", "ece_after", "temperature"} <= meta["report"].keys()
    assert "ECE" in capsys.readouterr().out

    ft = tmp_path / "ft"
    assert main(["finetune", *GMM, *TINY_FT, f"classifier={clf}", "method.sm_steps=300", "method.sm_lr=1e-2",
                 f"hydra.run.dir={ft}"]) == 0
    assert json.loads((ft / "pathway.json").read_text())["labels"][0]["name"] == "component"
    assert (ft / "checkpoints/last.ckpt").is_file() and (ft / "metrics.csv").is_file()

    out = tmp_path / "s"
    assert main(["sample", f"run={ft}", "y=1", "n=300", f"hydra.run.dir={out}"]) == 0
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 300 and list(rows[0]) == ["x0", "x1", "component"]
    assert {r["component"] for r in rows} == {"1"}
    x = torch.tensor([[float(r["x0"]), float(r["x1"])] for r in rows])
    label = make_testbed(dim=2, n_components=4, n_classes=2, seed=0).component_label
    assert (label.bayes_label(x) == 1).float().mean() > 0.75   # the pre-trained model: about the class weight

    capsys.readouterr()
    for y, needle in (("y=5", "label 0 takes values in 0..1"), ("y=[0,1]", "fine-tuned for 1 label")):
        assert main(["sample", f"run={ft}", y, f"hydra.run.dir={tmp_path}/bad"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_learned_pretrained_is_trained_once_and_cached_in_the_run_dir(tmp_path):
    ft = tmp_path / "ft"
    args = ["finetune", *GMM, *TINY_FT, "reward=exact", "pretrained=learned", "pretrained.steps=20",
            "pretrained.n_train=1000", "pretrained.hidden=16", "method.sm_steps=3"]
    assert main([*args, f"hydra.run.dir={ft}"]) == 0
    cached = list((ft / "pretrained").glob("*/score.safetensors"))
    assert len(cached) == 1
    assert main(["sample", f"run={ft}", "y=0", "n=10", f"hydra.run.dir={tmp_path}/s"]) == 0
    assert list((ft / "pretrained").glob("*/score.safetensors")) == cached


def test_two_labels_are_fine_tuned_together_and_requested_as_a_list(tmp_path):
    ft = tmp_path / "ft"
    assert main(["finetune", *GMM, *TINY_FT, "label=[logistic_a,logistic_b]", "reward=exact", "method.sm_steps=5",
                 f"hydra.run.dir={ft}"]) == 0
    labels = json.loads((ft / "pathway.json").read_text())["labels"]
    assert [lab["name"] for lab in labels] == ["logistic_a", "logistic_b"]
    assert main(["sample", f"run={ft}", "y=[1,0]", "n=4", f"hydra.run.dir={tmp_path}/s"]) == 0
    rows = list(csv.DictReader((tmp_path / "s/samples.csv").open()))
    assert len(rows) == 4 and all(r["logistic_a"] == "1" and r["logistic_b"] == "0" for r in rows)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    ft = tmp_path / "ft"
    code = main(["finetune", *GMM, *TINY_FT, "reward=exact", "method.sm_steps=10", "checkpoint_every=2",
                 "callbacks=[{_target_:test_commands.PoisonAt,step:3}]", f"hydra.run.dir={ft}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "loss became nan at step 3" in err and len(err.splitlines()) == 1
    state = torch.load(ft / "checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (ft / "pathway.safetensors").exists()
    assert "stopped: score_matching loss became nan at step 3" in (ft / "run.log").read_text()


@pytest.mark.parametrize("args,needle", [
    (["finetune", "resume=/nonexistent/run"], "resume: no checkpoint at '/nonexistent/run'"),
    (["pretrain", "resume=/nonexistent/last.ckpt"], "resume: no checkpoint"),
    (["sample"], "sample needs run="),
    (["sample", "run=/nonexistent/run"], "no 'config.yaml'"),
    (["finetune", "label=nope"], "label/nope"),
    (["train-classifier", "label=nope"], "label/nope"),
    (["finetune", "classifier=/nonexistent/clf", "data.n_pairs=50"], "classifier: no '/nonexistent/clf"),
    (["finetune", "reward=bogus", "data.n_pairs=50"], "reward must be 'classifier' or 'exact'"),
    (["pretrain", "nope=1"], "unknown config key 'nope'"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle, capsys, tmp_path):
    code = main([*args, f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_trainer_logger_csv_and_tensorboard(tmp_path, capsys):
    """trainer.logger=tensorboard writes event files beside metrics.csv, with the same loss values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pre = ["pretrain", *GMM, "steps=6", "batch_size=64", "plugin.n_train=500", "plugin.score_net.hidden=16",
           "evaluate=false"]
    assert main([*pre, f"hydra.run.dir={tmp_path / 'csv'}"]) == 0
    assert (tmp_path / "csv/metrics.csv").is_file() and not (tmp_path / "csv/tensorboard").exists()
    assert main([*pre, "trainer.logger=tensorboard", f"hydra.run.dir={tmp_path / 'tb'}"]) == 0
    events = EventAccumulator(str(tmp_path / "tb/tensorboard"))
    events.Reload()
    rows = [r for r in csv.DictReader((tmp_path / "tb/metrics.csv").open()) if r.get("loss")]
    logged = events.Scalars("loss")
    assert len(logged) == len(rows) == 6
    assert [round(e.value, 5) for e in logged] == [round(float(r["loss"]), 5) for r in rows]

    capsys.readouterr()
    assert main([*pre, "trainer.logger=mlflow", f"hydra.run.dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainer.logger='mlflow': choose csv, tensorboard or wandb" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_trainer_logger_wandb_is_offline_or_names_its_extra(tmp_path, capsys):
    import importlib.util

    args = ["pretrain", *GMM, "steps=2", "batch_size=32", "plugin.n_train=200", "plugin.score_net.hidden=8",
            "evaluate=false", "trainer.logger=wandb", f"hydra.run.dir={tmp_path / 'wb'}"]
    if importlib.util.find_spec("wandb") is None:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err == "ctrl-bio: error: trainer.logger=wandb needs the wandb package: pip install 'ctrl-bio[wandb]'"
    else:
        assert main(args) == 0
        assert list((tmp_path / "wb/wandb").glob("offline-run-*"))


class TinyEpsNet(torch.nn.Module):
    """A user's own eps-network, named on the command line by domain.network._target_=test_commands.TinyEpsNet."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.mlp(torch.cat([x, t[:, None]], dim=1))


def test_own_network_and_data_file_from_the_command_line(tmp_path, monkeypatch, capsys):
    """domain=custom: pretrain a user's nn.Module on a .npy file, fine-tune a label on it, sample; no Domain class."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])
    x = centres[torch.randint(0, 2, (2000,), generator=g)] + 0.4 * torch.randn(2000, 2, generator=g)
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "pairs.npz", x=x[:300].numpy(), y=(x[:300, 0] > 0).long().numpy())
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "right.yaml").write_text(f"""# @package label.right
name: right
domain: custom
type: categorical
classes: 2
pairs: {{callable: "domains.custom.domain:file_pairs", kwargs: {{file: {tmp_path / 'pairs.npz'}}}}}
training: {{epochs: 20}}
""")
    own = ["domain=custom", f"domain.data={tmp_path / 'x.npy'}", "domain.network._target_=test_commands.TinyEpsNet",
           "+domain.network.dim=2", "progress=false"]
    pre = tmp_path / "pre"
    assert main(["pretrain", *own, "steps=300", "batch_size=256", "evaluate=false", f"hydra.run.dir={pre}"]) == 0
    assert json.loads((pre / "score.json").read_text())["config"]["network"]["_target_"] == "test_commands.TinyEpsNet"
    ft = tmp_path / "ft"
    assert main(["finetune", *own, f"domain.checkpoint={pre}", "label=right", f"hydra.searchpath=[file://{tmp_path}]",
                 "n_steps=30", "method.sm_steps=200", "method.sm_lr=1e-2", "method.pool_size=2000",
                 "method.eval_every=0", "domain.pathway.hidden=32", f"hydra.run.dir={ft}"]) == 0
    assert (ft / "model/config.json").is_file()
    shares = {}
    for y in (0, 1):
        out = tmp_path / f"s{y}"
        assert main(["sample", f"run={ft}", f"y={y}", "n=400", "progress=false", f"hydra.run.dir={out}"]) == 0
        rows = list(csv.DictReader((out / "samples.csv").open()))
        shares[y] = sum(float(r["x0"]) > 0 for r in rows) / len(rows)
        assert (out / "samples.safetensors").is_file() and (out / "samples.png").is_file()
    assert shares[1] > 0.8 and shares[0] < 0.2, shares
    # The exported folder samples the same; its network's package must be trusted to be imported from a file.
    model = ft / "model"
    capsys.readouterr()
    assert main(["sample", f"run={model}", "y=1", f"hydra.run.dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'test_commands.TinyEpsNet' is outside the trusted packages" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("CTRL_BIO_TRUSTED_PACKAGES", "test_commands")
    assert main(["sample", f"run={model}", "y=1", "n=400", "progress=false", f"hydra.run.dir={tmp_path / 'm'}"]) == 0
    assert (tmp_path / "m/samples.csv").read_text() == (tmp_path / "s1/samples.csv").read_text()


def test_run_dir_override_is_the_run_directory_not_silently_replaced(tmp_path):
    from ctrl_bio.cli_runs import training_config

    cfg, run_dir, _ = training_config("pretrain", [*GMM, f"run_dir={tmp_path / 'mine'}"])
    assert run_dir == tmp_path / "mine" and cfg.run_dir == str(tmp_path / "mine")
