"""The built wheel installs into a fresh venv and runs ``ctrl-bio benchmark suite=gmm`` with its shipped configs.

Run outside the checkout, so that configs, checkpoints and every module come from the installed wheel: a module or
config missing from ``pyproject.toml``'s package list fails here, not on a user's machine. Dependencies are not
downloaded again: the fresh venv sees the test interpreter's site-packages through a ``.pth`` line (a venv of a
venv's python does not see the outer venv's packages with ``--system-site-packages`` alone), after its own.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from: copied to a temporary folder so that no stale build/ of the checkout leaks in.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ctrl_bio", "configs", "domains")
SMOKE = ["suite=gmm", "domain.dim=2", "domain.n_components=4", "domain.n_classes=2", "suite.n_eval=100",
         "suite.n_steps=5", "suite.n_floor_draws=1", "method.sm_steps=10", "method.pool_size=300",
         "suite.pathway.hidden=16", "data.n_pairs=200", "label.component.training.epochs=3",
         "suite.methods=[pretrained,ctrl,real_data]", "progress=false"]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args[:4])} ...: exit {done.returncode}\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-4000:]}"
    return done


def test_wheel_installs_in_a_fresh_venv_and_runs_the_gmm_suite(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs"))
        else:
            shutil.copy2(path, src / name)
    # --no-build-isolation: the test interpreter's setuptools builds it, nothing is downloaded.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("ctrl_bio-*.whl")

    fresh = tmp_path / "venv"
    venv.create(fresh, system_site_packages=True, with_pip=False)
    python = fresh / "bin" / "python"
    own_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env).stdout.strip())
    # Appended after the venv's own site-packages, so the wheel's ctrl_bio wins over the checkout's editable install
    # (a plain path line: the outer site-packages' own .pth files, the editable finder among them, are not run).
    (own_site / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(python), "-c", "import ctrl_bio, domains.gmm, domains.dna; print(ctrl_bio.__file__); "
                 "print(list(domains.dna.__path__)[0])"], work, env).stdout.split()
    assert all(Path(p).is_relative_to(fresh) for p in where), where
    assert (Path(where[1]) / "checkpoints" / "pretrained.safetensors").is_file()  # the shipped DNA checkpoint
    ctrl_bio_cmd = fresh / "bin" / "ctrl-bio"
    assert run([str(ctrl_bio_cmd), "--version"], work, env).stdout.strip() == "ctrl-bio 0.1.0"
    out = run([str(ctrl_bio_cmd), "benchmark", *SMOKE, "hydra.run.dir=run"], work, env).stdout
    results = json.loads((work / "run" / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["pretrained", "ctrl", "real_data"], out
    assert (work / "run" / "results.md").is_file() and "results:" in out
