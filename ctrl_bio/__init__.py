"""ctrl-bio: add new conditional controls to pre-trained diffusion models by reinforcement learning.

CTRL (Zhao et al. 2024, "Adding Conditional Control to Diffusion Models with Reinforcement Learning")
fine-tunes a zero-initialised label pathway of a frozen pre-trained score model so that it samples
p(x | y) proportional to p_pre(x) p(y | x). The core is domain-agnostic and imports torch, numpy and scipy
only; domains live in the top-level ``domains`` namespace package.
"""

from ctrl_bio.blackbox import CallableReward, CommandReward, label_likelihood_black_box
from ctrl_bio.finetune import FinetuneResult, NonFiniteLossError, finetune
from ctrl_bio.interop import NetworkScore, from_diffusers, sde_from_scheduler, wrap_network
from ctrl_bio.kl import gaussian_kl, girsanov_kl, transition_kl
from ctrl_bio.lora import LoRAAugmentedScore
from ctrl_bio.model import NULL_LABEL, AugmentedScore, EmbeddingAugmentedScore, LabelEmbedding, VectorPathway
from ctrl_bio.objective import ObjectiveEstimate, WeightedPool, pathwise_loss, weighted_score_matching_loss
from ctrl_bio.plain_reward import PLAIN_LABELS, PlainReward, plain_requests
from ctrl_bio.policy_gradient import PolicyGradientResult, finetune_policy_gradient
from ctrl_bio.reward import (
                             CalibratedClassifier,
                             ClassifierReport,
                             LabelPrior,
                             LogLikelihoodReward,
                             expected_calibration_error,
                             mlp_classifier,
                             train_classifier,
)
from ctrl_bio.sampling import SamplerOutput, euler_maruyama, time_grid
from ctrl_bio.sde import SDE, VPSDE, DiscreteScheduleSDE, DiscreteVPSDE
from ctrl_bio.utils import append_dims

__version__ = "0.1.0"

__all__ = [
    "PLAIN_LABELS", "PlainReward", "plain_requests",
    "SDE", "VPSDE", "DiscreteScheduleSDE", "DiscreteVPSDE", "append_dims",
    "NetworkScore", "wrap_network", "from_diffusers", "sde_from_scheduler",
    "save_pretrained", "from_pretrained", "ModelCardInfo",
    "SamplerOutput", "euler_maruyama", "time_grid",
    "girsanov_kl", "transition_kl", "gaussian_kl",
    "NULL_LABEL", "AugmentedScore", "VectorPathway", "EmbeddingAugmentedScore", "LoRAAugmentedScore", "LabelEmbedding",
    "CalibratedClassifier", "ClassifierReport", "LabelPrior", "LogLikelihoodReward", "expected_calibration_error",
    "mlp_classifier", "train_classifier",
    "ObjectiveEstimate", "WeightedPool", "pathwise_loss", "weighted_score_matching_loss",
    "FinetuneResult", "NonFiniteLossError", "finetune",
    "CallableReward", "CommandReward", "label_likelihood_black_box",
    "PolicyGradientResult", "finetune_policy_gradient",
]

#: Exported lazily: huggingface_hub's model-card machinery costs about half a second at import.
_HUB_EXPORTS = ("save_pretrained", "from_pretrained", "ModelCardInfo")


def __getattr__(name: str):
    if name in _HUB_EXPORTS:
        from ctrl_bio import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'ctrl_bio' has no attribute {name!r}")
