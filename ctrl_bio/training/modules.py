"""Lightning modules of the training commands: score matching, reward classifiers and CTRL fine-tuning.

Every step draws its randomness from a generator seeded by (seed, global_step, global_rank)
(:func:`step_generator`), never from a stateful generator or a shuffled data loader. The state of a run
is then its parameters, optimiser and scheduler, all of which a Lightning checkpoint holds, so a run
resumed from step k reproduces the uninterrupted one bit for bit. Fixed sample pools are regenerated from
the seed at their phase's first step. The losses are the core's (:mod:`ctrl_bio.objective`); nothing is re-derived here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from ctrl_bio.estimators import Estimator, Objective, Problem
from ctrl_bio.finetune import NonFiniteLossError
from ctrl_bio.model import NULL_LABEL, ConditionalScore
from ctrl_bio.objective import denoising_score_matching_loss, pathwise_loss
from ctrl_bio.pathway_seed import reseed_untrained_pathway
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import Spacing
from ctrl_bio.sde import SDE

#: Independent random streams of one step (training draws, evaluation draws, fixed pools).
TRAIN_STREAM, EVAL_STREAM, POOL_STREAM = 0, 1, 2


def step_generator(seed: int, step: int, rank: int = 0, stream: int = TRAIN_STREAM) -> torch.Generator:
    """A CPU generator seeded by (seed, step, rank, stream) through NumPy's SeedSequence hash."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class _Ticks(IterableDataset):
    """An endless stream of dummy batches: the modules draw their own data from :func:`step_generator`."""

    def __iter__(self):
        while True:
            yield torch.zeros(())


def tick_loader() -> DataLoader:
    return DataLoader(_Ticks(), batch_size=None)


def _last_good(module: L.LightningModule) -> str:
    """Where the run can resume from: the last checkpoint, whose weights :func:`check_finite_weights` checked."""
    last = getattr(module.trainer.checkpoint_callback, "last_model_path", "") if module._trainer else ""
    return f"the last good checkpoint is {last} (finite weights)" if last else "no checkpoint had been written yet"


def check_finite(module: L.LightningModule, loss: Tensor, what: str) -> None:
    """Stop the run on a NaN or infinite loss; the last checkpoint (written before this step) stays as it is."""
    if torch.isfinite(loss):
        return
    raise NonFiniteLossError(f"{what} loss became {loss.detach().item()} at step {module.global_step}: stopped; "
                             f"{_last_good(module)}")


def check_finite_weights(module: L.LightningModule, checkpoint: dict) -> None:
    """Refuse to write a checkpoint whose weights are not finite: it would be a "last good checkpoint" that fails
    at once when resumed. A step can leave inf or NaN weights behind a finite loss; the next loss would be NaN."""
    bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteLossError(f"weights became non-finite ({bad[0]}) after step {module.global_step}: stopped "
                                 f"before writing its checkpoint; {_last_good(module)}")


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int) -> dict:
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(total_steps), 1))
    return {"scheduler": sched, "interval": "step"}


def stretch_schedules(checkpoint: dict, lengths: list[int]) -> None:
    """Give the cosine schedules of a checkpoint the run's (new) phase lengths, in place, before Lightning loads it.

    A resumed run made longer (``steps=`` larger) would otherwise restore the old ``T_max`` and, past its end,
    climb a second cosine cycle. Each learning rate is set on the new curve at the step its schedule stands at,
    eta_min + (base - eta_min) (1 + cos(pi k / T)) / 2 (Loshchilov & Hutter 2017, eq. 5); the scheduler's recursive
    update continues that curve.
    """
    for sched, opt, n in zip(checkpoint.get("lr_schedulers", []), checkpoint.get("optimizer_states", []), lengths):
        total = max(int(n), 1)
        if "T_max" not in sched or sched["T_max"] == total:
            continue
        k, eta_min = sched["last_epoch"], sched.get("eta_min", 0.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total))
        lrs = [eta_min + (base - eta_min) * factor for base in sched["base_lrs"]]
        sched["T_max"], sched["_last_lr"] = total, lrs
        for group, lr in zip(opt["param_groups"], lrs):
            group["lr"] = lr


