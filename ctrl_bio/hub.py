"""Models in the Hugging Face convention: ``save_pretrained(model, dir)`` and ``from_pretrained(dir_or_hub_id)``.

A saved model is a folder the field's tools read: ``config.json`` (what rebuilds it), ``model.safetensors`` (its
weights) and a generated ``README.md`` model card. Three kinds, told apart by ``config.json["ctrl_bio"]["kind"]``:

- ``score_network``: a pre-trained score network (``VectorScoreNet``, ``ConvScoreNet``, ``UNetScore``, any network
  with a ``config`` dict of its constructor arguments and its ``sde``, or such a network wrapped by
  :func:`ctrl_bio.interop.wrap_network`);
- ``reward_classifier``: a calibrated classifier p(y | x) (:class:`ctrl_bio.reward.CalibratedClassifier`);
- ``ctrl_model``: a fine-tuned CTRL model (:class:`ctrl_bio.model.AugmentedScore`, Zhao et al. 2024, Sec. 4.2, or an
  :class:`AdapterModel`, whose label pathway lives inside the frozen network as a label embedding and peft LoRA
  adapters, written in peft's adapter format: :class:`ctrl_bio.lora.LoRAAugmentedScore` and its subclasses, the
  image domain's UNet pathway): only the label pathway is stored; the frozen base model is referenced by a path
  relative to the folder (by default the sub-folder ``base/``, written alongside) or by a Hub id, never by an
  absolute path, so the folder moves between machines and can be pushed to the Hub as it is.

The folder is written and read through huggingface_hub's ``ModelHubMixin`` (config, model card, Hub downloads) and
uploaded whole, ``base/`` included, by ``save_pretrained(..., push_to_hub=True)``.
Nothing downloads unless a Hub id is named: a local folder is read from disk. Classes named in a ``config.json`` are
imported only from trusted packages (:func:`ctrl_bio.labels.check_trusted`). What rebuilds a module is in
:mod:`ctrl_bio.hub_spec`, the model card in :mod:`ctrl_bio.hub_card`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, snapshot_download
from safetensors.torch import load_file, save_file
from torch import nn

from ctrl_bio.hub_card import CARD_TEMPLATE, SUMMARIES, ModelCardInfo
from ctrl_bio.hub_spec import build_module, build_sde, class_path, jsonable, module_spec, sde_spec
from ctrl_bio.labels import check_trusted, resolve_callable
from ctrl_bio.lora import ADAPTER_NAME
from ctrl_bio.model import AugmentedScore
from ctrl_bio.reward import CalibratedClassifier

__all__ = ["AdapterModel", "HubFolder", "ModelCardInfo", "build_module", "build_sde", "from_pretrained", "load_folder",
           "module_spec", "read_config", "save_pretrained", "sde_spec"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: A LoRA-augmented CTRL model's adapters, in peft's format (peft's ``LoraConfig.from_pretrained`` and
#: ``set_peft_model_state_dict`` read them; the LoRA settings are in the weights' header too, as diffusers writes them).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: Version of the folder layout, written into every config.json.
FORMAT_VERSION = 1
#: Where ``save_pretrained`` puts a CTRL model's base model when no other reference is given.
DEFAULT_BASE_DIR = "base"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------------------------------
# The folder, through huggingface_hub's ModelHubMixin


@runtime_checkable
class AdapterModel(Protocol):
    """A CTRL model whose label pathway lives inside its frozen network: a label embedding (attribute ``embedding``,
    saved as model.safetensors) and ``lora_rank`` (attribute) peft LoRA adapters named ``ctrl`` (saved in peft's
    format). The class is rebuilt as ``cls(base, **pathway_config(), lora_rank=, lora_alpha=, lora_targets=)`` around
    the saved base network. Methods only, so that ``issubclass`` can check a class named in a config.json."""

    def adapted_network(self) -> nn.Module:
        """The network the constructor took, as this model holds it (adapters injected); it has the ``sde``."""

    def adapter_host(self) -> nn.Module:
        """The module the adapters were injected into (module names in the peft files are relative to it)."""

    def pathway_config(self) -> dict[str, Any]:
        """The constructor's keyword arguments besides the network and the LoRA settings (JSON-able)."""


