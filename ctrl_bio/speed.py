"""The ``speed`` suite: what backpropagating through the sampler costs against training the network alone.

CTRL's pathwise estimator (:func:`ctrl_bio.objective.pathwise_loss`) differentiates a whole Euler-Maruyama
chain. This suite measures, on a ~1M-parameter :class:`ctrl_bio.nets.ConvScoreNet` over (B, 4, L) inputs
with a frozen network and a trainable :class:`ctrl_bio.model.LabelEmbedding` (as CTRL fine-tunes it):

- ``overhead_ratio``: one fine-tuning step with full backpropagation over N sampler steps, divided by
  N forward+backward passes of the network alone (an ordinary denoising training step, every parameter
  trainable, no optimiser step) on the same batch;
- ``overhead_ratio_checkpointed``: the same with activation checkpointing (Chen et al. 2016, "Training
  Deep Nets with Sublinear Memory Cost"), which recomputes each sampler step in the backward pass;
- ``memory_ratio_100_25``: peak memory of a checkpointed step at 100 sampler steps over that at 25.

Each sampler step evaluates the network with and without the label embedding because the KL needs
s_pre; that is part of the measured cost. With ``label_blocks`` = k only the last k blocks run twice
(:meth:`ctrl_bio.nets.ConvScoreNet.forward_pair`). Times are medians over ``repeats``, the three kinds of
step interleaved so that a busy machine slows them alike, after a warm-up.

Memory. On CUDA: the allocator's ``max_memory_allocated`` above what was allocated before the step. On
CPU each measurement runs in a fresh Python process (nothing cached by an earlier measurement is counted
or hidden; the 25- and 100-step processes run side by side, one thread each, after the timing) and
reports (1) the peak of live tensor bytes from the CPU allocator's events in ``torch.profiler``
(``memory_ratio_100_25``: an allocation tracker, counting what CUDA's statistic counts) and (2) the growth
of peak RSS over RSS just before the step, the peak reset through ``/proc/self/clear_refs``
(``memory_ratio_100_25_rss``). RSS also holds allocator fragmentation, cached pages and autograd's graph
nodes; recorded runs gave RSS ratios below one (the 25-step process peaking higher than the 100-step one),
so it is kept as a cross-check, not as the measure. Without ``track_tensors`` the RSS ratio is used.

CPU timing runs in a fresh process whose glibc malloc keeps freed memory (``MALLOC_MMAP_MAX_=0``, no
trimming), as PyTorch's CUDA caching allocator does. With glibc's defaults every full-backprop step hands
its gigabytes of activations back to the kernel and page-faults them in again, and that system time, not
the arithmetic, dominates the step; ``cpu_caching_allocator=False`` measures that setting.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrl_bio.estimators import Objective
from ctrl_bio.harness import Row, SuiteResult
from ctrl_bio.model import EmbeddingAugmentedScore
from ctrl_bio.nets import ConvScoreNet
from ctrl_bio.objective import MemoryMode, pathwise_loss
from ctrl_bio.reward import CalibratedClassifier, LogLikelihoodReward
from ctrl_bio.sde import VPSDE
from ctrl_bio.settings import autocast, check_precision
from ctrl_bio.utils import append_dims

N_CLASSES = 4
LABEL = "celltype-like 4 classes"
#: glibc settings that keep freed heap memory for reuse, like a caching allocator (see the module docstring).
CACHING_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


@dataclass(frozen=True)
class SpeedConfig:
    """Everything a measurement process needs to rebuild the same setup (plain values, JSON-able)."""

    batch_size: int
    length: int
    channels: int
    hidden: int
    n_blocks: int
    emb_dim: int
    device: str
    seed: int
    label_blocks: int | None = None
    alpha: float = 1.0
    gamma: float = 1.0
    precision: str = "32"


class SpeedSetup:
    """The frozen network inside CTRL's augmented model, its reward, and a trainable copy for the baseline."""

    def __init__(self, cfg: SpeedConfig):
        device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.cfg, self.device, self.sde = cfg, device, VPSDE()
        net = ConvScoreNet(self.sde, cfg.channels, cfg.hidden, cfg.n_blocks, cfg.emb_dim,
                           label_blocks=cfg.label_blocks).to(device)
        self.train_net = copy.deepcopy(net)  # the baseline trains every parameter of the same network
        self.model = EmbeddingAugmentedScore(net, (N_CLASSES,), cfg.emb_dim).to(device)
        self.optimizer = torch.optim.Adam(self.model.embedding.parameters(), lr=1e-3)
        classifier = nn.Sequential(nn.Conv1d(cfg.channels, 32, 9, padding=4), nn.SiLU(), nn.AdaptiveAvgPool1d(1),
                                   nn.Flatten(), nn.Linear(32, N_CLASSES))
        self.reward = LogLikelihoodReward([CalibratedClassifier(classifier).to(device).requires_grad_(False)])
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.y = torch.randint(N_CLASSES, (cfg.batch_size, 1), generator=self.generator, device=device)
        # One-hot sequences: the data a DNA score network is trained on.
        idx = torch.randint(cfg.channels, (cfg.batch_size, cfg.length), generator=self.generator, device=device)
        self.x0 = nn.functional.one_hot(idx, cfg.channels).transpose(1, 2).float()
        self.n_parameters = sum(p.numel() for p in net.parameters())

    def finetune_step(self, n_steps: int, memory: MemoryMode, batch_size: int | None = None) -> None:
        """One CTRL step: -J by the pathwise estimator, backward, Adam on the label embedding."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.cfg.device, self.cfg.precision):
            est = pathwise_loss(self.model, self.sde, self.reward, self.y[:batch_size],
                                (self.cfg.channels, self.cfg.length), n_steps=n_steps, memory=memory,
                                alpha=self.cfg.alpha, gamma=self.cfg.gamma, generator=self.generator)
        est.loss.backward()
        self.optimizer.step()

    def network_step(self) -> None:
        """One denoising score matching forward+backward of the network alone (Song et al. 2021, eq. 7)."""
        self.train_net.zero_grad(set_to_none=True)
        t = 1e-3 + (1 - 1e-3) * torch.rand(self.cfg.batch_size, generator=self.generator, device=self.device)
        eps = torch.randn(self.x0.shape, generator=self.generator, device=self.device)
        with autocast(self.cfg.device, self.cfg.precision):
            score = self.train_net(self.sde.perturb(self.x0, t, eps), t)
            sigma = append_dims(self.sde.sigma(t), self.x0.ndim)
            loss = ((sigma * score + eps) ** 2).mean()
        loss.backward()


def _seconds(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_times(cfg: SpeedConfig, n_steps: int, repeats: int) -> dict[str, Any]:
    """Median seconds of a full and a checkpointed fine-tuning step and of one network step."""
    setup = SpeedSetup(cfg)
    # Warm-up builds every kernel; the full-size full-backprop step also brings its activation memory in.
    setup.finetune_step(2, "checkpoint")
    setup.finetune_step(n_steps, "full")
    setup.network_step()
    full, ckpt, net = [], [], []
    for _ in range(repeats):
        full.append(_seconds(lambda: setup.finetune_step(n_steps, "full"), setup.device))
        ckpt.append(_seconds(lambda: setup.finetune_step(n_steps, "checkpoint"), setup.device))
        # A network step is short: several per repeat steady its median at little cost.
        net += [_seconds(setup.network_step, setup.device) for _ in range(5)]
    return {"full": statistics.median(full), "checkpoint": statistics.median(ckpt), "network": statistics.median(net),
            "n_parameters": setup.n_parameters, "threads": torch.get_num_threads()}


def _rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _tensor_peak_bytes(fn: Callable[[], None]) -> int | None:
    """Peak of live CPU tensor bytes allocated by ``fn``, from the allocator events torch.profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # the raw event list is not public API; without it there is no tracker, not a wrong number
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure_peak_memory(cfg: SpeedConfig, n_steps: int, memory: MemoryMode,
                        track_tensors: bool = True) -> dict[str, Any]:
    """Peak bytes one fine-tuning step adds above what was in use before it; run in a fresh process on CPU."""
    setup = SpeedSetup(cfg)
    # Warm-up at batch size 1 and one sampler step: lazy initialisation (thread pools, kernels, Adam
    # state) is not part of a step's memory, and so small a step leaves almost nothing cached behind.
    setup.finetune_step(1, memory, batch_size=1)
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        before = torch.cuda.memory_allocated(setup.device)
        setup.finetune_step(n_steps, memory)
        torch.cuda.synchronize(setup.device)
        peak = torch.cuda.max_memory_allocated(setup.device) - before
        return {"peak": peak, "tensor_peak": peak, "method": "cuda max_memory_allocated above the allocated before"}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS that ru_maxrss reports
        method = "cpu: peak RSS growth in a fresh process (ru_maxrss reset via /proc/self/clear_refs)"
    except OSError:
        method = "cpu: peak RSS growth in a fresh process (ru_maxrss not resettable: may be a lower bound)"
    before = _rss_bytes()
    setup.finetune_step(n_steps, memory)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, 0)
    if not track_tensors:
        return {"peak": peak, "tensor_peak": None, "method": method}
    tensor_peak = _tensor_peak_bytes(lambda: setup.finetune_step(n_steps, memory))
    return {"peak": peak, "tensor_peak": tensor_peak,
            "method": method + "; tensors: torch.profiler CPU allocator events, peak of live bytes"}


