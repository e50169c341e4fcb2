"""Domain-agnostic sample metrics: two-sample distances, classification scores, histogram distances.

Classification scores (macro-F1, expected calibration error) are torchmetrics' own; the rest is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (Szekely & Rizzo 2013), V-statistic form.

    Samples of any shape (n, ...) are flattened. The V-statistic keeps the zero diagonal, so two
    independent samples of the same law give a small positive value of order 1/n: the noise floor
    that a method's distance is compared against at the same sample sizes.
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def accuracy(pred: Tensor, target: Tensor) -> float:
    return float((pred == target).float().mean())


def macro_f1(pred: Tensor, target: Tensor, n_classes: int) -> float:
    """Unweighted mean over classes of the F1 score; a class never predicted nor present is skipped.

    torchmetrics' ``multiclass_f1_score(average="macro")``, which skips such a class the same way.
    """
    from torchmetrics.functional.classification import multiclass_f1_score

    if pred.numel() == 0:
        return 0.0
    return float(multiclass_f1_score(pred, target, num_classes=n_classes, average="macro"))


def expected_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE of the top-class confidence with equal-width bins (Naeini et al. 2015; Guo et al. 2017, eq. 3).

    torchmetrics' ``multiclass_calibration_error`` (l1 norm): sum over bins of the bin's share of samples times
    |mean confidence - accuracy| in the bin, for probabilities (B, n_classes) and labels (B,).
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def histogram_tv(a: Tensor, b: Tensor, n_bins: int) -> float:
    """Total variation 1/2 sum |p - q| between the histograms of two integer samples in 0..n_bins-1."""
    p = torch.bincount(a, minlength=n_bins).double()
    q = torch.bincount(b, minlength=n_bins).double()
    return float(0.5 * (p / p.sum() - q / q.sum()).abs().sum())


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two samples (n, ...) flattened to features (Heusel et al. 2017):
    ||mu_x - mu_y||^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2)).

    Biased upwards at finite n (Chong & Forsyth 2020): compare it with the same distance between two real samples
    of the same sizes, never with zero.
    """
    from scipy import linalg

    a, b = x.reshape(x.shape[0], -1).double().numpy(), y.reshape(y.shape[0], -1).double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean  # imaginary parts are round-off
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


def tilted_accuracy(log_p: Tensor, true: Tensor, gamma: float) -> tuple[float, float]:
    """Accuracy of CTRL's optimum p(x | y) ∝ p(x) p(y | x)^gamma, estimated on samples of p(x), and the smallest
    per-class effective sample size of the weights (Kish).

    With samples x_i of p(x) (real held-out data, or the pre-trained model's samples), the requests y uniform over
    classes, the reward classifier's log p(y | x_i) (N, C) and each sample's true class (N,), the optimum draws x_i
    for request y with probability w_i(y) = softmax_i(gamma log p(y | x_i)); its accuracy is the mean over y of
    sum_i w_i(y) [true_i = y]. What a perfect estimator would reach with this classifier, without any training.
    """
    n_classes = log_p.shape[1]
    weights = [(gamma * log_p[:, y].double()).softmax(0) for y in range(n_classes)]
    acc = float(np.mean([float((w * (true == y).double()).sum()) for y, w in enumerate(weights)]))
    return acc, min(float(1.0 / (w**2).sum()) for w in weights)


def tilted_objective(log_p: Tensor, gamma: float) -> float:
    """CTRL's optimal J = gamma E[log p(y|x)] - KL (alpha = 1) for requests y uniform over classes, estimated on
    samples of p(x): J* = mean_y log mean_i p(y | x_i)^gamma, the log normaliser of p(x) p(y | x)^gamma.

    With log p (N, C) of the reward classifier on samples x_i of p(x). The value a suite row's J (objective) approaches
    as its estimator reaches the optimum (up to the sampler's discretisation of the KL).
    """
    n = torch.tensor(float(log_p.shape[0]), dtype=torch.float64)
    per_class = torch.logsumexp(gamma * log_p.double(), dim=0) - n.log()
    return float(per_class.mean())


def label_metrics(log_probs: Sequence[Tensor], y: Tensor, names: Sequence[str], n_classes: Sequence[int]
                  ) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy and macro-F1 of the evaluation likelihoods' argmax against the requests (averaged over labels, and
    per label when there are several), with per-class accuracies and confusion matrices as details."""
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    accs, f1s = [], []
    for k, (name, n, lp) in enumerate(zip(names, n_classes, log_probs)):
        pred = lp.argmax(1)
        accs.append(accuracy(pred, y[:, k]))
        f1s.append(macro_f1(pred, y[:, k], n))
        details[f"per_class_accuracy_{name}"] = [accuracy(pred[y[:, k] == c], y[y[:, k] == c, k])
                                                 if (y[:, k] == c).any() else None for c in range(n)]
        details[f"confusion_{name}"] = torch.bincount(y[:, k] * n + pred, minlength=n * n).reshape(n, n).tolist()
        if len(names) > 1:
            metrics[f"accuracy_{name}"] = accs[-1]
    metrics["accuracy"] = float(sum(accs) / len(accs))
    metrics["macro_f1"] = float(sum(f1s) / len(f1s))
    return metrics, details


def objective_metrics(log_probs: Sequence[Tensor], y: Tensor, kl: Tensor | None, objective: Any
                      ) -> dict[str, float]:
    """``kl`` and J = gamma log p_eval(y|x) - alpha KL under the evaluation likelihoods (nothing for a row with no
    path, such as ``real_data``); ``objective`` is a :class:`ctrl_bio.objective.Objective` (typed loosely so that the
    metrics import nothing of the objective's)."""
    if kl is None:
        return {}
    log_likelihood = sum(lp.gather(1, y[:, k:k + 1]).squeeze(1) for k, lp in enumerate(log_probs))
    return {"kl": float(kl.mean()), "objective": float(objective.value(log_likelihood, kl).mean())}