def _kind(model: nn.Module) -> str:
    if isinstance(model, (AugmentedScore, AdapterModel)):
        return "ctrl_model"
    if isinstance(model, CalibratedClassifier):
        return "reward_classifier"
    if hasattr(model, "sde"):
        return "score_network"
    raise TypeError(f"cannot save a {type(model).__name__}: save_pretrained takes a score network (with an `sde`), "
                    "a CalibratedClassifier, an AugmentedScore or a CTRL model with adapters (AdapterModel)")


def _is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not os.path.isabs(ref) and not Path(ref).exists()


def _lora_layout(net: nn.Module) -> tuple[float | None, list[str]]:
    """(lora_alpha, full names of the modules that carry CTRL's adapter): exact peft targets for a rebuild."""
    from peft.tuners.lora import LoraLayer

    alpha, names = None, []
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_alpha:
            alpha, names = float(module.lora_alpha[ADAPTER_NAME]), [*names, name]
    return alpha, names


def _adapter_pathway_spec(model: AdapterModel) -> dict[str, Any]:
    alpha, targets = _lora_layout(model.adapter_host()) if model.lora_rank > 0 else (None, [])
    return {"class": class_path(model),
            "config": {**jsonable(model.pathway_config()), "lora_rank": model.lora_rank, "lora_alpha": alpha,
                       "lora_targets": targets}}


def _base_network(model: nn.Module) -> nn.Module:
    """The frozen pre-trained network of a CTRL model; with adapters, rebuilt without them."""
    if isinstance(model, AugmentedScore):
        return model.pretrained
    net = model.adapted_network()
    if model.lora_rank == 0:
        return net
    base = build_module(module_spec(net), getattr(net, "sde", None))
    # peft keeps an adapted layer's own weights under base_layer; the adapters themselves are not the base's.
    state = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if "lora_" not in k}
    base.load_state_dict(state)
    return base.requires_grad_(False).eval()


