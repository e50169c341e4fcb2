"""The augmented score model of CTRL: a frozen pre-trained score plus a zero-initialised label pathway.

CTRL (Zhao et al. 2024, Sec. 4.2) adds trainable parameters for the new label y to the pre-trained
model and fine-tunes only those. The pathway's output is exactly zero at initialisation, so step 0 of
fine-tuning reproduces the pre-trained sampler bit for bit, and a "null" label (-1) switches it off.

Two pathways:
- :class:`VectorPathway` for vector data: s = s_pre(x, t) + u(x_t, t, y), with u a small MLP whose
  last layer is zero; u is what the KL is made of.
- :class:`LabelEmbedding` for networks with a time embedding: a row per class plus a null row that
  stays zero, added to the time embedding of the frozen network (:class:`EmbeddingAugmentedScore`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims

NULL_LABEL = -1


class ConditionalScore(Protocol):
    """What estimators and samplers need of an augmented model (both classes below satisfy it)."""

    n_classes: tuple[int, ...]

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]: ...

    def parameters(self): ...


def fourier_features(t: Tensor, n_features: int) -> Tensor:
    """Sine/cosine features of t in [0, 1] at geometric frequencies, (B,) -> (B, n_features)."""
    half = n_features // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(200.0), half, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def one_hot_labels(y: Tensor, n_classes: Sequence[int]) -> Tensor:
    """Concatenated one-hot codes of K labels, (B, K) -> (B, sum n_classes); a null label (-1) is all zero."""
    codes = []
    for k, n in enumerate(n_classes):
        yk = y[:, k]
        code = torch.zeros(y.shape[0], n, device=y.device)
        valid = yk != NULL_LABEL
        code[valid, yk[valid]] = 1.0
        codes.append(code)
    return torch.cat(codes, dim=1)


def check_labels(y: Tensor, n_classes: Sequence[int]) -> None:
    """Raise a clear error for a label tensor of the wrong shape or with a value outside its classes."""
    if y.ndim != 2 or y.shape[1] != len(n_classes):
        raise ValueError(f"labels must have shape (batch_size, {len(n_classes)}), got {tuple(y.shape)}")
    for k, n in enumerate(n_classes):
        bad = (y[:, k] < NULL_LABEL) | (y[:, k] >= n)
        if bad.any():
            raise ValueError(f"label {k} takes values in 0..{n - 1} (or -1 for none), got {int(y[bad, k][0])}")


class VectorPathway(nn.Module):
    """Label pathway u(x_t, t, y) for vector data, an MLP with a zero last layer.

    The inputs are x_t, the pre-trained noise prediction eps_pre = -sigma_t s_pre and the denoised
    x0_hat = (x_t + sigma_t^2 s_pre) / alpha_t (both free, the pre-trained score is computed anyway),
    Fourier features of t and the one-hot labels. The network predicts in noise units and
    u = -net / sigma_t: the h-transform drift grows like 1 / sigma_t where classes separate, and this
    scaling keeps the network's own outputs of order one (as in eps-parameterised diffusion models).

    Args:
        dim: data dimension d.
        n_classes: number of classes of each label, e.g. (4,) or (3, 2, 2).
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        n_fourier: number of Fourier features of t.
    """

    def __init__(self, dim: int, n_classes: Sequence[int], hidden: int = 128, depth: int = 3, n_fourier: int = 16):
        super().__init__()
        self.dim, self.n_classes, self.n_fourier = dim, tuple(int(n) for n in n_classes), n_fourier
        layers: list[nn.Module] = []
        width = 3 * dim + n_fourier + sum(self.n_classes)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, s_pre: Tensor, sde: SDE) -> Tensor:
        alpha, sigma = append_dims(sde.alpha(t), x.ndim), append_dims(sde.sigma(t), x.ndim)
        eps_pre = -sigma * s_pre
        x0_hat = (x - sigma * eps_pre) / alpha
        h = torch.cat([x, eps_pre, x0_hat, fourier_features(t, self.n_fourier), one_hot_labels(y, self.n_classes)], 1)
        eps_u = self.out(self.body(h))
        active = (y != NULL_LABEL).any(dim=1, keepdim=True).to(x.dtype)  # a null request gets no control
        return -active * eps_u / sigma


class AugmentedScore(nn.Module):
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
        self.n_classes = pathway.n_classes

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(s_theta, u) where u = s_theta - s_pre; the pair the sampler records the KL from."""
        s_pre = self.pretrained(x, t)
        u = self.pathway(x, t, y, s_pre, self.sde)
        return s_pre + u, u

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.score_and_control(x, t, y)[0]

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """A sampler callable ``(x, t) -> (s_theta, u)`` for fixed labels y of shape (B, K)."""
        check_labels(y, self.n_classes)
        return lambda x, t: self.score_and_control(x, t, y)


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


class EmbeddingAugmentedScore(nn.Module):
    """A frozen network ``net(x, t, extra_emb)`` whose time embedding receives a :class:`LabelEmbedding`.

    The control u = s_theta - s_pre needs the network a second time with the null embedding; both go
    through the same graph so that the KL's pathwise gradient is exact.

    Args:
        net: a score network with signature ``net(x, t, extra_emb=None) -> s``; frozen in place. If it also
            has ``forward_pair(x, t, extra_emb) -> (s, s_pre)`` that is used (one shared trunk).
        n_classes: classes per label.
        emb_dim: width of the network's time embedding.
    """

    def __init__(self, net: nn.Module, n_classes: Sequence[int], emb_dim: int):
        super().__init__()
        net.requires_grad_(False)
        self.net = net
        self.embedding = LabelEmbedding(n_classes, emb_dim)
        self.n_classes = self.embedding.n_classes

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embedding(y)
        if hasattr(self.net, "forward_pair"):  # a network that shares the layers before the label between both
            s, s_pre = self.net.forward_pair(x, t, emb)
        else:
            s, s_pre = self.net(x, t, emb), self.net(x, t)
        return s, s - s_pre

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x, t, self.embedding(y))

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        check_labels(y, self.n_classes)
        return lambda x, t: self.score_and_control(x, t, y)
