"""What the ``ctrl-bio`` training commands need of a domain: the :class:`Domain` protocol.

A domain (``domains/<name>/``) plugs into ``pretrain``, ``train-classifier``, ``finetune`` and ``sample``
through one object built by a Hydra ``_target_`` (``configs/plugin/<domain>.yaml``); the core never
imports it. The object answers for the domain's data, networks and file format; the commands supply
the loops (``ctrl_bio.training``), checkpoints and run directories. Label definitions
(``ctrl_bio.labels``) receive the same object and may also use its optional ``label_types`` and
``encode_x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from ctrl_bio.model import ConditionalScore
from ctrl_bio.sde import SDE

#: A frozen score callable ``(x, t) -> s`` (an ``nn.Module`` in practice, so that it moves across devices).
ScoreModel = Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class Domain(Protocol):
    """A domain as the training commands see it.

    Attributes:
        name: the domain's name, checked against a label definition's ``domain`` field.
        sde: the forward SDE its pre-trained model uses.
        x_shape: the shape of one sample, e.g. ``(4,)`` or ``(4, 200)``.

    Optional, outside the protocol: ``project(x) -> x``, the nearest point of the data's support for discrete data
    (one-hot sequences, graphs). The suites snap a pool of pre-trained samples with it (``pool: pretrained``).
    """

    name: str
    sde: SDE
    x_shape: tuple[int, ...]

    def training_data(self) -> Tensor:
        """Clean samples the score network is pre-trained on, (N, *x_shape); the same tensor every call."""
        ...

    def score_network(self) -> nn.Module:
        """A fresh, untrained score network ``(x, t) -> s`` for ``pretrain``.

        It takes the SDE as its first constructor argument ``sde`` and exposes its other constructor
        arguments as a dict ``config``, so that a checkpoint can rebuild it.
        """
        ...

    def pretrained_model(self) -> ScoreModel:
        """The frozen pre-trained score that fine-tuning adds the label to."""
        ...

    def augment(self, pretrained: ScoreModel, n_classes: Sequence[int]) -> ConditionalScore:
        """The augmented model: ``pretrained`` frozen plus a zero-initialised pathway for these labels."""
        ...

    def write_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], run_dir: Path) -> Path:
        """Write samples x (B, *x_shape) with their requested labels y (B, K) in the domain's format.

        Returns:
            The file written.
        """
        ...


def check_domain(obj: object) -> Domain:
    """``obj`` if it implements :class:`Domain`, else a one-line ``ValueError`` naming what is missing."""
    missing = [name for name in ("name", "sde", "x_shape", "training_data", "score_network", "pretrained_model",
                                 "augment", "write_samples") if not hasattr(obj, name)]
    if missing:
        raise ValueError(f"{type(obj).__name__} is not a ctrl_bio.domain.Domain: it lacks {', '.join(missing)}")
    return obj  # type: ignore[return-value]
