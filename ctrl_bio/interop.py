"""Any network and any diffusers model as the core's score model ``(x, t, **cond) -> s``.

The core samples, fine-tunes and measures the KL of a score s(x, t) on DESIGN.md's VP-SDE. A network that predicts
something else is converted with the SDE's alpha_t and sigma_t at the query time (x_t = alpha_t x_0 + sigma_t eps):

- ``eps`` (noise; diffusers' ``epsilon``): s = -eps / sigma_t (Ho et al. 2020, eq. 12; Song et al. 2021, eq. 2);
- ``v`` (diffusers' ``v_prediction``, Salimans & Ho 2022, "Progressive Distillation", Sec. 4):
  v = alpha_t eps - sigma_t x_0, so eps = alpha_t v + sigma_t x_t;
- ``x0`` (the clean sample; diffusers' ``sample``): eps = (x_t - alpha_t x0) / sigma_t, so
  s = -(x_t - alpha_t x0) / sigma_t^2 (Tweedie's formula read backwards);
- ``score``: unchanged.

:func:`wrap_network` wraps any ``nn.Module`` of any data shape; :func:`from_diffusers` wraps a diffusers
``UNet2DModel`` or ``UNet2DConditionModel`` with its scheduler in one call, the SDE built from the scheduler's
``alphas_cumprod`` (:class:`ctrl_bio.sde.DiscreteScheduleSDE`), so every beta schedule diffusers ships works. This
module never imports diffusers: schedulers and UNets are read by their attributes (``alphas_cumprod``,
``config.prediction_type``, ``config.beta_schedule``; a UNet's output ``.sample``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_bio.sde import SDE, DiscreteScheduleSDE, DiscreteVPSDE
from ctrl_bio.utils import append_dims

#: What a network may predict, with diffusers' names for the same things.
PREDICTIONS = ("eps", "v", "x0", "score")
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: What a network may be given as its time input.
TIME_INPUTS = ("t", "timestep")


def canonical_prediction(predicts: str) -> str:
    """``eps``, ``v``, ``x0`` or ``score`` for any of those or diffusers' ``epsilon``, ``v_prediction``, ``sample``."""
    name = _ALIASES.get(predicts, predicts)
    if name not in PREDICTIONS:
        raise ValueError(f"predicts must be one of {PREDICTIONS} (or diffusers' {tuple(_ALIASES)}), got {predicts!r}")
    return name


def eps_from_prediction(output: Tensor, x_t: Tensor, t: Tensor, sde: SDE, predicts: str) -> Tensor:
    """The noise eps that a network's ``output`` at (x_t, t) stands for; ``predicts`` as in :data:`PREDICTIONS`.

    Args:
        output: the network's prediction, shape of ``x_t`` (B, ...).
        x_t: the noisy input, (B, ...).
        t: times in [0, 1], (B,).
        sde: the SDE the network was trained with.
        predicts: what ``output`` is.
    """
    kind = canonical_prediction(predicts)
    if kind == "eps":
        return output
    alpha, sigma = append_dims(sde.alpha(t), x_t.ndim), append_dims(sde.sigma(t), x_t.ndim)
    if kind == "v":
        return alpha * output + sigma * x_t
    if kind == "x0":
        return (x_t - alpha * output) / sigma
    return -sigma * output


def score_from_prediction(output: Tensor, x_t: Tensor, t: Tensor, sde: SDE, predicts: str) -> Tensor:
    """The score s(x_t, t) that a network's ``output`` stands for (see the module docstring for each kind)."""
    if canonical_prediction(predicts) == "score":
        return output
    return sde.score_from_eps(eps_from_prediction(output, x_t, t, sde, predicts), t)


