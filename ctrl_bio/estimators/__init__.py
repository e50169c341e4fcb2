"""CTRL's estimators, one file each, behind one interface (:class:`~ctrl_bio.estimators.base.Estimator`).

- ``score_matching``: off-policy regression onto the reward-tilted pre-trained pool (mode-covering warm start).
- ``pathwise``: backpropagation of J through the sampler (full, checkpointed or truncated).
- ``adjoint_matching``: regression of the control onto the lean adjoint of the reward gradient
  (Domingo-Enrich et al. 2025).
- ``soft_value``: a value network V(x_t, t, y) = log E_pre[p(y|x0)^(gamma/alpha) | x_t] fitted by regression, its
  gradient (the h-transform's control) distilled into the pathway.
- ``rollout_control``: the control regressed onto Monte Carlo estimates of the h-transform's control, from
  continuations of the pre-trained sampler (Tweedie's formula for the tilted and untilted posteriors).

``method.estimator`` names one; ``method.warm_start: true`` runs ``score_matching`` first (``hybrid`` is ``pathwise``
with the warm start). A new estimator is a file here and a line in :data:`ESTIMATORS`.
"""

from ctrl_bio.estimators.adjoint_matching import AdjointMatching, lean_adjoint
from ctrl_bio.estimators.base import Estimator, Objective, Problem
from ctrl_bio.estimators.pathwise import Pathwise
from ctrl_bio.estimators.rollout_control import RolloutControl
from ctrl_bio.estimators.score_matching import ScoreMatching, sample_pretrained_pool
from ctrl_bio.estimators.soft_value import SoftValue

#: The on-policy estimators by name (what ``method.estimator`` selects), score matching included.
ESTIMATORS = {"score_matching": ScoreMatching, "pathwise": Pathwise, "adjoint_matching": AdjointMatching,
              "soft_value": SoftValue, "rollout_control": RolloutControl}
#: Names that are a warm start plus an estimator.
ALIASES = {"hybrid": "pathwise"}
#: The estimators that regress onto (score matching) or fit on (the soft value) a pool of pre-trained samples.
POOL_ESTIMATORS = ("score_matching", "soft_value")


def uses_pool(estimator: str, warm_start: bool = False) -> bool:
    """Whether ``method.estimator`` (with ``method.warm_start``) reads a pool of pre-trained samples, i.e. whether
    ``pool`` / ``pool_size`` / ``pool_x0`` mean anything to it; the others draw their own trajectories."""
    if estimator in ALIASES:
        return True  # an alias is a score-matching warm start plus an estimator
    return estimator in POOL_ESTIMATORS or (warm_start and estimator in ESTIMATORS)


__all__ = ["ALIASES", "AdjointMatching", "ESTIMATORS", "Estimator", "Objective", "POOL_ESTIMATORS", "Pathwise",
           "Problem", "RolloutControl", "ScoreMatching", "SoftValue", "lean_adjoint", "sample_pretrained_pool",
           "uses_pool"]