class HubFolder(ModelHubMixin, library_name="ctrl-bio", tags=["ctrl-bio", "diffusion", "ctrl"],
                paper_url="https://arxiv.org/abs/2406.12120", model_card_template=CARD_TEMPLATE):
    """One ctrl-bio model and its card, as huggingface_hub's mixin saves and loads it.

    Use :func:`save_pretrained` and :func:`from_pretrained`; this class is their plumbing.

    Args:
        model: a score network, a :class:`ctrl_bio.reward.CalibratedClassifier` or an
            :class:`ctrl_bio.model.AugmentedScore`.
        card: what the model card says beyond the config.
        base_model: for a CTRL model, the reference its config records (a relative path or a Hub id).
        network: a ``_target_`` dict that rebuilds the network (a classifier's ``net``, a score network, a CTRL
            model's pathway) where :func:`module_spec` cannot read it from the module.
        extra: JSON-able settings kept under ``config.json["extra"]`` for the tools that read the folder (the
            command line's domain, sample shape, sampler grid); :func:`read_config` returns them.
    """

    def __init__(self, model: nn.Module, card: ModelCardInfo | None = None, base_model: str | None = None,
                 network: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None):
        self.model, self.card, self.base_model, self.network = model, card or ModelCardInfo(), base_model, network
        self.extra = jsonable(dict(extra)) if extra else None
        self.kind = _kind(model)

    def config(self) -> dict[str, Any]:
        """config.json: the kind, what rebuilds the model, and the card's facts."""
        m = self.model
        out: dict[str, Any] = {"ctrl_bio": {"kind": self.kind, "format": FORMAT_VERSION}}
        if self.kind == "score_network":
            out |= {"network": module_spec(m, self.network), "sde": sde_spec(m.sde)}
        elif self.kind == "reward_classifier":
            out |= {"network": module_spec(m.net, self.network), "temperature": float(m.temperature)}
        elif isinstance(m, AdapterModel):
            out |= {"base_model": self.base_model, "pathway": _adapter_pathway_spec(m),
                    "sde": sde_spec(m.adapted_network().sde), "n_classes": list(m.n_classes)}
        else:
            out |= {"base_model": self.base_model, "pathway": module_spec(m.pathway, self.network),
                    "sde": sde_spec(m.sde), "n_classes": list(m.n_classes)}
        card = jsonable(self.card)
        out |= {k: v for k, v in card.items() if v not in (None, [], {}) and k != "description"}
        if self.extra:
            out["extra"] = self.extra
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """model.safetensors: everything for a network or classifier, the label pathway only for a CTRL model (for
        adapters, its label embedding: the adapters go to peft's files)."""
        if isinstance(self.model, AdapterModel):
            module = self.model.embedding
        else:
            module = self.model.pathway if self.kind == "ctrl_model" else self.model
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file(self.weights(), str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if isinstance(self.model, AdapterModel) and self.model.lora_rank > 0:
            _save_peft_adapter(self.model, save_directory, self.base_model)
        # Written here, so the mixin keeps it (it writes its own config.json only when none exists).
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        config, card = self.config(), self.card
        base = self.base_model
        card_data = ModelCardData(library_name="ctrl-bio", tags=["ctrl-bio", "diffusion", self.kind],
                                  base_model=base if base and _is_hub_id(base) else None)
        spec = config.get("network", config.get("pathway", {}))
        network = spec.get("class", spec.get("target", ""))
        labels = ", ".join(f"`{lab.get('name', i)}`" + (f" ({lab['n_classes']} classes)" if "n_classes" in lab else "")
                           for i, lab in enumerate(card.labels))
        return ModelCard.from_template(
            card_data, template_str=CARD_TEMPLATE, title=f"ctrl-bio {self.kind.replace('_', ' ')}",
            summary=SUMMARIES[self.kind], description=card.description, kind=self.kind, base_model=base,
            labels=labels, alpha=card.alpha, gamma=card.gamma, estimator=card.estimator,
            training_data=card.training_data, network=network, sde=config.get("sde", {}).get("class"),
            metrics=card.metrics, load_name=kwargs.get("load_name", "path/to/this/folder"))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", **model_kwargs: Any) -> HubFolder:
        folder = Path(model_id)
        if not folder.is_dir():  # a Hub id, named by the user: the whole repository (a CTRL model's base/ too)
            folder = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                            force_download=force_download, local_files_only=local_files_only))
        return cls(load_folder(folder, map_location=map_location))


