"""Training loops of the ``ctrl-bio`` commands under PyTorch Lightning (the only part of the core that imports it).

- :mod:`ctrl_bio.training.modules`: Lightning modules for score matching, reward classifiers and CTRL,
  every step seeded by (seed, global_step, global_rank) so that a resumed run equals an uninterrupted one.
- :mod:`ctrl_bio.training.runs`: trainers, checkpoints, resumption, exported weights.
- :mod:`ctrl_bio.training.commands`: ``pretrain``, ``train-classifier``, ``finetune`` and ``sample`` from a
  composed Hydra config.
"""

from ctrl_bio.training.modules import ClassifierModule, CTRLModule, ScoreMatchingModule, step_generator
from ctrl_bio.training.runs import (
    build_trainer,
    calibrate,
    export_network,
    fit,
    fit_classifier,
    fit_score_network,
    load_network,
    load_trainable,
    resolve_resume,
    save_weights,
    trainable_state,
)

__all__ = ["ClassifierModule", "CTRLModule", "ScoreMatchingModule", "step_generator", "build_trainer", "calibrate",
           "export_network", "fit", "fit_classifier", "fit_score_network", "load_network", "load_trainable",
           "resolve_resume", "save_weights", "trainable_state"]
