"""``domain=custom``: a data file of vectors or images and any ``nn.Module`` by ``_target_``, with no Domain class.

``configs/domain/custom.yaml`` names the data file (``domain.data``), the network (``domain.network._target_`` and its
keyword arguments) and what it predicts (``eps``, ``v``, ``x0`` or ``score``; :func:`ctrl_bio.interop.wrap_network`).
``ctrl-bio pretrain`` trains that network by denoising score matching on the data; ``ctrl-bio finetune
domain.checkpoint=<pretrain run>`` adds a label to it (vectors: :class:`ctrl_bio.model.VectorPathway`; any other
shape: the same MLP on flattened samples, :class:`FlatPathway`); ``ctrl-bio sample`` writes ``samples.safetensors``
(and ``samples.csv`` for vectors).

The network is imported from the run's own command line. Read back from a shared ``save_pretrained`` folder, its
``_target_`` is imported only from a trusted package (``ctrl_bio``, ``domains``, ``$CTRL_BIO_TRUSTED_PACKAGES``).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ctrl_bio.interop import NetworkScore
from ctrl_bio.labels import check_trusted, resolve_callable
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.sde import SDE, VPSDE

log = logging.getLogger(__name__)

#: File types ``domain.data`` (and a label's ``pairs.kwargs.file``) may be.
DATA_SUFFIXES = (".pt", ".npy", ".npz", ".safetensors", ".csv")


def load_tensor_file(path: str | Path, key: str = "x") -> Tensor:
    """A float32 tensor (N, ...) from ``.pt`` (a tensor, or a dict holding ``key``), ``.npy``, ``.npz`` or
    ``.safetensors`` (the array ``key``, or the only one) or ``.csv`` (numbers; a header row is skipped; rows that
    are not all finite numbers are skipped and counted in the log)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain data: no file '{path}'")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: a data file must be one of {', '.join(DATA_SUFFIXES)}")
    if suffix == ".csv":
        return _read_numeric_csv(path)
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only, never code
        arrays = obj if isinstance(obj, Mapping) else {key: obj}
    elif suffix == ".npy":
        arrays = {key: np.load(path, allow_pickle=False)}
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    else:
        arrays = load_file(str(path))
    if key not in arrays and len(arrays) != 1:
        raise ValueError(f"{path}: holds {sorted(arrays)}; name the data '{key}' or keep one array in the file")
    x = torch.as_tensor(np.asarray(arrays[key] if key in arrays else next(iter(arrays.values()))))
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{path}: '{key}' has shape {tuple(x.shape)}; expected (N, ...) with N >= 1 samples")
    x = x.float()
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not finite.all():
        log.warning("%s: skipped %d of %d samples that are not finite", path, int((~finite).sum()), x.shape[0])
        x = x[finite]
    return x


def _read_numeric_csv(path: Path) -> Tensor:
    rows, skipped = [], Counter()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for i, row in enumerate(csv.reader(fh)):
            try:
                values = [float(v) for v in row]
            except ValueError:
                if i > 0:
                    skipped["not a number"] += 1
                continue  # the header
            if not values or not all(math.isfinite(v) for v in values):
                skipped["empty or not finite"] += 1
            elif rows and len(values) != len(rows[0]):
                skipped["wrong number of columns"] += 1
            else:
                rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no row of numbers")
    if skipped:
        log.warning("%s: skipped %d rows: %s", path, sum(skipped.values()), dict(skipped))
    return torch.tensor(rows, dtype=torch.float32)


def build_network(node: Mapping[str, Any]) -> nn.Module:
    """``{"_target_": "pkg.module.Class", **kwargs}`` -> the module ``Class(**kwargs)``."""
    if "_target_" not in node:
        raise ValueError("domain.network needs a _target_: the class (or factory) of your network, e.g. "
                         "domain.network._target_=my_pkg.MyNet")
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    net = resolve_callable(node["_target_"])(**kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"domain.network._target_={node['_target_']} built a {type(net).__name__}, not an nn.Module")
    return net


class UserNetworkScore(NetworkScore):
    """The user's network (built from its ``_target_`` node) as the core's score model, describable by its
    ``config``: what ``export_network`` and ``save_pretrained`` record and rebuild.

    Args:
        sde: the SDE the network is trained on.
        network: ``{"_target_": ..., **kwargs}`` of the network.
        predicts: ``eps``, ``v``, ``x0`` or ``score`` (:func:`ctrl_bio.interop.wrap_network`).
        net: the network already built from the run's own command line; None (a saved file being read back)
            builds it from ``network``, whose ``_target_`` must then lie in a trusted package.
    """

    def __init__(self, sde: SDE, network: Mapping[str, Any], predicts: str = "eps", *, net: nn.Module | None = None):
        network = dict(network)
        if net is None:
            check_trusted(str(network.get("_target_")), "saved custom network _target_")
            net = build_network(network)
        super().__init__(net, sde, predicts, "t")
        self.config = {"network": network, "predicts": predicts}


class FlatPathway(nn.Module):
    """:class:`ctrl_bio.model.VectorPathway` on flattened samples of any shape (images, sequences), reshaped back."""

    def __init__(self, x_shape: Sequence[int], n_classes: Sequence[int], **settings: Any):
        super().__init__()
        self.x_shape = tuple(int(n) for n in x_shape)
        self.inner = VectorPathway(math.prod(self.x_shape), n_classes, **settings)
        self.labels = self.inner.labels

    @property
    def n_classes(self) -> tuple[int, ...]:
        return self.inner.n_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor, s_pre: Tensor, sde: SDE) -> Tensor:
        flat = self.inner(x.flatten(1), t, y, s_pre.flatten(1), sde)
        return flat.reshape(x.shape)


