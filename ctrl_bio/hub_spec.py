"""What rebuilds a module from a ``config.json``: ``{"class": "pkg.module.Class", "config": {...}}`` (+ ``"sde": true``
when the SDE comes first), plain ``nn.Sequential`` MLPs by their layers, the core's label pathways by their sizes,
any other network by a Hydra-style builder; classes are imported only from trusted packages
(:func:`ctrl_bio.labels.check_trusted`). Used by :mod:`ctrl_bio.hub`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from torch import nn

from ctrl_bio.interop import NetworkScore
from ctrl_bio.label_space import CategoricalLabels
from ctrl_bio.labels import check_trusted, resolve_callable
from ctrl_bio.model import VectorPathway
from ctrl_bio.nets import SequencePathway
from ctrl_bio.sde import SDE, DiscreteScheduleSDE


def class_path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_path(obj: Any) -> str:
    return class_path_of(type(obj))


def jsonable(value: Any) -> Any:
    if is_dataclass(value):
        value = asdict(value)
    return json.loads(json.dumps(value))


def sde_spec(sde: SDE) -> dict[str, Any]:
    """The SDE's class and constructor arguments: its public attributes, or a schedule's ``alphas_cumprod``."""
    if type(sde) is DiscreteScheduleSDE:
        return {"class": class_path(sde), "alphas_cumprod": sde.alphas_cumprod.tolist()}
    return {"class": class_path(sde), **jsonable({k: v for k, v in vars(sde).items() if not k.startswith("_")})}


def build_sde(spec: Mapping[str, Any]) -> SDE:
    """The SDE of :func:`sde_spec`."""
    spec = dict(spec)
    path = spec.pop("class")
    check_trusted(path, "config.json: sde class")
    return resolve_callable(path)(**spec)


def _sequential_spec(seq: nn.Sequential) -> list[list[Any]]:
    layers: list[list[Any]] = []
    for layer in seq:
        if isinstance(layer, nn.Linear):
            layers.append(["Linear", layer.in_features, layer.out_features, layer.bias is not None])
        elif isinstance(layer, nn.Flatten):
            layers.append(["Flatten", layer.start_dim, layer.end_dim])
        elif isinstance(layer, nn.Dropout):
            layers.append(["Dropout", layer.p])
        elif type(layer) in _ACTIVATIONS.values():
            layers.append([type(layer).__name__])
        elif type(layer) is nn.Sequential:  # flat_mlp_classifier: Flatten, then mlp_classifier's Sequential
            layers.append(["Sequential", _sequential_spec(layer)])
        else:
            raise TypeError(f"cannot describe a {type(layer).__name__} inside nn.Sequential for config.json")
    return layers


_ACTIVATIONS = {cls.__name__: cls for cls in (nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity)}


def _build_sequential(layers: Sequence[Sequence[Any]]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for name, *args in layers:
        if name == "Linear":
            modules.append(nn.Linear(args[0], args[1], bias=args[2]))
        elif name == "Flatten":
            modules.append(nn.Flatten(*args))
        elif name == "Dropout":
            modules.append(nn.Dropout(*args))
        elif name in _ACTIVATIONS:
            modules.append(_ACTIVATIONS[name]())
        elif name == "Sequential":
            modules.append(_build_sequential(args[0]))
        else:
            raise ValueError(f"config.json: unknown layer {name!r} in an nn.Sequential")
    return nn.Sequential(*modules)


def _pathway_config(pathway: nn.Module) -> dict[str, Any]:
    """Constructor arguments of the core's label pathways, read back from their layers."""
    if not isinstance(getattr(pathway, "labels", None), CategoricalLabels):
        raise TypeError(f"cannot describe a {type(pathway).__name__} of {type(pathway.labels).__name__} for "
                        "config.json: saving supports categorical labels")
    if isinstance(pathway, VectorPathway):
        linears = [m for m in pathway.body if isinstance(m, nn.Linear)]
        return {"dim": pathway.dim, "n_classes": list(pathway.n_classes), "hidden": pathway.out.in_features,
                "depth": len(linears), "n_fourier": pathway.n_fourier}
    if isinstance(pathway, SequencePathway):
        return {"channels": pathway.conv_out.out_channels, "n_classes": list(pathway.n_classes),
                "hidden": pathway.conv_in.out_channels, "n_blocks": len(pathway.blocks),
                "emb_dim": pathway.label_emb.out_features, "kernel_size": pathway.conv_in.kernel_size[0],
                "n_fourier": pathway.n_fourier}
    raise TypeError(f"cannot describe a {type(pathway).__name__} label pathway for config.json")


def module_spec(module: nn.Module, builder: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What rebuilds ``module``: its class and constructor arguments.

    Networks of the toolkit keep their constructor arguments in a ``config`` dict (or dataclass) and, for score
    networks, take the SDE as first argument (``sde``); the core's label pathways and plain ``nn.Sequential`` MLPs
    (:func:`ctrl_bio.reward.mlp_classifier`) are read back from their layers. Any other module is described by the
    caller's ``builder``, a Hydra-style ``{"_target_": "pkg.module.factory", **kwargs}`` (what a label config's
    ``classifier`` node holds, with ``x_shape`` and ``n_classes``).

    Raises:
        TypeError: for a module none of these describes.
    """
    if builder is not None:
        builder = jsonable(dict(builder))
        return {"target": builder.pop("_target_"), "kwargs": builder}
    if type(module) is nn.Sequential:
        return {"class": "torch.nn.Sequential", "layers": _sequential_spec(module)}
    if isinstance(module, (VectorPathway, SequencePathway)):
        return {"class": class_path(module), "config": _pathway_config(module)}
    if type(module) is NetworkScore:  # wrap_network: the network's own spec and how its output becomes the score
        if callable(module.time):
            raise TypeError("cannot save a wrap_network score whose time input is a callable: use 't' or 'timestep'")
        return {"class": class_path(module), "network": module_spec(module.net),
                "predicts": module.predicts, "time": module.time}
    config = getattr(module, "config", None)
    if isinstance(config, Mapping) or is_dataclass(config):
        return {"class": class_path(module), "config": jsonable(config), "sde": hasattr(module, "sde")}
    raise TypeError(f"cannot save a {type(module).__name__}: give it a `config` dict of its constructor arguments "
                    "(and take the SDE as first argument `sde`), as ctrl_bio.nets.VectorScoreNet does, or pass "
                    "save_pretrained(..., network={'_target_': 'pkg.module.factory', ...})")


def build_module(spec: Mapping[str, Any], sde: SDE | None = None) -> nn.Module:
    """The module of :func:`module_spec`, freshly initialised (load its weights afterwards)."""
    if "target" in spec:
        check_trusted(spec["target"], "config.json: network _target_")
        return resolve_callable(spec["target"])(**spec["kwargs"])
    if spec["class"] == "torch.nn.Sequential":
        return _build_sequential(spec["layers"])
    if spec["class"] == class_path_of(NetworkScore):
        if sde is None:
            raise ValueError("config.json: a wrap_network score needs its SDE")
        return NetworkScore(build_module(spec["network"], sde), sde, spec["predicts"], spec["time"])
    check_trusted(spec["class"], "config.json: network class")
    cls = resolve_callable(spec["class"])
    config = dict(spec.get("config") or {})
    if spec.get("sde"):
        if sde is None:
            raise ValueError(f"config.json: {spec['class']} needs an SDE and the config gives none")
        return cls(sde, **config)
    return cls(**config)
