"""Lightning modules of the training commands: score matching, reward classifiers and CTRL fine-tuning.

Every step draws its randomness from a generator seeded by (seed, global_step, global_rank)
(:func:`step_generator`), never from a stateful generator or a shuffled data loader. The state of a run
is then its parameters, optimiser and scheduler, all of which a Lightning checkpoint holds, so a run
resumed from step k reproduces the uninterrupted one bit for bit. Fixed sample pools are regenerated from
the seed in :meth:`setup`. The losses are the core's (:mod:`ctrl_bio.objective`); nothing is re-derived here.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from ctrl_bio.finetune import NonFiniteLossError, sample_pretrained_pool
from ctrl_bio.model import NULL_LABEL, ConditionalScore
from ctrl_bio.objective import (
    MemoryMode,
    WeightedPool,
    denoising_score_matching_loss,
    pathwise_loss,
)
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
    """CTRL fine-tuning of the label pathway (Zhao et al. 2024), the Lightning twin of :func:`ctrl_bio.finetune`.

    Phases as there: ``score_matching`` (reward-weighted score matching on a pool of pre-trained samples),
    ``pathwise`` (backpropagation through the sampler) or ``hybrid`` (the first, then the second); each
    phase has its own Adam and cosine schedule. Every ``eval_every`` steps a no-grad estimate of J, the
    reward and the KL is logged.

    Args:
        model: the augmented model; only its label pathway is trainable.
        sde, reward, label_prior, x_shape: as in :func:`ctrl_bio.finetune.finetune`.
        seed: seeds every step's generator and the pool.
        Other keyword arguments: as in :func:`ctrl_bio.finetune.finetune`.
    """

    def __init__(self, model: ConditionalScore, sde: SDE, reward: LogLikelihoodReward, label_prior: LabelPrior,
                 x_shape: tuple[int, ...], *, estimator: str = "score_matching", alpha: float = 1.0,
                 gamma: float = 1.0, steps: int = 200, batch_size: int = 128, lr: float = 1e-3, n_steps: int = 100,
                 t_end: float = 1e-3, memory: MemoryMode = "checkpoint", grad_last_k: int = 10,
                 grad_clip: float | None = 1.0, sm_steps: int = 2000, sm_batch_size: int = 512, sm_lr: float = 2e-3,
                 pool_size: int = 20000, eval_every: int = 100, eval_batch_size: int = 512, seed: int = 0,
                 spacing: Spacing = "uniform"):
        super().__init__()
        if estimator not in ("pathwise", "score_matching", "hybrid"):
            raise ValueError(f"estimator must be 'pathwise', 'score_matching' or 'hybrid', got {estimator!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.automatic_optimization = False
        self.model, self.sde, self.reward, self.label_prior = model, sde, reward, label_prior
        self.x_shape = tuple(x_shape)
        self.alpha, self.gamma, self.n_steps, self.t_end, self.spacing = alpha, gamma, n_steps, t_end, spacing
        self.memory, self.grad_last_k, self.grad_clip = memory, grad_last_k, grad_clip
        self.batch_size, self.lr, self.sm_batch_size, self.sm_lr = batch_size, lr, sm_batch_size, sm_lr
        self.pool_size, self.eval_every, self.eval_batch_size, self.seed = pool_size, eval_every, eval_batch_size, seed
        self.phases = [] if estimator == "pathwise" else [("score_matching", int(sm_steps))]
        if estimator != "score_matching":
            self.phases.append(("pathwise", int(steps)))
        self.phases = [(name, n) for name, n in self.phases if n > 0]
        if not self.phases:
            raise ValueError("nothing to train: every phase of the estimator has zero steps")
        self.pool: WeightedPool | None = None

    @property
    def total_steps(self) -> int:
        return sum(n for _, n in self.phases)

    def trainable(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: is the label pathway attached?")
        return params

    def phase_at(self, step: int) -> int:
        end = 0
        for i, (_, n) in enumerate(self.phases):
            end += n
            if step < end:
                return i
        return len(self.phases) - 1

    def _reward_to(self, device: torch.device) -> None:
        # The reward's classifiers are not submodules (they are not trained or checkpointed): moved by hand.
        for f in self.reward.log_prob_fns:
            if isinstance(f, nn.Module):
                f.to(device)

    def on_fit_start(self) -> None:
        """Reward and pool on the module's device; the pool is built here, after Lightning has moved the model."""
        self._reward_to(self.device)
        if self.pool is None and self.phases[0][0] == "score_matching":
            # The same pool on every rank and after every resume: it depends on the seed only (the pathway is
            # switched off by the null label, so the pool is the pre-trained model's whatever the parameters).
            # It is kept on the CPU, where its draws use the step's CPU generator; each draw moves to the device.
            with torch.no_grad():
                x0 = sample_pretrained_pool(self.model, self.sde, self.x_shape, self.pool_size, n_steps=self.n_steps,
                                            t_end=self.t_end, spacing=self.spacing,
                                            generator=step_generator(self.seed, 0, 0, POOL_STREAM))
                self.pool = WeightedPool(x0.cpu(), [f(x0).cpu() for f in self.reward.log_prob_fns],
                                         tilt=self.gamma / self.alpha)

    def on_fit_end(self) -> None:
        self._reward_to(torch.device("cpu"))  # as Lightning does with the module itself

    def configure_optimizers(self):
        params = self.trainable()
        opts, scheds = [], []
        for name, n in self.phases:
            opt = torch.optim.Adam(params, lr=self.sm_lr if name == "score_matching" else self.lr)
            opts.append(opt)
            scheds.append(cosine_schedule(opt, n))
        return opts, scheds

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stretch_schedules(checkpoint, [n for _, n in self.phases])

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        step = self.global_step
        i = self.phase_at(step)
        phase = self.phases[i][0]
        opts, scheds = self.optimizers(), self.lr_schedulers()
        opt = opts[i] if isinstance(opts, list) else opts
        sched = scheds[i] if isinstance(scheds, list) else scheds
        g = step_generator(self.seed, step, self.global_rank)
        if phase == "score_matching":
            # weighted_score_matching_loss's denoising target, with the pool draw (CPU) moved to the device.
            y = self.label_prior.sample(self.sm_batch_size, g)
            x0 = self.pool.draw(y, g).to(self.device)
            loss = denoising_score_matching_loss(self.model, self.sde, x0, y.to(self.device), t_end=self.t_end,
                                                 generator=g)
        else:
            y = self.label_prior.sample(self.batch_size, g).to(self.device)
            loss = pathwise_loss(self.model, self.sde, self.reward, y, self.x_shape, n_steps=self.n_steps,
                                 t_end=self.t_end, spacing=self.spacing, alpha=self.alpha, gamma=self.gamma,
                                 memory=self.memory,
                                 grad_last_k=self.grad_last_k, generator=g).loss
        check_finite(self, loss, phase)
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
        g = step_generator(self.seed, step, self.global_rank, EVAL_STREAM)
        y = self.label_prior.sample(self.eval_batch_size, g).to(self.device)
        est = pathwise_loss(self.model, self.sde, self.reward, y, self.x_shape, n_steps=self.n_steps,
                            t_end=self.t_end, spacing=self.spacing, alpha=self.alpha, gamma=self.gamma, memory="full",
                            generator=g)
        return {"reward": float(est.reward), "kl": float(est.kl), "objective": float(est.objective)}
