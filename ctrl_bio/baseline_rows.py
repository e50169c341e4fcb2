"""The baseline rows every domain suite shares, beside CTRL's own (:class:`ctrl_bio.rows.RowRunner`).

- ``cfg``: the same zero-initialised pathway trained by denoising score matching on the labelled pairs, scale swept.
- ``classifier_guidance``: a classifier of noisy x_t trained on the same pairs (the domain gives its network).
- ``dps``: the reward classifier at Tweedie's x0_hat.
- ``best_of_n``: N pre-trained samples per request, the reward classifier picks.
- ``ctrl_pg``, ``ddpo``: policy gradients from reward *values* only, the label's exact function as a black box.

Guidance scales are chosen by the reward classifier's J on requests of their own (``RowRunner.select_scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.blackbox import CallableReward
from ctrl_bio.guidance import (
    classifier_free_guidance,
    classifier_guidance,
    reconstruction_guidance,
    train_conditional_pathway,
    train_noisy_classifier,
)
from ctrl_bio.labels import exact_log_prob
from ctrl_bio.objective import Objective
from ctrl_bio.policy_gradient import finetune_policy_gradient

#: (samples, path KL to the pre-trained model or None, extra metrics) of one row.
RowOutput = tuple[Tensor, Tensor | None, dict[str, float]]


class BaselineRows:
    """The baselines' ``row_<name>`` methods, mixed into :class:`ctrl_bio.rows.RowRunner`, whose shared pieces they
    use: ``ctx``, ``method``, ``objective``, ``baselines``, ``reward()``, ``label_prior()``, ``new_model()``,
    ``select_scale()``, ``pretrained_chunk()``, ``shared_seconds()``, ``histories``, ``info``, ``run_dir`` and
    ``progress``."""

    ctx: Any
    method: dict
    baselines: dict
    objective: Objective

    def row_cfg(self) -> RowOutput:
        ctx, cfg = self.ctx, {"steps": 600, "batch_size": 128, "lr": 2e-3, "label_dropout": 0.1} | dict(
            self.baselines.get("cfg", {}))
        scales = list(cfg.pop("scales", [1.0, 2.0, 4.0]))
        x_pairs, y_pairs = self.joint_pairs()
        model = self.new_model()
        record = train_conditional_pathway(model, ctx.domain.sde, x_pairs.to(ctx.device), y_pairs.to(ctx.device),
                                           t_end=ctx.t_end,
                                           generator=torch.Generator().manual_seed(ctx.seed + 8000),
                                           progress=self.progress, **cfg)
        best, per_scale = self.select_scale(lambda w: lambda y: classifier_free_guidance(model, y, w), scales)
        self.info["cfg"] = {"pairs": int(x_pairs.shape[0]), "per_scale_reward_J": per_scale, "losses": record.losses}
        x, kl = ctx.sample(lambda y: classifier_free_guidance(model, y, best), ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "guidance_scale": best, "pairs_used": int(x_pairs.shape[0])}

    def joint_pairs(self) -> tuple[Tensor, Tensor]:
        """Pairs carrying every label at once, what cfg and classifier guidance learn from.

        One label: its own pairs. Several: the first label's pair inputs with every other label read off by that
        label's exact function (only exact labels can be added this way; CTRL itself needs none of it).
        """
        ctx = self.ctx
        x = ctx.pairs[0].x
        ys = [ctx.pairs[0].y]
        for spec in ctx.specs[1:]:
            exact = exact_log_prob(spec, ctx.domain)
            if exact is None:
                raise ValueError(f"cfg with several labels needs joint pairs; label '{spec['name']}' has no exact "
                                 "function to label the first label's inputs with")
            ys.append(exact(x).argmax(1))
        return x, torch.stack(ys, 1)

    def row_classifier_guidance(self) -> RowOutput:
        ctx = self.ctx
        cg = {"steps": 1500, "batch_size": 128, "lr": 2e-3} | dict(self.baselines.get("classifier_guidance", {}))
        scales = list(cg.pop("scales", [1.0, 2.0, 4.0]))
        net_kwargs = {k: cg.pop(k) for k in list(cg) if k not in ("steps", "batch_size", "lr")}
        x_pairs, y_pairs = self.joint_pairs()
        nets = []
        for k, n in enumerate(ctx.n_classes):
            torch.manual_seed(ctx.seed + k)
            net = ctx.noisy_classifier(n, **net_kwargs).to(ctx.device)
            train_noisy_classifier(net, ctx.domain.sde, x_pairs.to(ctx.device), y_pairs[:, k].to(ctx.device),
                                   t_end=ctx.t_end,
                                   generator=torch.Generator().manual_seed(ctx.seed + 8100 + k),
                                   progress=self.progress, **cg)
            nets.append(net)

        def noisy_ll(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return sum(net(x, t).log_softmax(1).gather(1, y[:, k:k + 1]).squeeze(1) for k, net in enumerate(nets))

        pre = ctx.pretrained
        best, per_scale = self.select_scale(lambda w: lambda y: classifier_guidance(pre, noisy_ll, y, w), scales)
        self.info["classifier_guidance"] = {"pairs": int(x_pairs.shape[0]), "per_scale_reward_J": per_scale}
        x, kl = ctx.sample(lambda y: classifier_guidance(pre, noisy_ll, y, best), ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "guidance_scale": best, "pairs_used": int(x_pairs.shape[0])}

    def row_dps(self) -> RowOutput:
        ctx = self.ctx
        scales = list(self.baselines.get("dps", {}).get("scales", [0.3, 1.0, 3.0]))
        reward, pre, sde = self.reward(), ctx.pretrained, ctx.domain.sde
        best, per_scale = self.select_scale(lambda w: lambda y: reconstruction_guidance(pre, sde, reward, y, w),
                                            scales)
        self.info["dps"] = {"per_scale_reward_J": per_scale}
        x, kl = ctx.sample(lambda y: reconstruction_guidance(pre, sde, reward, y, best), ctx.y_eval)
        # A forward and a backward pass through the score network per step: about three evaluations.
        return x, kl, {"score_evals": 3 * ctx.n_steps, "guidance_scale": best} | self.shared_seconds()

    def exact_log_probs(self, purpose: str = "ctrl_pg and ddpo query the label's exact function as their reward"
                        ) -> list[Callable[[Tensor], Tensor]]:
        """Each label's exact log p_k(y | x0) (``x0 -> (B, n_classes_k)``); ``purpose`` opens the error on a label
        that has none."""
        ctx = self.ctx
        exact = [exact_log_prob(spec, ctx.domain) for spec in ctx.specs]
        missing = [spec["name"] for spec, f in zip(ctx.specs, exact) if f is None]
        if missing:
            raise ValueError(f"{purpose}; label(s) {missing} have none (a reward from the evaluation oracle would "
                             "grade its own homework)")
        return exact

    def exact_reward(self) -> CallableReward:
        """gamma * sum_k log p_k(y_k | x0) of the labels' exact functions, as values only (a counted black box)."""
        gamma, exact = self.objective.gamma, self.exact_log_probs()

        def values(x0: Tensor, y: Tensor) -> Tensor:
            return gamma * sum(f(x0).gather(1, y[:, k:k + 1]).squeeze(1) for k, f in enumerate(exact))

        return CallableReward(values, decode=lambda x0: x0.detach())

    def policy_gradient_row(self, variant: str) -> RowOutput:
        """``ctrl_pg`` or ``ddpo``: the label pathway trained from reward values only (no reward gradient)."""
        ctx, cfg = self.ctx, dict(self.baselines.get("policy_gradient") or {})
        settings = dict(cfg.get("settings") or {}) | {"alpha": self.objective.alpha}
        if variant == "ddpo":  # published DDPO is on-policy only: no pre-trained pool, no warm start
            settings |= dict(cfg.get("ddpo") or {}) | {"reference_pool": 0, "reference_updates": 0}
        for key in ("variant", "seed", "progress", "checkpoint_path", "t_end", "spacing"):
            settings.pop(key, None)
        model = self.new_model()
        result = finetune_policy_gradient(model, ctx.domain.sde, self.exact_reward(), self.label_prior(),
                                          ctx.domain.x_shape, variant=variant, t_end=ctx.t_end, spacing=ctx.spacing,
                                          seed=ctx.seed,
                                          progress=self.progress,
                                          checkpoint_path=self.run_dir / "checkpoints" / f"{variant}.safetensors",
                                          project=getattr(ctx.domain, "project", None), **settings)
        self.histories[variant] = result.history
        self.info[variant] = {"settings": settings, "train_seconds": result.seconds}
        x, kl = ctx.sample(model.conditioned, ctx.y_eval)
        return x, kl, {"score_evals": ctx.n_steps, "failed_rewards": result.failed_rewards,
                       "reward_queries": result.history[-1]["reward_queries"] if result.history else 0}

    def row_ctrl_pg(self) -> RowOutput:
        return self.policy_gradient_row("ctrl_pg")

    def row_ddpo(self) -> RowOutput:
        return self.policy_gradient_row("ddpo")

    def row_best_of_n(self) -> RowOutput:
        """N pre-trained samples per request, the one the reward classifier likes best; selection has no path KL.

        The candidates are the ``pretrained`` row's samples plus N - 1 more sets; their sampling time is charged here.
        """
        ctx, reward = self.ctx, self.reward()
        n = int(self.baselines.get("best_of_n", {}).get("n", 4))
        b = ctx.y_eval.shape[0]
        reused = self.reused_chunk_seconds(range(n))
        candidates = torch.stack([self.pretrained_chunk(k) for k in range(n)])  # (n, b, ...)
        with torch.no_grad():
            scores = torch.stack([reward(c, ctx.y_eval) for c in candidates])
        x = candidates[scores.argmax(0), torch.arange(b)]
        extra = {"score_evals": n * ctx.n_steps, "n": n} | self.shared_seconds()
        if reused:  # chunks another row drew (pretrained, optimum) and was charged for; so is this row
            extra["shared_seconds"] = extra.get("shared_seconds", 0.0) + reused
        return x, None, extra
