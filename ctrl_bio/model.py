"""The augmented score model of CTRL: a frozen pre-trained score plus a zero-initialised label pathway.

CTRL (Zhao et al. 2024, Sec. 4.2) adds trainable parameters for the new label y to the pre-trained
model and fine-tunes only those. The pathway's output is exactly zero at initialisation, so step 0 of
fine-tuning reproduces the pre-trained sampler bit for bit, and a request for nothing switches it off.

One family for every kind of label (a :class:`ctrl_bio.label_space.LabelSpace` says what a label is):
- :class:`VectorPathway` for vector data: s = s_pre(x, t) + u(x_t, t, y), with u a small MLP of the label space's
  features whose last layer is zero; u is what the KL is made of (:class:`AugmentedScore`).
- a label embedding for networks with a time embedding, added to the time embedding of the frozen network
  (:class:`EmbeddingAugmentedScore`): :class:`LabelEmbedding` (a row per class plus a null row that stays zero) or
  :class:`ContinuousLabelEmbedding` (a small MLP of the standardised value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ctrl_bio.label_space import (
    NULL_LABEL,
    CategoricalLabels,
    ContinuousLabels,
    LabelSpace,
    as_label_space,
    check_labels,
    label_space_of,
    one_hot_labels,
    per_label,
    standardised,
    value_features,
)
from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims

__all__ = ["NULL_LABEL", "AugmentedScore", "ConditionalScore", "ContinuousAugmentedScore", "ContinuousLabelEmbedding",
           "ContinuousPathwayScore", "ContinuousVectorPathway", "EmbeddingAugmentedScore", "LabelEmbedding",
           "VectorPathway", "check_labels", "fourier_features", "one_hot_labels"]


class ConditionalScore(Protocol):
    """What estimators and samplers need of an augmented model (every class below satisfies it).

    ``labels`` says what a request is (:class:`ctrl_bio.label_space.LabelSpace`); a model without it has categorical
    labels with ``n_classes`` (:func:`ctrl_bio.label_space.label_space_of`).
    """

    labels: LabelSpace

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]: ...

    def parameters(self): ...


def fourier_features(t: Tensor, n_features: int) -> Tensor:
    """Sine/cosine features of t in [0, 1] at geometric frequencies, (B,) -> (B, n_features)."""
    half = n_features // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(200.0), half, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class VectorPathway(nn.Module):
    """Label pathway u(x_t, t, y) for vector data, an MLP with a zero last layer.

    The inputs are x_t, the pre-trained noise prediction eps_pre = -sigma_t s_pre and the denoised
    x0_hat = (x_t + sigma_t^2 s_pre) / alpha_t (both free, the pre-trained score is computed anyway),
    Fourier features of t and the label space's features of y (one-hot codes, or Fourier features of a real
    value). The network predicts in noise units and u = -net / sigma_t: the h-transform drift grows like
    1 / sigma_t where classes separate, and this scaling keeps the network's own outputs of order one (as in
    eps-parameterised diffusion models). A request for nothing gets no control.

    Args:
        dim: data dimension d.
        n_classes: number of classes of each label, e.g. (4,) or (3, 2, 2); or a label space
            (:class:`ctrl_bio.label_space.ContinuousLabels` for real-valued labels).
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        n_fourier: number of Fourier features of t.
    """

    def __init__(self, dim: int, n_classes: Sequence[int] | LabelSpace, hidden: int = 128, depth: int = 3,
                 n_fourier: int = 16):
        super().__init__()
        self.dim, self.labels, self.n_fourier = dim, as_label_space(n_classes), n_fourier
        layers: list[nn.Module] = []
        width = 3 * dim + n_fourier + self.labels.n_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def n_classes(self) -> tuple[int, ...]:
        """Classes per label (categorical labels only)."""
        return self.labels.n_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor, s_pre: Tensor, sde: SDE) -> Tensor:
        alpha, sigma = append_dims(sde.alpha(t), x.ndim), append_dims(sde.sigma(t), x.ndim)
        eps_pre = -sigma * s_pre
        x0_hat = (x - sigma * eps_pre) / alpha
        h = torch.cat([x, eps_pre, x0_hat, fourier_features(t, self.n_fourier), self.labels.features(y)], 1)
        eps_u = self.out(self.body(h))
        active = self.labels.requested(y).any(dim=1, keepdim=True).to(x.dtype)
        return -active * eps_u / sigma


class ContinuousVectorPathway(VectorPathway):
    """:class:`VectorPathway` for K real-valued labels (:class:`ctrl_bio.label_space.ContinuousLabels`).

    Args:
        dim: data dimension d.
        n_labels: K.
        hidden, depth: MLP width and number of hidden layers.
        n_fourier: Fourier features of t; n_fourier_y: of each standardised label value.
        loc, scale: standardisation of each label (a scalar or one per label), e.g. the prior's ``loc``, ``scale``.
    """

    def __init__(self, dim: int, n_labels: int = 1, hidden: int = 128, depth: int = 3, n_fourier: int = 16,
                 n_fourier_y: int = 16, loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0):
        super().__init__(dim, ContinuousLabels(n_labels, loc, scale, n_fourier_y), hidden, depth, n_fourier)


class _LabelledScore(nn.Module):
    """What every augmented model shares: its label space, and the sampler callable for fixed requests (a subclass
    defines ``score_and_control(x, t, y) -> (s_theta, u)``)."""

    labels: LabelSpace

    @property
    def n_classes(self) -> tuple[int, ...]:
        """Classes per label (categorical labels only)."""
        return self.labels.n_classes

    @property
    def n_labels(self) -> int:
        return self.labels.n_labels

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """A sampler callable ``(x, t) -> (s_theta, u)`` for fixed requests y of shape (B, K)."""
        self.labels.check(y)
        return lambda x, t: self.score_and_control(x, t, y)


class AugmentedScore(_LabelledScore):
    """s_theta(x, t, y) = s_pre(x, t) + u_theta(x, t, y) with s_pre frozen (CTRL's augmented model).

    Args:
        pretrained: the pre-trained score ``(x, t) -> s`` (an ``nn.Module`` is frozen in place).
        pathway: a label pathway such as :class:`VectorPathway`, zero at initialisation.
        sde: the SDE the pre-trained model was trained with.
    """

    def __init__(self, pretrained: Callable[[Tensor, Tensor], Tensor], pathway: VectorPathway, sde: SDE):
        super().__init__()
        if isinstance(pretrained, nn.Module):
            pretrained.requires_grad_(False)
        self.pretrained = pretrained
        self.pathway = pathway
        self.sde = sde
        self.labels = label_space_of(pathway)  # a pathway of its own kind may only name its n_classes

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(s_theta, u) where u = s_theta - s_pre; the pair the sampler records the KL from."""
        s_pre = self.pretrained(x, t)
        u = self.pathway(x, t, y.to(x.device), s_pre, self.sde)  # a prior samples on the CPU
        return s_pre + u, u

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.score_and_control(x, t, y)[0]


#: The augmented model of a :class:`ContinuousVectorPathway` (one class serves every label space).
ContinuousPathwayScore = AugmentedScore


class LabelEmbedding(nn.Module):
    """One embedding row per class and label plus a null row that stays zero (zero-initialised).

    The sum over labels is added to a frozen network's time embedding (CTRL Sec. 4.2; the same place
    classifier-free guidance puts its class embedding).

    With ``n_time_features`` > 0 each class also gets a row per sine/cosine feature of t (:func:`fourier_features`),
    so its embedding is e_y + sum_f phi_f(t) e_{y,f}: a label that should act at middle noise levels but not near
    the data can. A constant e_y enters every noise level alike. The motivation was that the score near the data is
    sharp, so a regression onto the tilted score might keep a constant e_y small everywhere. On QED bins the time
    features raised the KL but not the accuracy (docs/method.md), so they are off by default. Zero at
    initialisation either way.

    Args:
        n_classes: classes per label.
        emb_dim: width of the network's time embedding.
        n_time_features: sine/cosine features of t per class (even); 0: e_y does not depend on t.
    """

    def __init__(self, n_classes: Sequence[int], emb_dim: int, n_time_features: int = 0):
        super().__init__()
        if n_time_features < 0 or n_time_features % 2:
            raise ValueError(f"n_time_features must be even and >= 0, got {n_time_features}")
        self.n_classes = tuple(int(n) for n in n_classes)
        self.labels = CategoricalLabels(self.n_classes)
        self.emb_dim, self.n_time_features = int(emb_dim), int(n_time_features)
        self.tables = nn.ModuleList(nn.Embedding(n + 1, emb_dim) for n in self.n_classes)
        self.time_tables = nn.ModuleList(nn.Embedding(n + 1, n_time_features * emb_dim)
                                         for n in self.n_classes) if n_time_features else None
        for weight in self.parameters():
            nn.init.zeros_(weight)

    @property
    def time_dependent(self) -> bool:
        return self.time_tables is not None

    def forward(self, y: Tensor, t: Tensor | None = None) -> Tensor:
        """(B, K) labels (and t, a scalar or (B,), when time-dependent) -> (B, emb_dim)."""
        if self.time_dependent:
            if t is None:
                raise ValueError("this label embedding depends on t: call it as embedding(y, t)")
            phi = fourier_features(torch.as_tensor(t, dtype=self.tables[0].weight.dtype,
                                                   device=y.device).reshape(-1).expand(y.shape[0]),
                                   self.n_time_features)
        # Row n of each table is the null row; index -1 maps onto it, and it is masked so it stays zero.
        out = 0.0
        for k, (n, table) in enumerate(zip(self.n_classes, self.tables)):
            idx = torch.where(y[:, k] == NULL_LABEL, torch.full_like(y[:, k], n), y[:, k])
            e = table(idx)
            if self.time_dependent:
                rows = self.time_tables[k](idx).view(y.shape[0], self.n_time_features, self.emb_dim)
                e = e + torch.einsum("bf,bfe->be", phi, rows)
            out = out + e * (y[:, k] != NULL_LABEL).unsqueeze(1).to(table.weight.dtype)
        return out


class ContinuousLabelEmbedding(nn.Module):
    """y (B, K) float -> (B, emb_dim): per label, an MLP of :func:`value_features` of (y_k - loc_k) / scale_k.

    The continuous counterpart of :class:`LabelEmbedding` ("a small MLP for a continuous y", DESIGN.md; CTRL
    Sec. 4.2): the sum over labels is added to a frozen network's time embedding. The last layer of every MLP is
    zero, so the embedding is exactly zero at initialisation, and a NaN entry (no request for that label)
    contributes exactly zero at every step of training.

    Args:
        emb_dim: width of the network's time embedding.
        n_labels: K, the number of continuous labels.
        hidden: width of the MLP's hidden layer.
        n_fourier: sine/cosine features of the standardised value (even).
        loc, scale: standardisation of each label (a scalar or one per label), e.g. the prior's ``loc``, ``scale``.
    """

    def __init__(self, emb_dim: int, n_labels: int = 1, hidden: int = 64, n_fourier: int = 16,
                 loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0):
        super().__init__()
        self.labels = ContinuousLabels(n_labels, loc, scale, n_fourier)  # checks n_fourier, loc and scale
        self.n_labels, self.n_fourier = self.labels.n_labels, self.labels.n_fourier
        self.register_buffer("loc", per_label(loc, self.n_labels, "loc"))  # buffers: saved with the weights
        self.register_buffer("scale", per_label(scale, self.n_labels, "scale"))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(n_fourier + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Linear(hidden, emb_dim)) for _ in range(self.n_labels))
        for mlp in self.mlps:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, y: Tensor) -> Tensor:
        u, mask = standardised(y.to(self.loc.device), self.loc, self.scale)
        out = 0.0
        for k, mlp in enumerate(self.mlps):
            out = out + mlp(value_features(u[:, k], self.n_fourier)) * mask[:, k:k + 1].to(u.dtype)
        return out