def _float(v: float | None) -> float | None:
    return None if v is None else float(v)


def in_fresh_process(function: str, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Call ``ctrl_bio.speed.<function>(**kwargs)`` in a new Python process; JSON in, JSON out."""
    code = ("import json, sys\nfrom ctrl_bio import speed\nkw = json.loads(sys.argv[2])\n"
            "kw['cfg'] = speed.SpeedConfig(**kw['cfg'])\nprint(json.dumps(getattr(speed, sys.argv[1])(**kw)))\n")
    root = str(Path(__file__).resolve().parent.parent)
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    kwargs["cfg"] = asdict(kwargs["cfg"])
    done = subprocess.run([sys.executable, "-c", code, function, json.dumps(kwargs)], capture_output=True,
                          text=True, env=full_env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"speed measurement {function} failed in its process: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory_cpu(cfg: SpeedConfig, steps: tuple[int, ...], track_tensors: bool) -> dict[int, dict[str, Any]]:
    """:func:`measure_peak_memory` of checkpointed steps, each in its own fresh process, side by side.

    Memory, not time, is measured here, so the processes run at once with one thread each.
    """
    env = {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        futures = {n: pool.submit(in_fresh_process, "measure_peak_memory", env, cfg=cfg, n_steps=n,
                                  memory="checkpoint", track_tensors=track_tensors) for n in steps}
        return {n: future.result() for n, future in futures.items()}


def run_speed_suite(*, batch_size: int = 8, n_steps: int = 25, length: int = 200, channels: int = 4,
                    hidden: int = 128, n_blocks: int = 8, emb_dim: int = 128, repeats: int = 3,
                    device: str = "auto", seed: int = 0, cpu_caching_allocator: bool = True,
                    track_tensors: bool = True, label_blocks: int | None = None,
                    method: dict[str, Any] | None = None, precision: str = "32",
                    run_dir: str | Path | None = None) -> SuiteResult:
    """Overhead and memory ratios of CTRL's pathwise fine-tuning step, in one row ``ctrl``.

    The defaults (batch 8, 25 sampler steps, a 0.95M-parameter network over (8, 4, 200)) take about
    two minutes on a 2-core CPU, half of it the checkpointed 100-step runs the memory ratio needs; on a
    GPU raise ``batch_size``.

    Args:
        batch_size: sequences per step (the same batch for the fine-tuning step and the baseline).
        n_steps: sampler steps N of the timed fine-tuning steps.
        length: sequence length L.
        channels: input channels C.
        hidden: channels of the network's residual stream.
        n_blocks: residual blocks of the network.
        emb_dim: width of the time (and label) embedding.
        repeats: timed repetitions per quantity; the median is reported.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: seed of the network, labels and noise.
        cpu_caching_allocator: on CPU, time with glibc malloc keeping freed memory (see the module docstring).
        track_tensors: on CPU, also measure the peak of live tensor bytes (one more profiled step each).
        label_blocks: how many of the last blocks the label embedding enters (None: all, the default
            of DESIGN.md); the blocks before it are evaluated once for the model and the reference.
        method: CTRL's settings (the top-level ``method``): the step's J = gamma log p(y|x) - alpha KL takes its
            ``alpha`` and ``gamma`` (they change no cost; the step is the one a suite's ``ctrl`` row takes).
        precision: ``32``, or ``bf16-mixed``: both kinds of step under bfloat16 autocast (the ratios compare like
            with like).
        run_dir: the run directory the harness writes the results into (this suite adds no files).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    objective = Objective.of(method or {})
    cfg = SpeedConfig(batch_size, length, channels, hidden, n_blocks, emb_dim, device, seed, label_blocks,
                      alpha=objective.alpha, gamma=objective.gamma, precision=check_precision(precision))
    if device == "cpu":
        times = in_fresh_process("measure_times", CACHING_MALLOC_ENV if cpu_caching_allocator else None,
                                 cfg=cfg, n_steps=n_steps, repeats=repeats)
        mem = peak_memory_cpu(cfg, (25, 100), track_tensors)
    else:
        times = measure_times(cfg, n_steps, repeats)
        mem = {n: measure_peak_memory(cfg, n, "checkpoint") for n in (25, 100)}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    metrics: dict[str, float | None] = {
        "overhead_ratio": times["full"] / (n_steps * times["network"]),
        "overhead_ratio_checkpointed": times["checkpoint"] / (n_steps * times["network"]),
        "memory_ratio_100_25": ratio(mem[100]["tensor_peak"], mem[25]["tensor_peak"])
        or ratio(mem[100]["peak"], mem[25]["peak"]),
        "memory_ratio_100_25_rss": ratio(mem[100]["peak"], mem[25]["peak"]),
        "seconds_finetune_step_full": times["full"],
        "seconds_finetune_step_checkpointed": times["checkpoint"],
        "seconds_network_forward_backward": times["network"],
        "peak_bytes_checkpointed_25": float(mem[25]["peak"]),
        "peak_bytes_checkpointed_100": float(mem[100]["peak"]),
        "peak_tensor_bytes_checkpointed_25": _float(mem[25]["tensor_peak"]),
        "peak_tensor_bytes_checkpointed_100": _float(mem[100]["tensor_peak"]),
        "n_parameters": float(times["n_parameters"]),
        "n_steps": float(n_steps),
    }
    info = {"memory_method": mem[25]["method"], "config": asdict(cfg), "torch_threads": times["threads"],
            "cpu_allocator": ("glibc, freed memory kept (caching)" if cpu_caching_allocator else "glibc defaults")
            if device == "cpu" else "cuda caching allocator",
            "network_evaluations_per_sampler_step": 2 if label_blocks is None else 1 + label_blocks / n_blocks,
            "targets": {"overhead_ratio": 1.3, "overhead_ratio_checkpointed": 1.7, "memory_ratio_100_25": 1.5}}
    label = LABEL if label_blocks is None else f"{LABEL}, label in last {label_blocks}/{n_blocks} blocks"
    return SuiteResult(suite="speed", rows=[Row(method="ctrl", label=label, metrics=metrics)], info=info)