@dataclass
class CustomDomain:
    """A :class:`ctrl_bio.domain.Domain` from a data file and a network ``_target_`` (see the module docstring)."""

    data_path: str
    network: dict[str, Any]
    sde: SDE
    predicts: str = "eps"
    checkpoint: str | None = None
    pathway: dict[str, Any] = field(default_factory=dict)
    _data: Tensor | None = field(default=None, init=False, repr=False)

    name = "custom"
    label_types = ("categorical", "bins")

    def training_data(self) -> Tensor:
        if self._data is None:
            self._data = load_tensor_file(self.data_path)
        return self._data

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.training_data().shape[1:])

    def score_network(self) -> nn.Module:
        return UserNetworkScore(self.sde, self.network, self.predicts, net=build_network(self.network))

    def pretrained_model(self) -> nn.Module:
        """The network of ``domain.checkpoint`` (a ``ctrl-bio pretrain`` run directory or its score.safetensors),
        rebuilt from this run's ``domain.network`` and frozen."""
        from ctrl_bio.training.runs import read_meta, read_weights, sde_spec

        if self.checkpoint is None:
            raise ValueError("domain=custom: give domain.checkpoint=<a ctrl-bio pretrain run directory> (the "
                             "network to fine-tune)")
        path = Path(self.checkpoint)
        path = path / "score.safetensors" if path.is_dir() else path
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise FileNotFoundError(f"domain.checkpoint: no '{path}' with its .json (a ctrl-bio pretrain run?)")
        meta = read_meta(path.with_suffix(".json"))
        saved = (meta.get("config") or {}).get("network")
        if saved != self.network or meta.get("sde") != sde_spec(self.sde):
            raise ValueError(f"domain.checkpoint {path}: trained with network {saved} and SDE {meta.get('sde')}, "
                             f"this run names {self.network} and {sde_spec(self.sde)}")
        net = self.score_network()
        net.load_state_dict(read_weights(path))
        return net.requires_grad_(False).eval()

    def augment(self, pretrained: nn.Module, n_classes: Sequence[int]) -> AugmentedScore:
        if len(self.x_shape) == 1:
            return AugmentedScore(pretrained, VectorPathway(self.x_shape[0], n_classes, **self.pathway), self.sde)
        return AugmentedScore(pretrained, FlatPathway(self.x_shape, n_classes, **self.pathway), self.sde)

    def write_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], run_dir: Path) -> Path:
        """``samples.safetensors`` (x, y and the label names in its metadata); vectors also as ``samples.csv``."""
        path = Path(run_dir) / "samples.safetensors"
        save_file({"x": x.contiguous(), "y": y.contiguous()}, str(path), metadata={"labels": ",".join(label_names)})
        if x.ndim == 2:
            path = Path(run_dir) / "samples.csv"
            with path.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow([f"x{i}" for i in range(x.shape[1])] + list(label_names))
                for xi, yi in zip(x.tolist(), y.tolist()):
                    writer.writerow([f"{v:.6g}" for v in xi] + yi)
        return path

    def plot_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], path: Path) -> Path:
        """Images (N, C, H, W) with C in {1, 3}: a grid of the first 64; anything else: the first two coordinates."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        title = ", ".join(f"{name}={v}" for name, v in zip(label_names, y[0].tolist()))
        if x.ndim == 4 and x.shape[1] in (1, 3):
            n = min(64, x.shape[0])
            cols = min(8, n)
            rows = -(-n // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + 0.4), squeeze=False)
            lo, hi = float(x[:n].min()), float(x[:n].max())
            for ax in axes.flat:
                ax.axis("off")
            for ax, img in zip(axes.flat, x[:n]):
                img = ((img - lo) / max(hi - lo, 1e-8)).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
        else:
            flat = x.flatten(1)
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.scatter(flat[:, 0].numpy(), flat[:, min(1, flat.shape[1] - 1)].numpy(), s=3, alpha=0.5)
            ax.set_xlabel("x[0]")
            ax.set_ylabel("x[1]")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


def make_domain(settings: Mapping[str, Any]) -> CustomDomain:
    """``configs/plugin/custom.yaml``: the domain of ``configs/domain/custom.yaml``'s settings."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_container(settings, resolve=True)
    return CustomDomain(data_path=str(settings["data"]), network=dict(settings["network"]),
                        sde=VPSDE(settings.get("beta_min", 0.1), settings.get("beta_max", 20.0)),
                        predicts=settings.get("predicts", "eps"), checkpoint=settings.get("checkpoint"),
                        pathway=dict(settings.get("pathway") or {}))


def file_pairs(domain: CustomDomain, n: int | None, generator: torch.Generator, *, file: str, x_key: str = "x",
               y_key: str = "y") -> tuple[Tensor, Tensor]:
    """A label's pairs from one tensor file holding x (N, ...) and y (N,): ``pairs: {callable:
    "domains.custom.domain:file_pairs", kwargs: {file: pairs.npz}}`` (the first n pairs; all when n is null)."""
    x, y = load_tensor_file(file, x_key), load_tensor_file_1d(file, y_key)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{file}: {x.shape[0]} x but {y.shape[0]} y")
    return (x[:n], y[:n]) if n is not None else (x, y)


def load_tensor_file_1d(path: str | Path, key: str) -> Tensor:
    """The array ``key`` of a ``.pt`` / ``.npz`` / ``.safetensors`` file as a 1-D tensor of values."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pt":
        arrays = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    elif suffix == ".safetensors":
        arrays = load_file(str(path))
    else:
        raise ValueError(f"{path}: pairs need x and y in one .pt, .npz or .safetensors file")
    if not isinstance(arrays, Mapping) or key not in arrays:
        raise ValueError(f"{path}: no array '{key}' (the label values)")
    return torch.as_tensor(np.asarray(arrays[key])).reshape(-1)