def _save_peft_adapter(model: AdapterModel, folder: Path, base_model: str | None) -> None:
    """CTRL's LoRA adapters as a peft adapter folder: adapter_config.json + adapter_model.safetensors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    host = model.adapter_host()
    alpha, targets = _lora_layout(host)
    lora = LoraConfig(r=model.lora_rank, lora_alpha=alpha, target_modules=targets, base_model_name_or_path=base_model)
    lora.save_pretrained(str(folder))
    header = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.to_dict().items()}
    state = get_peft_model_state_dict(host, adapter_name=ADAPTER_NAME)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / PEFT_WEIGHTS_NAME),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header, sort_keys=True)})


def _load_adapter_model(folder: Path, config: Mapping[str, Any], base: nn.Module,
                        weights: Mapping[str, torch.Tensor], map_location: str) -> AdapterModel:
    cls = resolve_callable(config["pathway"]["class"])  # an AdapterModel class (trusted: checked before)
    model = cls(base, **config["pathway"]["config"])
    model.embedding.load_state_dict(weights)
    if model.lora_rank > 0:
        from peft.utils import set_peft_model_state_dict

        path = folder / PEFT_WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {PEFT_WEIGHTS_NAME} for the model's LoRA adapters")
        result = set_peft_model_state_dict(model.adapter_host(), load_file(str(path), device=map_location),
                                           adapter_name=ADAPTER_NAME)
        mismatched = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
        if mismatched:
            raise ValueError(f"{path} does not fit the base model: {len(mismatched)} mismatched tensors, "
                             f"e.g. {mismatched[0]!r}")
    return model


def load_folder(folder: Path, *, map_location: str = "cpu") -> nn.Module:
    """The model in a local folder written by :func:`save_pretrained`, frozen, in eval mode."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {path.name} (not a folder written by save_pretrained)")
    config = json.loads(config_path.read_text())
    kind = (config.get("ctrl_bio") or {}).get("kind")
    weights = load_file(str(weights_path), device=map_location)
    if kind == "score_network":
        model = build_module(config["network"], build_sde(config["sde"]))
        model.load_state_dict(weights)
    elif kind == "reward_classifier":
        model = CalibratedClassifier(build_module(config["network"]), config["temperature"])
        model.load_state_dict(weights)
    elif kind == "ctrl_model":
        model = _load_ctrl_model(folder, config, weights, map_location)
    else:
        raise ValueError(f"{config_path}: ctrl_bio.kind must be score_network, reward_classifier or ctrl_model, "
                         f"got {kind!r}")
    return model.to(map_location).requires_grad_(False).eval()


def _load_ctrl_model(folder: Path, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                     map_location: str) -> AugmentedScore | AdapterModel:
    ref = config.get("base_model")
    if not ref:
        raise ValueError(f"{folder / CONFIG_NAME}: a ctrl_model needs base_model (a relative path or a Hub id)")
    local = (folder / ref).resolve()
    if local.is_dir():
        base = load_folder(local, map_location=map_location)
    elif _is_hub_id(ref):
        base = from_pretrained(ref, map_location=map_location)
    else:
        raise FileNotFoundError(f"{folder / CONFIG_NAME}: base_model '{ref}' is neither a folder relative to "
                                f"{folder} nor a Hub id")
    sde = build_sde(config["sde"])
    if getattr(base, "sde", None) is not None and sde_spec(base.sde) != sde_spec(sde):
        raise ValueError(f"{folder}: the base model's SDE {sde_spec(base.sde)['class']} differs from the one the "
                         "CTRL model was fine-tuned with")
    check_trusted(config["pathway"]["class"], f"{folder / CONFIG_NAME}: pathway class")
    pathway_class = resolve_callable(config["pathway"]["class"])
    # A protocol with methods: issubclass checks that the class has them (an AugmentedScore pathway has not).
    if isinstance(pathway_class, type) and issubclass(pathway_class, AdapterModel):
        return _load_adapter_model(folder, config, base, weights, map_location)
    pathway = build_module(config["pathway"])
    pathway.load_state_dict(weights)
    return AugmentedScore(base, pathway, getattr(base, "sde", sde))


# --------------------------------------------------------------------------------------------------------------------
# The two calls