class ScoreMatchingModule(L.LightningModule):
    """Denoising score matching of a score network on clean data (Vincent 2011; Song et al. 2021, eq. 7).

    The loss is the core's :func:`ctrl_bio.objective.denoising_score_matching_loss` (noise units) on a
    uniform minibatch of the data, with a null label the unconditional network ignores.

    Args:
        net: score network ``(x, t) -> s``.
        sde: its SDE.
        data: clean training samples, (N, ...).
        lr, batch_size: Adam learning rate (cosine-annealed over the run) and minibatch size.
        t_end: smallest training time.
        seed: seeds every step's generator.
    """

    def __init__(self, net: nn.Module, sde: SDE, data: Tensor, *, lr: float = 2e-3, batch_size: int = 512,
                 t_end: float = 1e-3, seed: int = 0):
        super().__init__()
        self.net, self.sde, self.data = net, sde, data
        self.lr, self.batch_size, self.t_end, self.seed = lr, batch_size, t_end, seed

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        g = step_generator(self.seed, self.global_step, self.global_rank)
        idx = torch.randint(self.data.shape[0], (self.batch_size,), generator=g)
        # The data stay where they were loaded (the CPU); each batch follows the network to its device.
        y = torch.full((self.batch_size, 1), NULL_LABEL, dtype=torch.long, device=self.device)
        loss = denoising_score_matching_loss(lambda x, t, _y: self.net(x, t), self.sde,
                                             self.data[idx].to(self.device), y, t_end=self.t_end, generator=g)
        check_finite(self, loss, "score-matching")
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": cosine_schedule(opt, self.trainer.max_steps)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stretch_schedules(checkpoint, [self.trainer.max_steps])


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of a classifier p(y | x) on clean pairs (CTRL Sec. 4.1).

    Calibration (temperature scaling on the held-out split) follows the fit: :func:`ctrl_bio.training.calibrate`.

    Args:
        net: ``x -> logits`` (B, n_classes).
        x, y: the training split, (N, ...) and (N,).
        lr, weight_decay, batch_size: AdamW settings (cosine-annealed) and minibatch size.
        seed: seeds every step's generator.
    """

    def __init__(self, net: nn.Module, x: Tensor, y: Tensor, *, lr: float = 3e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, seed: int = 0):
        super().__init__()
        self.net, self.x, self.y = net, x, y
        self.lr, self.weight_decay, self.batch_size, self.seed = lr, weight_decay, batch_size, seed

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        g = step_generator(self.seed, self.global_step, self.global_rank)
        idx = torch.randint(self.x.shape[0], (min(self.batch_size, self.x.shape[0]),), generator=g)
        loss = F.cross_entropy(self.net(self.x[idx].to(self.device)), self.y[idx].to(self.device))
        check_finite(self, loss, "classifier")
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return {"optimizer": opt, "lr_scheduler": cosine_schedule(opt, self.trainer.max_steps)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_weights(self, checkpoint)


class CTRLModule(L.LightningModule):
    """CTRL fine-tuning of the label pathway (Zhao et al. 2024) under Lightning: the estimators of
    :func:`ctrl_bio.finetune.finetune`, run by the same interface (:class:`ctrl_bio.estimators.Estimator`).

    ``phases`` (from :func:`ctrl_bio.finetune.build_phases`, which ``method.estimator`` selects) run one after the
    other, each with its own Adam and cosine schedule; a phase's ``prepare`` (a pool, a value network) runs at its
    first step with a generator of the seed alone, so every rank and every resumed run prepares the same thing.
    Every ``eval_every`` steps a no-grad estimate of J, the reward and the KL is logged.

    Args:
        model: the augmented model; only its label pathway is trainable.
        sde, reward, label_prior, x_shape: as in :func:`ctrl_bio.finetune.finetune`.
        phases: the estimators, in order.
        alpha, gamma: J's KL and reward weights.
        seed: seeds every step's generator, each phase's preparation and an untrained pathway's random weights
            (:func:`ctrl_bio.pathway_seed.reseed_untrained_pathway`; a resumed run then loads its own).
        Other keyword arguments: as in :func:`ctrl_bio.finetune.finetune`.
    """

    def __init__(self, model: ConditionalScore, sde: SDE, reward: LogLikelihoodReward, label_prior: LabelPrior,
                 x_shape: tuple[int, ...], *, phases: Sequence[Estimator], alpha: float = 1.0, gamma: float = 1.0,
                 n_steps: int = 100, t_end: float = 1e-3, grad_clip: float | None = 1.0, eval_every: int = 100,
                 eval_batch_size: int = 512, seed: int = 0, spacing: Spacing = "uniform"):
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.automatic_optimization = False
        reseed_untrained_pathway(model, seed, tuple(x_shape), label_prior)
        self.model, self.label_prior = model, label_prior
        self.problem = Problem(model, sde, reward, label_prior, tuple(x_shape), Objective(alpha=alpha, gamma=gamma),
                               n_steps=n_steps, t_end=t_end, spacing=spacing)
        self.grad_clip, self.eval_every, self.eval_batch_size, self.seed = grad_clip, eval_every, eval_batch_size, seed
        self.phases = [est for est in phases if est.steps > 0]
        if not self.phases:
            raise ValueError("nothing to train: every phase of the estimator has zero steps")
        self._prepared: set[int] = set()

    @property
    def total_steps(self) -> int:
        return sum(est.steps for est in self.phases)

    def trainable(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: is the label pathway attached?")
        return params

    def phase_at(self, step: int) -> int:
        end = 0
        for i, est in enumerate(self.phases):
            end += est.steps
            if step < end:
                return i
        return len(self.phases) - 1

    def _reward_to(self, device: torch.device) -> None:
        # The reward's classifiers are not submodules (they are not trained or checkpointed): moved by hand.
        for f in getattr(self.problem.reward, "log_prob_fns", ()):
            if isinstance(f, nn.Module):
                f.to(device)

    def on_fit_start(self) -> None:
        self._reward_to(self.device)
        self._prepared = set()  # a resumed run prepares its current phase again, from the same seed

    def on_fit_end(self) -> None:
        self._reward_to(torch.device("cpu"))  # as Lightning does with the module itself

    def configure_optimizers(self):
        params = self.trainable()
        opts, scheds = [], []
        for est in self.phases:
            opt = torch.optim.Adam(params, lr=est.lr)
            opts.append(opt)
            scheds.append(cosine_schedule(opt, est.steps))
        return opts, scheds

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stretch_schedules(checkpoint, [est.steps for est in self.phases])

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        step = self.global_step
        i = self.phase_at(step)
        est = self.phases[i]
        if i not in self._prepared:
            # After Lightning has moved the model: a pool is drawn where the model is. The seed alone fixes it.
            est.prepare(self.problem, step_generator(self.seed, i, 0, POOL_STREAM))
            self._prepared.add(i)
        opts, scheds = self.optimizers(), self.lr_schedulers()
        opt = opts[i] if isinstance(opts, list) else opts
        sched = scheds[i] if isinstance(scheds, list) else scheds
        g = step_generator(self.seed, step, self.global_rank)
        y = self.label_prior.sample(est.batch_size, g).to(self.device)  # drawn on the CPU: the same on any device
        loss = est.loss(self.problem, y, g)
        check_finite(self, loss, est.name)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        self.log_dict({"loss": loss.detach(), "phase": float(i)}, prog_bar=True)
        if self.eval_every and (step + 1) % self.eval_every == 0:
            # Straight to the loggers: self.log would repeat these values on every later row of metrics.csv.
            metrics = self.estimate_objective(step + 1)
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step + 1)

    @torch.no_grad()
    def estimate_objective(self, step: int) -> dict[str, float]:
        """No-grad estimates of the reward, the KL and J on the model's own paths (a fixed stream per step)."""
        p = self.problem
        g = step_generator(self.seed, step, self.global_rank, EVAL_STREAM)
        y = self.label_prior.sample(self.eval_batch_size, g).to(self.device)
        est = pathwise_loss(self.model, p.sde, p.reward, y, p.x_shape, n_steps=p.n_steps, t_end=p.t_end,
                            spacing=p.spacing, alpha=p.objective.alpha, gamma=p.objective.gamma, memory="full",
                            generator=g)
        return {"reward": float(est.reward), "kl": float(est.kl), "objective": float(est.objective)}
