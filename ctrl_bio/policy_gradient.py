"""Policy-gradient CTRL for rewards without gradients: the score as the action (``ctrl_pg``), and DDPO.

Zhao, Chen et al. 2025 ("Score as Action: Fine-Tuning Diffusion Generative Models by Continuous-time
Reinforcement Learning") treat the score s_theta(x, t, y) as the action of a continuous-time policy; DDPO
(Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", eq. 4) treats every sampler
step as a Gaussian policy and clips per-step PPO ratios. Both maximise the CTRL objective of DESIGN.md,

    J(theta) = E_y E_{P_theta} [ r(x_0, y) - alpha int_0^1 beta(t)/2 ||u||^2 dt ],   u = s_theta - s_pre,

from reward *values* only (an external program, a non-differentiable property).

Derivation (why ``ctrl_pg`` does not depend on the step count). One reverse Euler-Maruyama step from
x_k at time t_k is the Gaussian policy N(mean_theta(x_k), std_k^2 I) with std_k^2 = beta_k h and
mean_theta = mean_pre + h beta_k u_theta(x_k). Against a snapshot theta_old that generated the path with
noise z_k = (x_{k+1} - mean_old) / std_k, the per-step log-ratio is exactly

    rho_k = log N(x_{k+1}; mean_theta) - log N(x_{k+1}; mean_old)
          = sqrt(beta_k h) z_k . du_k - h beta_k ||du_k||^2 / 2,       du_k = u_theta - u_old,

a Riemann-Ito sum of the Girsanov density int sqrt(beta) du . dW - 1/2 int beta ||du||^2 dt. Hence
(i) grad_theta rho_k at theta = theta_old is sqrt(beta_k) grad u . (sqrt(h) z_k): the likelihood-ratio terms
sum to the Ito integral int sqrt(beta) grad_theta s_theta . dW, whose variance is int beta ||grad u||^2 dt,
finite and independent of h; (ii) every single rho_k is O(sqrt(h)), so a per-step ratio clipped at 1 +- eps
(DDPO) stops clipping anything as the grid is refined, while the *cumulative* ratio
w_{<=k} = exp(sum_{i<=k} rho_i), the density of the path measure on [t_{k+1}, 1], has a continuous-time
limit. ``ctrl_pg`` clips w_{<=k}; ``ddpo`` clips exp(rho_k). The surrogate of ``ctrl_pg``,

    L = sum_k min(w_{<=k} A_k, clip(w_{<=k}, 1 - eps, 1 + eps) A_k) - alpha sum_k h beta_k ||u_theta(x_k)||^2 / 2,

with w_{<=k} = stopgrad(w_{<k}) exp(rho_k), has gradient sum_k w_{<=k} A_k grad rho_k - alpha grad KL where
nothing is clipped: the per-decision importance-sampled policy gradient (Precup et al. 2000), equal to the
plain one at theta = theta_old. The KL is the Girsanov running cost in closed form per step (the transition
KL of two Gaussians with equal covariance), differentiated at the recorded states, not sampled. The
advantage is A_k = r - alpha sum_{i>k} c_i - V(x_k, t_k, y): the reward-to-go (only later KL terms depend
on the action at step k) minus a value baseline. The ``x0_hat`` baseline is a small network of the model's
own denoised prediction x0_hat(x_t) = (x_t + sigma_t^2 s_theta) / alpha_t, of t and of y: the reward of a
path is a function of its end point, and x0_hat is the best guess of it, so V is close to a function of
x0_hat alone and is learnt from few paths (``learned``: the same network on x_t; ``none``: no baseline).

Why a second, off-policy term (behaviour process). On-policy training through the sampler drops modes on
the mixture testbed (TESTBED-NOTES.md; benchmarks/gmm/ablation.md): J's gradient is that of the reverse,
mode-seeking KL(P_theta || P*), a component the model stops visiting gets no gradient back, and importance
sampling from another behaviour process changes the variance of that gradient, not its mean. What keeps
modes is a mass-covering divergence measured on paths that cover them. The optimum of J is the soft-optimal
path measure dP*/dP_pre = exp(r / alpha) / Z(y), so on paths of the *pre-trained* process (which visit every
mode) the weights w = exp(r / alpha) / Z(y) need reward values only, and

    -grad KL(P* || P_theta) = E_pre[ w grad log dP_theta/dP_pre ]
                           = E_pre[ w sum_k (sqrt(beta_k h) z_k - h beta_k u_theta) . grad u_theta(x_k) ],

again an Ito integral of per-step Gaussian log-probabilities (reward-weighted regression, Peters & Schaal
2007, on path space). Its noise term may use w - b(x_k) with a baseline b(x_k) ~ E_pre[w | x_k]
(the ``x0_hat``/``learned`` value network again), unbiased because z_k has mean zero given x_k. ``ctrl_pg``
draws a pool of pre-trained paths once (one reward query each), warm-starts the pathway on this term alone
(``reference_updates``), then runs the clipped policy gradient on J with this term added as a regulariser
(``reference_weight``): both terms have the same optimum, P*. Restarting on-policy paths from pre-trained
states at a random switch step (``restart_fraction``; Kakade & Langford 2002) is available too but did not
keep the modes on its own (docs/policy_gradient.md). Training grids are jittered (interior points uniform in
their cells) so that the control is learnt at every t and the model can be sampled with any step count.

The same term as a regression (``reference_estimator="score_matching"``). KL(P* || P_theta) is, up to a
constant, the likelihood-weighted score-matching loss of P*'s marginals (Song et al. 2021, "Maximum Likelihood
Training of Score-Based Diffusion Models"), and the x_0-marginal of P* is the weighted end points of the pool. So
the term can also be estimated by denoising score matching (Vincent 2011) on pool end points drawn in proportion
to w, at fresh noise levels: a regression whose target eps / sigma_t has variance 1 / sigma_t^2, where the path
form's per-step target z_k / sqrt(beta_k h) has 1 / (beta_k h). It uses the library's sigma_t^2 weighting (noise
units) rather than the likelihood weighting beta_t / 2 that equals the KL: the minimiser, P*'s score at every t, is
the same; the weighting only moves where residual errors count, and ``reference_weight`` sets its scale. The term
needs end points and weights only, so with ``reference_replay`` every scored training path joins the pool as well,
weighted by
dP*/dP_theta_old = exp(r / alpha - log dP_theta_old/dP_pre) (:meth:`PathBatch.log_density_ratio`, exact for the
recorded chain; self-normalised within each label combination). These weights tend to one as the policy nears P*,
so each reward query the policy gradient spends also sharpens the regression (benchmarks/gmm/README.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ctrl_bio.finetune import save_pathway_checkpoint
from ctrl_bio.model import ConditionalScore
from ctrl_bio.objective import Objective, denoising_score_matching_loss
from ctrl_bio.pathway_seed import reseed_untrained_pathway
from ctrl_bio.policy_losses import (
    Baseline,
    ReferenceEstimator,
    SurrogateLoss,
    ValueNetwork,
    Variant,
    evaluate_value,
    reference_loss,
    rewards_to_go,
    soft_optimal_weights,
    surrogate_loss,
    value_at,
    value_features,
)
from ctrl_bio.policy_paths import (
    PathBatch,
    collect_paths,
    draw_reference_pool,
    jittered_grid,
    step_log_ratio,
    transition_log_prob,
)
from ctrl_bio.progress import progress_bar
from ctrl_bio.reward import LabelPrior, Reward
from ctrl_bio.sampling import Spacing
from ctrl_bio.sde import SDE

__all__ = ["Baseline", "PathBatch", "PolicyGradientResult", "ReferenceEstimator", "SurrogateLoss", "ValueNetwork",
           "Variant", "apply_update", "collect_paths", "draw_reference_pool", "evaluate_value",
           "finetune_policy_gradient", "jittered_grid", "reference_loss", "rewards_to_go", "soft_optimal_weights",
           "step_log_ratio", "surrogate_loss", "transition_log_prob", "value_at", "value_features"]


@dataclass
class PolicyGradientResult:
    """Training record of :func:`finetune_policy_gradient`.

    Attributes:
        history: one dict per batch of paths: ``step`` (updates so far), ``reward_queries`` (reward
            evaluations so far, one per sample), ``reward``, ``kl`` and ``objective`` (J) of the on-policy
            paths of the batch, ``dropped`` (paths of the batch with a NaN reward), ``clip_fraction``, and with a
            reference pool ``reference_ess`` (Kish's effective size of the pool's weights, which replay grows).
        seconds: wall-clock time of the whole call.
        failed_rewards: reward evaluations that came back NaN over the whole run.
    """

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    failed_rewards: int = 0


def _save(model: nn.Module, value: nn.Module | None, path: Path) -> None:
    tensors = {f"model.{k}": v for k, v in model.named_parameters() if v.requires_grad}
    if value is not None:
        tensors |= {f"value.{k}": v for k, v in value.named_parameters()}
    save_pathway_checkpoint(tensors, path)


def apply_update(loss: Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                 params: list[Tensor], grad_clip: float | None) -> None:
    """One optimiser and schedule step on ``loss``, its gradient norm clipped to ``grad_clip`` if given."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def finetune_policy_gradient(model: ConditionalScore, sde: SDE, reward: Reward, label_prior: LabelPrior,
                             x_shape: tuple[int, ...], *, variant: Variant = "ctrl_pg",
                             baseline: Baseline = "x0_hat", alpha: float = 1.0, n_steps: int = 50,
                             t_end: float = 1e-3, spacing: Spacing = "uniform", iterations: int = 200,
                             batch_size: int = 128,
                             updates_per_batch: int = 4, clip: float = 0.2, lr: float = 3e-4,
                             value_lr: float = 3e-3, restart_fraction: float | None = None,
                             reference_pool: int | None = None, reference_batch: int = 8192,
                             reference_weight: float = 4.0, reference_updates: int | None = None,
                             reference_lr: float = 2e-3, reference_estimator: ReferenceEstimator = "score_matching",
                             reference_replay: bool | None = None,
                             grad_clip: float | None = 1.0, seed: int = 0, progress: bool = True,
                             checkpoint_path: str | Path | None = None,
                             project: Callable[[Tensor], Tensor] | None = None) -> PolicyGradientResult:
    """Fine-tune the label pathway by a clipped policy gradient on J from reward values only.

    Args:
        model: augmented model whose ``conditioned(y)`` returns (s_theta, u); trained in place.
        sde: the SDE of the pre-trained model.
        reward: black box ``(x0, y) -> (B,)``; NaN marks a failed sample, which is counted and left out of
            the update (never read as zero).
        label_prior: p(y) that training labels are drawn from.
        x_shape: shape of one sample.
        variant: ``ctrl_pg`` (path-level clipping plus the soft-optimal term on pre-trained paths) or ``ddpo``
            (per-step clipping, on-policy only).
        baseline: ``x0_hat`` (value network of the denoised prediction), ``learned`` (of x_t) or ``none``.
        alpha: KL weight.
        spacing: the sampler grids' spacing (:func:`jittered_grid`); ``quadratic`` for images, as their suite samples.
        iterations: batches of paths; each batch costs ``batch_size`` reward queries and serves
            ``updates_per_batch`` updates.
        clip: eps of the clipped ratio.
        restart_fraction: fraction of paths that follow the pre-trained model up to a uniformly random
            switch step (a restart distribution, module docstring); default 0.
        reference_pool: pre-trained paths drawn (and scored, one query each) once at the start for the
            soft-optimal cross-entropy term (module docstring); default 4096 for ``ctrl_pg``, 0 for ``ddpo``.
        reference_batch: pool draws per update (end points for ``score_matching``, (step, path) pairs for ``path``);
        reference_weight: weight of that term against the policy-gradient surrogate, in units of alpha. The path
            form is in nats; the score-matching loss is in noise units summed over dimensions, so there the weight is
            a trade-off knob (4 measured best of 1 / 4 / 16 on the mixture, docs/policy_gradient.md).
        reference_updates: updates on the soft-optimal term alone before the policy gradient (a warm start,
            at ``reference_lr``; no reward query beyond the pool); default 1000 for ``ctrl_pg``, 0 for ``ddpo``.
        reference_estimator: how the soft-optimal term is estimated on the pool. ``path``: the cross-entropy of
            the path measures (:func:`reference_loss`, an Ito integral over the pool's paths). ``score_matching``:
            denoising score matching on the pool's end points drawn with probability proportional to their weights
            (:func:`ctrl_bio.objective.denoising_score_matching_loss`). Both have the optimum P*; the second
            regresses on fresh forward-noised states instead of the recorded path increments, whose per-step
            target sqrt(beta h) z / (beta h) has variance 1 / (beta h).
        reference_replay: (default: on with ``score_matching``, which it needs) every scored training path also
            joins the pool, weighted by dP*/dP_theta_old = exp(r / alpha - log dP_theta_old/dP_pre)
            (:func:`soft_optimal_weights`), so that each reward query informs the low-variance regression too, not
            only the policy gradient. Near the optimum these weights are nearly uniform (dP*/dP_theta -> 1).
        checkpoint_path: trainable parameters (and the value network) are saved there after every batch.
        project: the domain's map of a sampler end point onto the data's support (``DNADomain.project``,
            ``MoleculeDomain.project``: the argmax one-hot), applied to every end point the score-matching term
            regresses on. For discrete data the sampler's continuous end points lie off the lattice the network was
            trained on, and regressing onto them costs a large control near t = 0 (the ``pool=pretrained`` finding of
            :func:`ctrl_bio.optimum.ctrl_pool`). The reward is unchanged by it when the reward decodes the same way.
        seed: seeds every draw of the run, and an untrained pathway's random weights
            (:func:`ctrl_bio.pathway_seed.reseed_untrained_pathway`).
    """
    if variant not in ("ctrl_pg", "ddpo"):
        raise ValueError(f"variant must be 'ctrl_pg' or 'ddpo', got {variant!r}")
    if reference_estimator not in ("path", "score_matching"):
        raise ValueError(f"reference_estimator must be 'path' or 'score_matching', got {reference_estimator!r}")
    if reference_replay is None:
        reference_replay = reference_estimator == "score_matching"
    if reference_replay and reference_estimator != "score_matching":
        raise ValueError("reference_replay needs reference_estimator='score_matching' (replayed paths are scored "
                         "by their end points only)")
    if baseline not in ("x0_hat", "learned", "none"):
        raise ValueError(f"baseline must be 'x0_hat', 'learned' or 'none', got {baseline!r}")
    if alpha <= 0 or not 0 < clip < 1:
        raise ValueError(f"need alpha > 0 and 0 < clip < 1, got {alpha}, {clip}")
    objective = Objective(alpha=alpha)  # gamma is 1: the reward values are already gamma log p (a black box)
    restart = 0.0 if restart_fraction is None else float(restart_fraction)
    if not 0.0 <= restart < 1.0:
        raise ValueError(f"restart_fraction must lie in [0, 1), got {restart}")
    pool_size = (4096 if variant == "ctrl_pg" else 0) if reference_pool is None else int(reference_pool)
    reference_updates = (1000 if variant == "ctrl_pg" else 0) if reference_updates is None else int(reference_updates)
    start = time.perf_counter()
    reseed_untrained_pathway(model, seed, x_shape, label_prior)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: is the label pathway attached?")
    device = params[0].device
    opt = torch.optim.Adam(params, lr=lr)
    # Cosine decay: late updates average out the Monte Carlo noise of the estimates instead of following it.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations * updates_per_batch)
    value = None
    if baseline != "none":
        torch.manual_seed(seed + 1)
        value = ValueNetwork(math.prod(x_shape), label_prior.n_classes).to(device)
        value_opt = torch.optim.Adam(value.parameters(), lr=value_lr)
    if n_steps < 2:
        raise ValueError(f"n_steps must be at least 2, got {n_steps}")
    result = PolicyGradientResult()
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    queries, step = 0, 0
    pool, pool_weights, weight_value = None, None, None

    def snap(x0: Tensor) -> Tensor:
        return project(x0) if project is not None else x0

    use_reference = pool_size > 0 and reference_weight > 0
    if use_reference:
        pool, pool_x0, pool_y, pool_reward = draw_reference_pool(
            model, sde, reward, label_prior, x_shape, n_steps, t_end, pool_size, generator, spacing=spacing,
            keep_paths=reference_estimator == "path")
        queries += pool_size
        result.failed_rewards += int(pool_size - pool_reward.shape[0])
        pool_weights = soft_optimal_weights(pool_reward, pool_y, alpha)
        # End points the score-matching term regresses on: the pool's, then (replay) every scored training path's.
        ends = {"x0": snap(pool_x0), "y": pool_y, "reward": pool_reward, "log_ratio": torch.zeros_like(pool_reward),
                "weights": pool_weights}
        if baseline != "none" and reference_estimator == "path":
            # E_pre[w | x_t]: the baseline of the cross-entropy term's noise (see reference_loss).
            weight_value = ValueNetwork(math.prod(x_shape), label_prior.n_classes).to(device)
            weight_opt = torch.optim.Adam(weight_value.parameters(), lr=value_lr)

    def reference_term() -> Tensor:
        """The soft-optimal term: score matching on weighted end points, or the path cross-entropy on a random subset
        of pool (step, path) pairs (fitting its baseline first)."""
        if reference_estimator == "score_matching":
            # Weights average one within each label group, so drawing in proportion to them keeps each group's share.
            p_idx = torch.multinomial(ends["weights"].double().cpu(), reference_batch, replacement=True,
                                      generator=generator).to(device)
            return denoising_score_matching_loss(model, sde, ends["x0"][p_idx], ends["y"][p_idx], t_end=t_end,
                                                 generator=generator)
        p_idx = torch.randint(0, pool_weights.shape[0], (reference_batch,), generator=generator).to(device)
        k_idx = torch.randint(0, n_steps, (reference_batch,), generator=generator).to(device)
        b = None
        if weight_value is not None:
            wv = value_at(weight_value, pool, baseline, k_idx, p_idx)
            weight_opt.zero_grad(set_to_none=True)
            ((wv - pool_weights[p_idx]) ** 2).mean().backward()
            weight_opt.step()
            b = wv.detach()
        return reference_loss(model, pool, pool_weights[p_idx], k_idx, p_idx, b)

    if use_reference and reference_updates > 0:
        # Warm start toward the soft-optimal policy: no reward query beyond the pool's (module docstring).
        warm_opt = torch.optim.Adam(params, lr=reference_lr)
        warm_sched = torch.optim.lr_scheduler.CosineAnnealingLR(warm_opt, T_max=reference_updates)
        with progress_bar(reference_updates, "soft-optimal warm start", enabled=progress) as advance:
            for _ in range(reference_updates):
                loss = reference_term()
                apply_update(loss, warm_opt, warm_sched, params, grad_clip)
                step += 1
                advance(loss=loss.detach().item())
    with progress_bar(iterations, f"policy gradient ({variant})", enabled=progress) as advance:
        for _ in range(iterations):
            y = label_prior.sample(batch_size, generator).to(device)
            u01 = torch.rand(batch_size, generator=generator)
            switch = torch.where(u01 < restart, torch.randint(1, n_steps, (batch_size,), generator=generator), 0)
            times = jittered_grid(n_steps, t_end, generator, spacing=spacing, device=device)
            batch = collect_paths(model, sde, y, x_shape, times, switch_step=switch.to(device), generator=generator)
            with torch.no_grad():
                r = reward(batch.x0, y).detach().to(device=device, dtype=torch.float32).reshape(-1)
            if r.shape != (batch_size,):
                raise ValueError(f"reward returned shape {tuple(r.shape)} for {batch_size} samples")
            queries += batch_size
            valid = torch.isfinite(r)
            dropped = int((~valid).sum())
            result.failed_rewards += dropped
            if reference_replay and use_reference and valid.any():
                # Restarted paths too: their log-density counts only the steps the policy took.
                keep = valid
                for name, new_rows in (("x0", snap(batch.x0[keep])), ("y", y[keep]), ("reward", r[keep]),
                                       ("log_ratio", batch.log_density_ratio()[keep])):
                    ends[name] = torch.cat([ends[name], new_rows])
                ends["weights"] = soft_optimal_weights(ends["reward"], ends["y"], alpha, ends["log_ratio"])
            returns = rewards_to_go(torch.where(valid, r, 0.0), batch.kl_steps, alpha)
            mask = batch.active & valid[None]
            clip_fraction = 0.0
            for _ in range(updates_per_batch):
                if value is not None:
                    v = evaluate_value(value, batch, baseline)
                    value_loss = (((v - returns) ** 2) * mask).sum() / mask.sum().clamp_min(1)
                    value_opt.zero_grad(set_to_none=True)
                    value_loss.backward()
                    value_opt.step()
                    advantages = (returns - v.detach()) * mask
                else:
                    advantages = returns * mask
                if not valid.any():
                    break
                est = surrogate_loss(model, batch, advantages, valid, variant=variant, alpha=alpha, clip=clip)
                loss = est.loss
                if use_reference:
                    loss = loss + alpha * reference_weight * reference_term()
                apply_update(loss, opt, sched, params, grad_clip)
                step += 1
                clip_fraction = est.clip_fraction
            on = batch.on_policy & valid
            kl = batch.kl_steps.sum(0)
            r_on = float(r[on].mean()) if on.any() else float("nan")
            kl_on = float(kl[on].mean()) if on.any() else float("nan")
            result.history.append({"step": step, "reward_queries": queries, "reward": r_on, "kl": kl_on,
                                   "objective": objective.value(r_on, kl_on), "dropped": dropped,
                                   "clip_fraction": clip_fraction}
                                  | ({"reference_ess": float(ends["weights"].sum() ** 2 / (ends["weights"] ** 2).sum())}
                                     if use_reference else {}))
            if path is not None:
                _save(model, value, path)
            advance(reward=r_on, kl=kl_on)
    result.seconds = time.perf_counter() - start
    return result