def save_pretrained(model: nn.Module, save_directory: str | Path, *, base_model: str | Path | None = None,
                    network: Mapping[str, Any] | None = None, card: ModelCardInfo | None = None,
                    extra: Mapping[str, Any] | None = None, push_to_hub: bool = False, repo_id: str | None = None,
                    **card_fields: Any) -> Path:
    """Write ``model`` as a Hugging Face folder: ``config.json``, ``model.safetensors`` and a ``README.md`` card.

    Args:
        model: a pre-trained score network, a reward classifier (``CalibratedClassifier``) or a fine-tuned CTRL model
            (``AugmentedScore``, or an :class:`AdapterModel` such as ``LoRAAugmentedScore``).
        save_directory: the folder (created).
        base_model: for a CTRL model, where its frozen base model lives: a folder written by this function (recorded
            relative to ``save_directory``) or a Hub id. Default: the base is written into ``save_directory/base``.
        network: how to rebuild a network this module cannot describe by itself, a Hydra-style
            ``{"_target_": "pkg.module.factory", **kwargs}``; e.g. a label config's ``classifier`` node with the
            ``x_shape`` and ``n_classes`` that ``ctrl_bio.labels.build_classifier`` adds to it.
        card: the model card's facts; or give them as keyword arguments (``labels``, ``alpha``, ``gamma``,
            ``estimator``, ``training_data``, ``metrics``, ``description``; :class:`ModelCardInfo`).
        extra: JSON-able settings for the tools that read the folder, kept as ``config.json["extra"]``
            (:func:`read_config`); e.g. the command line's domain and sample shape.
        push_to_hub, repo_id: also upload the whole folder, a CTRL model's ``base/`` included, to the Hub repository
            ``repo_id`` (default: the folder's name; created if missing; needs a login).

    Returns:
        The folder.
    """
    save_directory = Path(save_directory)
    card = card or ModelCardInfo(**card_fields)
    ref = None
    if isinstance(model, (AugmentedScore, AdapterModel)):
        ref = _base_reference(model, save_directory, base_model)
    load_name = repo_id or f"path/to/{save_directory.name}"
    HubFolder(model, card, ref, network, extra).save_pretrained(save_directory,
                                                                model_card_kwargs={"load_name": load_name})
    if push_to_hub:
        # The folder as written, not the mixin's push_to_hub: that re-saves into a temporary folder without base/.
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(repo_id or save_directory.name, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=save_directory)
    return save_directory


def _base_reference(model: nn.Module, save_directory: Path, base_model: str | Path | None) -> str:
    """The base model as the config records it: a path relative to the folder, or a Hub id; never absolute."""
    if base_model is None:
        save_pretrained(_base_network(model), save_directory / DEFAULT_BASE_DIR)
        return DEFAULT_BASE_DIR
    base = Path(base_model)
    if base.is_dir():
        if not (base / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"base_model {base}: no {CONFIG_NAME} (save the base with save_pretrained first)")
        rel = os.path.relpath(base.resolve(), save_directory.resolve())
        return Path(rel).as_posix()
    if _is_hub_id(str(base_model)):
        return str(base_model)
    raise FileNotFoundError(f"base_model {base_model!r} is neither a saved folder nor a Hub id (owner/name)")


def from_pretrained(name_or_path: str | Path, *, map_location: str = "cpu", revision: str | None = None,
                    local_files_only: bool = False) -> nn.Module:
    """A model written by :func:`save_pretrained`, from a local folder or a Hub id; frozen, in eval mode.

    A local folder is read from disk and nothing is downloaded; a Hub id (``owner/name``) downloads its repository
    (and a CTRL model's base model, if that is a Hub id too).

    Returns:
        The score network, the ``CalibratedClassifier`` or the ``AugmentedScore`` (base model included).
    """
    if Path(name_or_path).is_dir():
        return load_folder(Path(name_or_path), map_location=map_location)
    if not _is_hub_id(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path}: no such folder, and not a Hub id (owner/name)")
    return HubFolder.from_pretrained(str(name_or_path), revision=revision, local_files_only=local_files_only,
                                     map_location=map_location).model


def read_config(name_or_path: str | Path, *, revision: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a saved folder (or of a Hub id, which downloads that one file): kind, labels, alpha,
    gamma, estimator, metrics and the ``extra`` settings given to :func:`save_pretrained`."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (not a folder written by save_pretrained)")
    elif _is_hub_id(str(name_or_path)):
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(name_or_path), CONFIG_NAME, revision=revision))
    else:
        raise FileNotFoundError(f"{name_or_path}: no such folder, and not a Hub id (owner/name)")
    return json.loads(path.read_text())
