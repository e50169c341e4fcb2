"""``device=auto|cpu|cuda|cuda:N`` and ``precision=32|bf16-mixed`` on every command and suite (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ctrl_bio.cli import compose_config, main
from ctrl_bio.objective import Objective
from ctrl_bio.sampling import sample_in_batches, time_grid
from ctrl_bio.sde import VPSDE
from ctrl_bio.settings import check_precision, lightning_device, resolve_device

COMMANDS = ("pretrain", "train-classifier", "finetune", "sample", "benchmark")
SUITES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "suite").glob("*.yaml"))
GMM = ["domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "progress=false"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


@no_cuda
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_naming_the_key(command: str, device: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    extra = ["run=nowhere"] if command == "sample" else []
    assert main([command, f"device={device}", *extra, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"device={device}" in err and "auto, cpu, cuda or cuda:N" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any run directory is made


@pytest.mark.parametrize("args,needle", [(["device=tpu"], "device=tpu: device takes auto, cpu, cuda or cuda:N"),
                                         (["precision=16"], "precision=16: precision takes 32 or bf16-mixed")])
def test_unknown_device_or_precision_is_one_line(args: list[str], needle: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", *args, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == f"ctrl-bio: error: {needle}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_device_and_precision(command: str) -> None:
    cfg = compose_config(command, ["device=cpu", "precision=bf16-mixed"])
    assert (cfg.device, cfg.precision) == ("cpu", "bf16-mixed")


@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_reads_the_top_level_device(suite: str) -> None:
    cfg = compose_config("benchmark", [f"suite={suite}", "device=cpu"])
    assert OmegaConf.select(cfg, "suite.device") == "cpu"


def test_auto_is_a_gpu_when_there_is_one() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and check_precision(32) == "32"


@pytest.mark.parametrize("device,trainer,expected", [
    ("cpu", {"devices": 2}, {"accelerator": "cpu", "devices": 2, "precision": "32-true"}),
    ("cuda", {"devices": 2}, {"accelerator": "gpu", "devices": 2, "precision": "32-true"}),
    ("cuda:1", {"devices": 1}, {"accelerator": "gpu", "devices": [1], "precision": "32-true"}),
    ("cuda", {"accelerator": "cpu", "precision": "64-true"}, {"accelerator": "cpu", "devices": 1,
                                                              "precision": "64-true"}),
])
def test_device_becomes_the_trainers_accelerator_unless_the_trainer_sets_it(device, trainer, expected) -> None:
    assert lightning_device(device, "32", trainer) == expected
    assert lightning_device("cpu", "bf16-mixed", {})["precision"] == "bf16-mixed"


def test_one_gpu_is_not_several_processes() -> None:
    with pytest.raises(ValueError, match="device=cuda:0 is one GPU"):
        lightning_device("cuda:0", "32", {"devices": 2})


def test_sampling_on_a_named_cpu_device_is_bit_identical() -> None:
    """The suites sample with device=...; on the CPU the seeded CPU generator gives the very same paths."""
    sde, times = VPSDE(), time_grid(8)
    y = torch.zeros(5, 1, dtype=torch.long)

    def score_for(_y):
        return lambda x, t: -x

    plain = sample_in_batches(sde, score_for, y, (3,), times, 2, torch.Generator().manual_seed(0))
    placed = sample_in_batches(sde, score_for, y, (3,), times, 2, torch.Generator().manual_seed(0), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(plain, placed))


class LinearScore(torch.nn.Module):
    """s(x, t) = -x through a matrix product, so that bfloat16 autocast rounds it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(-torch.eye(3) + 0.01 * torch.randn(3, 3))

    def forward(self, x, t):
        return self.lin(x)


def test_suite_context_samples_on_its_device_and_precision() -> None:
    """The suites' shared context: float32 on the CPU is the plain seeded sampler's, bit for bit; bf16-mixed samples
    under autocast (rounded, close) and still hands float32 CPU samples to the scores."""
    from types import SimpleNamespace

    from ctrl_bio.rows import BaseSuiteContext

    net = LinearScore()
    domain = SimpleNamespace(pretrained_model=lambda: net, sde=VPSDE(), x_shape=(3,))
    kwargs = dict(n_eval=6, n_select=2, n_steps=10, t_end=1e-3, spacing="uniform", seed=0, batch_size=4,
                  objective=Objective(), device="cpu")
    out = {}
    for precision in ("32", "bf16-mixed"):
        ctx = BaseSuiteContext(domain, [{"name": "a"}], [SimpleNamespace(n_classes=2)], [], precision=precision,
                               **kwargs)
        out[precision] = ctx.sample(lambda _y: net, ctx.y_eval)
    plain = sample_in_batches(VPSDE(), lambda _y: net, ctx.y_eval, (3,), time_grid(10), 4,
                              torch.Generator().manual_seed(2000))
    assert all(torch.equal(a, b) for a, b in zip(out["32"], plain))
    x16, x32 = out["bf16-mixed"][0], out["32"][0]
    assert x16.dtype == torch.float32 and not torch.equal(x16, x32)
    torch.testing.assert_close(x16, x32, atol=0.1, rtol=0.05)


def test_every_command_runs_on_device_cpu(tmp_path: Path) -> None:
    """pretrain (bfloat16 autocast), train-classifier, finetune and sample with device=cpu, tiny."""
    pre, clf, ft, out = tmp_path / "pre", tmp_path / "clf", tmp_path / "ft", tmp_path / "out"
    assert main(["pretrain", *GMM, "device=cpu", "precision=bf16-mixed", "steps=3", "batch_size=16",
                 "plugin.score_net.hidden=16", "plugin.n_train=200", "evaluate=false", f"hydra.run.dir={pre}"]) == 0
    assert (pre / "score.safetensors").is_file()
    assert main(["train-classifier", *GMM, "device=cpu", "data.n_pairs=100", "label.component.training.epochs=2",
                 f"hydra.run.dir={clf}"]) == 0
    assert (clf / "classifiers" / "component.safetensors").is_file()
    assert main(["finetune", *GMM, "device=cpu", "reward=exact", "plugin.pathway.hidden=16", "method.sm_steps=3",
                 "method.pool_size=64", "method.sm_batch_size=16", "n_steps=5", "method.eval_every=0",
                 "data.n_pairs=100", f"hydra.run.dir={ft}"]) == 0
    assert main(["sample", f"run={ft}", "device=cpu", "y=1", "n=8", "batch_size=4", f"hydra.run.dir={out}"]) == 0
    assert len((out / "samples.csv").read_text().splitlines()) == 9


def test_gmm_benchmark_on_device_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["benchmark", "suite=gmm", *GMM, "device=cpu", "precision=bf16-mixed", "data.n_pairs=100",
                 "suite.n_eval=50", "suite.n_steps=5", "method.sm_steps=5", "method.pool_size=200",
                 "suite.pathway.hidden=16", "label.component.training.epochs=2", "suite.methods=[pretrained,ctrl]",
                 f"hydra.run.dir={run_dir}"]) == 0
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["pretrained", "ctrl"]
    assert json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))["device"] == "cpu"
