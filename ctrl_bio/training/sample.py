"""``ctrl-bio sample``: samples of a fine-tuned run (its directory or its ``model/`` folder) with requested labels.

The sampler is the one the run was fine-tuned with (its time grid), Euler-Maruyama or DDIM (Song et al. 2021,
eq. 12), seeded on the CPU so that every device draws the same samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ctrl_bio.domain import Domain
from ctrl_bio.labels import check_trusted
from ctrl_bio.model import check_labels
from ctrl_bio.progress import progress_bar
from ctrl_bio.sampling import ddim, euler_maruyama, time_grid
from ctrl_bio.settings import autocast, check_precision, resolve_device
from ctrl_bio.training.command_config import build_domain, time_spacing
from ctrl_bio.training.runs import load_trainable, read_meta


def parse_request(y: Any, labels: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``y=2`` or ``y=[0,1]`` (one class per label, -1 for none) as a (K,) long tensor."""
    values = list(y) if isinstance(y, (list, tuple)) or OmegaConf.is_list(y) else [y]
    names = [lab["name"] for lab in labels]
    if len(values) != len(labels):
        raise ValueError(f"y has {len(values)} value(s) but the run was fine-tuned for {len(labels)} label(s) "
                         f"{names}: give one class per label, e.g. y=[{','.join('0' for _ in labels)}]")
    try:
        request = torch.tensor([int(v) for v in values], dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y must hold integer class indices, got {values}") from exc
    try:
        check_labels(request[None], [lab["n_classes"] for lab in labels])
    except ValueError as exc:
        raise ValueError(f"y={values} for labels {names}: {exc}") from exc
    return request


@dataclass
class SampleSource:
    """What ``ctrl-bio sample`` draws from: a fine-tuned model, its domain, labels and the sampler grid it was
    fine-tuned with."""

    model: torch.nn.Module
    domain: Domain
    labels: list[dict[str, Any]]
    n_steps: int
    t_end: float
    spacing: str


def load_finetune_run(ft_dir: Path) -> SampleSource:
    """A finetune run directory: its saved config, ``pathway.safetensors`` and the domain's pre-trained model."""
    weights = ft_dir / "pathway.safetensors"
    for needed in (ft_dir / "config.yaml", weights, weights.with_suffix(".json")):
        if not needed.is_file():
            raise FileNotFoundError(f"run={ft_dir}: no '{needed.name}' there (is it a finished finetune run or a "
                                    f"save_pretrained folder?)")
    ft_cfg = OmegaConf.load(ft_dir / "config.yaml")
    labels = read_meta(weights.with_suffix(".json")).get("labels")
    if not labels:
        raise ValueError(f"{weights.with_suffix('.json')}: names no labels (is it a finetune run's pathway.json?)")
    domain = build_domain(ft_cfg.plugin)
    model = domain.augment(domain.pretrained_model(), [lab["n_classes"] for lab in labels])
    load_trainable(model, weights)
    return SampleSource(model, domain, labels, ft_cfg.n_steps, ft_cfg.t_end, time_spacing(ft_cfg, domain))


def check_targets(node: Any, where: str) -> None:
    """Every ``_target_`` of a config read from a file lies in a trusted package (``check_trusted``)."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            check_trusted(str(node["_target_"]), f"{where} _target_")
        for value in node.values():
            check_targets(value, where)
    elif isinstance(node, list):
        for value in node:
            check_targets(value, where)


def load_model_folder(folder: Path) -> SampleSource:
    """A ``save_pretrained`` folder written by ``ctrl-bio finetune`` (``<run>/model``): the model, and the domain
    rebuilt from ``config.json["extra"]``."""
    from ctrl_bio.hub import from_pretrained, read_config

    extra = read_config(folder).get("extra") or {}
    missing = [k for k in ("plugin", "labels", "n_steps", "t_end") if k not in extra]
    if missing:
        raise ValueError(f"run={folder}: config.json has no extra {missing} (only folders written by ctrl-bio "
                         f"finetune name their domain; sample others with the Python API, ctrl_bio.hub)")
    check_targets(extra["plugin"], f"{folder}/config.json: extra.plugin")  # a shared folder names what is imported
    model = from_pretrained(folder)
    domain = build_domain(OmegaConf.create(extra["plugin"]))
    return SampleSource(model, domain, extra["labels"], extra["n_steps"], extra["t_end"],
                        extra.get("spacing") or "uniform")


def load_sample_source(run: str | None) -> SampleSource:
    """``run=`` of ``ctrl-bio sample``: a finetune run directory or a ``save_pretrained`` folder (``<run>/model``)."""
    if run is None:
        raise ValueError("sample needs run=<directory of a finetune run, or its model/ folder>")
    path = Path(run)
    if (path / "config.json").is_file():
        return load_model_folder(path)
    return load_finetune_run(path)


#: ``sampler=`` of ``ctrl-bio sample``: em (Euler-Maruyama, the sampler CTRL fine-tunes with) or ddim (deterministic).
SAMPLERS = ("em", "ddim")


def draw_samples(source: SampleSource, request: torch.Tensor, *, n: int, batch_size: int, n_steps: int, seed: int,
                 sampler: str = "em", device: torch.device | str = "cpu", precision: str | int = 32,
                 progress: bool = False) -> torch.Tensor:
    """n samples of ``source`` with the label request (K,), ``batch_size`` at a time, on the CPU.

    Every batch's prior draw and noise come from one CPU generator seeded with ``seed``: the same samples on any
    device. ``sampler="ddim"`` follows the deterministic DDIM step (:func:`ctrl_bio.sampling.ddim`), so its noise is
    the prior draw alone.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    domain, model = source.domain, source.model
    times = time_grid(n_steps, source.t_end, spacing=source.spacing, device=device)
    g = torch.Generator().manual_seed(seed)
    n_batches = -(-n // batch_size)
    chunks = []
    with torch.no_grad(), autocast(device, precision), \
            progress_bar(n_batches * n_steps, f"sampling ({sampler})", enabled=progress) as advance:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            score_fn = model.conditioned(request.expand(b, -1).to(device))

            def counted(x: torch.Tensor, t: torch.Tensor, score_fn=score_fn) -> Any:
                advance()  # one score evaluation is one sampler step
                return score_fn(x, t)

            x_init = domain.sde.prior_sampling((b, *domain.x_shape), generator=g, device=device)
            if sampler == "ddim":
                x = ddim(domain.sde, counted, x_init, times)
            else:
                x = euler_maruyama(domain.sde, counted, x_init, times, generator=g, keep_trajectory=False).x
            chunks.append(x.float().cpu())
    return torch.cat(chunks)


def plot_samples(domain: Domain, x: torch.Tensor, y: torch.Tensor, label_names: Sequence[str],
                 run_dir: Path) -> Path:
    """``samples.png`` beside the samples: the domain's own ``plot_samples(x, y, label_names, path)`` where it has one
    (an optional hook, like ``project``), else a scatter of the first two coordinates."""
    path = run_dir / "samples.png"
    if hasattr(domain, "plot_samples"):
        return Path(domain.plot_samples(x, y, label_names, path))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = x.reshape(x.shape[0], -1)
    second = flat[:, 1] if flat.shape[1] > 1 else torch.zeros(flat.shape[0])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(flat[:, 0].numpy(), second.numpy(), s=3, alpha=0.5)
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(", ".join(f"{name}={v}" for name, v in zip(label_names, y[0].tolist())), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sample(cfg: DictConfig, run_dir: Path, resume: Path | None = None) -> None:
    """Samples of a fine-tuned run (or its ``model/`` folder) with the requested labels, in the domain's format,
    and a plot of them (``samples.png``)."""
    source = load_sample_source(cfg.run)
    labels = source.labels
    names = [lab["name"] for lab in labels]
    request = parse_request(cfg.y, labels)
    device, precision = resolve_device(cfg.get("device") or "auto"), check_precision(cfg.get("precision") or 32)
    source.model.to(device)
    x = draw_samples(source, request, n=cfg.n, batch_size=cfg.batch_size, n_steps=cfg.n_steps or source.n_steps,
                     seed=cfg.seed, sampler=cfg.get("sampler", "em"), device=device, precision=precision,
                     progress=cfg.get("progress", False))
    y = request.expand(cfg.n, -1)
    path = source.domain.write_samples(x, y, names, run_dir)
    print(f"{cfg.n} samples with {dict(zip(names, request.tolist()))}: {path}")
    if cfg.get("plot", True):
        print(f"plot: {plot_samples(source.domain, x, y, names, run_dir)}")