class EmbeddingAugmentedScore(_LabelledScore):
    """A frozen network ``net(x, t, extra_emb)`` whose time embedding receives a label embedding.

    The control u = s_theta - s_pre needs the network a second time with the null embedding; both go
    through the same graph so that the KL's pathwise gradient is exact.

    Args:
        net: a score network with signature ``net(x, t, extra_emb=None) -> s``; frozen in place. If it also
            has ``forward_pair(x, t, extra_emb) -> (s, s_pre)`` that is used (one shared trunk).
        n_classes: classes per label (a :class:`LabelEmbedding`).
        emb_dim: width of the network's time embedding.
    """

    def __init__(self, net: nn.Module, n_classes: Sequence[int], emb_dim: int):
        super().__init__()
        self._attach(net, LabelEmbedding(n_classes, emb_dim))

    def _attach(self, net: nn.Module, embedding: nn.Module) -> None:
        net.requires_grad_(False)
        self.net = net
        self.embedding = embedding
        self.labels = label_space_of(embedding)

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embedding(y.to(x.device))  # a prior samples on the CPU; the model may sit on a GPU
        if hasattr(self.net, "forward_pair"):  # a network that shares the layers before the label between both
            s, s_pre = self.net.forward_pair(x, t, emb)
        else:
            s, s_pre = self.net(x, t, emb), self.net(x, t)
        return s, s - s_pre

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x, t, self.embedding(y.to(x.device)))


class ContinuousAugmentedScore(EmbeddingAugmentedScore):
    """:class:`EmbeddingAugmentedScore` with a :class:`ContinuousLabelEmbedding` (real-valued labels, NaN: none).

    Args:
        net: a score network ``net(x, t, extra_emb=None) -> s``; frozen in place.
        emb_dim: width of the network's time embedding.
        n_labels, hidden, n_fourier, loc, scale: see :class:`ContinuousLabelEmbedding`.
    """

    def __init__(self, net: nn.Module, emb_dim: int, n_labels: int = 1, hidden: int = 64, n_fourier: int = 16,
                 loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0):
        nn.Module.__init__(self)
        self._attach(net, ContinuousLabelEmbedding(emb_dim, n_labels, hidden, n_fourier, loc, scale))