def _tensor_output(out: Any) -> Tensor:
    """A network's output as a tensor: diffusers' output dataclasses carry it as ``.sample``, tuples first."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the network returned {type(out).__name__}; expected a tensor, a tuple starting with one, or an "
                    "object with a .sample tensor")


class NetworkScore(nn.Module):
    """A network ``net(x_t, time, **cond)`` predicting eps, v, x0 or the score, as a score model ``(x, t) -> s``.

    Built by :func:`wrap_network`. The sampler, :class:`ctrl_bio.model.AugmentedScore` and the estimators call it as
    ``score(x, t)`` with x of any shape (B, ...) and t in [0, 1] of shape (B,) or a scalar tensor; keyword arguments
    (a class label, text embeddings) are passed on to ``net``.

    Args:
        net: the network; its output must have the shape of x.
        sde: the SDE the network was trained with (gives alpha_t, sigma_t and, for ``time="timestep"``, the
            scheduler's timestep index).
        predicts: ``eps``, ``v``, ``x0`` or ``score`` (diffusers' ``epsilon``, ``v_prediction``, ``sample`` too).
        time: what ``net`` is given as its time input: ``t`` (t in [0, 1]), ``timestep`` (a discrete schedule's
            index t N - 1, as diffusers UNets take it; needs a :class:`ctrl_bio.sde.DiscreteScheduleSDE`) or a
            callable t -> input (for another convention, e.g. ``lambda t: 999 * t``).
    """

    def __init__(self, net: nn.Module, sde: SDE, predicts: str = "eps",
                 time: str | Callable[[Tensor], Tensor] = "t"):
        super().__init__()
        if not callable(time) and time not in TIME_INPUTS:
            raise ValueError(f"time must be one of {TIME_INPUTS} or a callable, got {time!r}")
        if time == "timestep" and not isinstance(sde, DiscreteScheduleSDE):
            raise ValueError(f"time='timestep' needs a DiscreteScheduleSDE, got {type(sde).__name__}")
        self.net, self.sde, self.predicts, self.time = net, sde, canonical_prediction(predicts), time

    def time_input(self, t: Tensor) -> Tensor:
        """What the network receives as its time argument for times t, (B,)."""
        if callable(self.time):
            return self.time(t)
        return self.sde.timestep(t) if self.time == "timestep" else t

    def prediction(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The network's raw prediction at (x_t, t), shape of x."""
        out = _tensor_output(self.net(x, self.time_input(t), **cond))
        if out.shape != x.shape:
            raise ValueError(f"the network's output has shape {tuple(out.shape)}, the input {tuple(x.shape)}: a "
                             f"{self.predicts} prediction must have the input's shape")
        return out

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Score s(x_t, t), shape of x; t of shape (B,) or a scalar tensor."""
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        return score_from_prediction(self.prediction(x, t_vec, **cond), x, t_vec, self.sde, self.predicts)


def wrap_network(net: nn.Module, *, predicts: str = "eps", sde: SDE,
                 time: str | Callable[[Tensor], Tensor] = "t") -> NetworkScore:
    """Your own network as the core's score model, for any data shape (vectors, sequences, images, graphs).

    The result is what :func:`ctrl_bio.sampling.euler_maruyama` samples and what
    :class:`ctrl_bio.model.AugmentedScore` freezes and augments with a label pathway for CTRL.

    Args:
        net: an ``nn.Module`` called as ``net(x_t, time, **cond)``, returning a tensor of x's shape (or a tuple
            starting with one, or an object with ``.sample`` such as diffusers' outputs).
        predicts: ``eps`` (the noise), ``score``, ``x0`` (the clean sample) or ``v`` (v-prediction); diffusers' names
            ``epsilon``, ``sample``, ``v_prediction`` are accepted too.
        sde: the SDE the network was trained with, e.g. :class:`ctrl_bio.sde.VPSDE` or a scheduler's schedule
            (:func:`sde_from_scheduler`).
        time: the network's time input: ``t`` (t in [0, 1]), ``timestep`` (t N - 1 of a discrete schedule) or a
            callable t -> input.

    Example:
        >>> score = wrap_network(eps_net, predicts="eps", sde=VPSDE())  # doctest: +SKIP
        >>> x0 = euler_maruyama(score.sde, score, x_init, time_grid(100)).x  # doctest: +SKIP
    """
    return NetworkScore(net, sde, predicts, time)


def _config(obj: Any) -> Mapping[str, Any]:
    cfg = getattr(obj, "config", None)
    if cfg is None:
        return {}
    return cfg if isinstance(cfg, Mapping) else vars(cfg)


def sde_from_scheduler(scheduler: Any) -> DiscreteScheduleSDE:
    """The SDE of a diffusers scheduler's training schedule, alpha_{(n+1)/N}^2 = ``scheduler.alphas_cumprod[n]``.

    A named schedule the core can rebuild from its settings (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` with
    no trained betas and no zero-SNR rescaling) gives a :class:`ctrl_bio.sde.DiscreteVPSDE`, whose four settings are
    what a saved network records, after checking that its abar_n equal the scheduler's (float32 round-off); anything
    else (trained betas, ``sigmoid``, ``laplace``, zero terminal SNR) gives a :class:`ctrl_bio.sde.DiscreteScheduleSDE`
    of the scheduler's ``alphas_cumprod`` itself. Only the training schedule matters: the sampler's timestep spacing
    does not, since the core samples the SDE on its own grid.
    """
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: not a DDPM-family scheduler")
    abar = torch.as_tensor(abar, dtype=torch.float64)
    cfg = _config(scheduler)
    schedule = cfg.get("beta_schedule", None)
    if (schedule in DiscreteVPSDE.SCHEDULES and cfg.get("trained_betas", None) is None
            and not cfg.get("rescale_betas_zero_snr", False)):
        named = DiscreteVPSDE(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), int(abar.numel()), schedule)
        if torch.allclose(named.alphas_cumprod, abar, rtol=1e-5, atol=1e-7):
            return named
    return DiscreteScheduleSDE(abar)


class DiffusersScore(NetworkScore):
    """A diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``) as a score model; built by :func:`from_diffusers`.

    ``score(x, t, class_labels=None, **cond)`` calls ``unet(x, t N - 1, ...)`` on the scheduler's timesteps. Fixed
    conditioning given at construction (a prompt's ``encoder_hidden_states`` of shape (1, L, D)) is broadcast over the
    batch and kept as buffers (they follow ``.to(device)``); per-call keyword arguments override it. The UNet is
    reachable as ``.unet``, where CTRL's UNet pathway (``domains.images.unet.UNetAugmentedScore``) puts its label
    embedding. A UNet with a learned variance (``out_channels`` = 2 x ``in_channels``) contributes its first half.

    Args:
        unet: the UNet.
        sde: its schedule (:func:`sde_from_scheduler`).
        predicts: its prediction type.
        **fixed: keyword arguments passed to every UNet call (tensors with a leading batch dimension of 1 are
            expanded to the batch).
    """

    def __init__(self, unet: nn.Module, sde: DiscreteScheduleSDE, predicts: str = "eps", **fixed: Any):
        super().__init__(unet, sde, predicts, time="timestep")
        self._fixed_tensors, self._fixed_other = [], {}
        for key, value in fixed.items():
            if isinstance(value, Tensor):
                self.register_buffer(f"fixed_{key}", value.detach(), persistent=False)
                self._fixed_tensors.append(key)
            else:
                self._fixed_other[key] = value
        cfg = _config(unet)
        self.learned_variance = (cfg.get("out_channels") is not None and cfg.get("in_channels") is not None
                                 and int(cfg["out_channels"]) == 2 * int(cfg["in_channels"]))

    @property
    def unet(self) -> nn.Module:
        return self.net

    def prediction(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        kwargs = dict(self._fixed_other)
        for key in self._fixed_tensors:
            value = getattr(self, f"fixed_{key}")
            kwargs[key] = value.expand(x.shape[0], *value.shape[1:]) if value.shape[0] == 1 else value
        kwargs.update(cond)
        dtype = getattr(self.net, "dtype", x.dtype)
        kwargs = {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        out = _tensor_output(self.net(x.to(dtype), self.time_input(t), **kwargs)).to(x.dtype)
        if self.learned_variance and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"the UNet's output has shape {tuple(out.shape)}, the input {tuple(x.shape)}")
        return out


def from_diffusers(unet: nn.Module, scheduler: Any, *, prediction_type: str | None = None,
                   **fixed: Any) -> tuple[DiffusersScore, DiscreteScheduleSDE]:
    """A diffusers UNet and its scheduler as the core's ``(score_model, sde)``, in one call.

    Works for ``UNet2DModel`` (pixel space) and ``UNet2DConditionModel`` (latent, text-conditional: pass
    ``encoder_hidden_states`` here for a fixed prompt, or to each call) with any beta schedule and any prediction
    type (``epsilon``, ``v_prediction``, ``sample``) the scheduler's config names.

    Args:
        unet: the UNet.
        scheduler: its scheduler (anything with ``alphas_cumprod`` and ``config.prediction_type``).
        prediction_type: overrides the scheduler's ``config.prediction_type``.
        **fixed: keyword arguments for every UNet call, e.g. ``encoder_hidden_states`` (1, L, D).

    Returns:
        The score model ``(x, t, **cond) -> s`` and the SDE, ready for :func:`ctrl_bio.sampling.euler_maruyama` and
        CTRL's augmented models.
    """
    sde = sde_from_scheduler(scheduler)
    predicts = prediction_type or _config(scheduler).get("prediction_type", "epsilon")
    return DiffusersScore(unet, sde, predicts, **fixed), sde
