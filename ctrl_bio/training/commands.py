"""``ctrl-bio pretrain | train-classifier | finetune | sample`` from a composed config (see ``configs/<command>.yaml``).

Each command takes the resolved config (``hydra`` node removed, ``run_dir`` set) and the checkpoint to
resume from, builds the domain through its ``plugin`` node (a ``_target_``, so this module imports no
domain), and writes into ``run_dir``. Only rank 0 writes the exported weights and reports.

The settings checks and builders they share are in :mod:`ctrl_bio.training.command_config`, the ``sample`` command in
:mod:`ctrl_bio.training.sample`; their public names are importable from here too.
"""

from __future__ import annotations

import inspect
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ctrl_bio.domain import Domain
from ctrl_bio.estimators import uses_pool
from ctrl_bio.finetune import build_phases
from ctrl_bio.labels import LabelError, build_classifier, check_trusted, exact_log_prob, label_specs, load_label
from ctrl_bio.reward import CalibratedClassifier, LabelPrior, LogLikelihoodReward
from ctrl_bio.settings import CTRLSettings, settings_for
from ctrl_bio.training.command_config import (
    COUNT,
    FRACTION,
    OPTIONAL_POSITIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SETTINGS,
    TRAINING_SETTINGS,
    Rule,
    build_callbacks,
    build_domain,
    check_settings,
    is_rank_zero,
    run_length_key,
    time_spacing,
    trainer_kwargs,
)
from ctrl_bio.training.modules import CTRLModule
from ctrl_bio.training.runs import (
    CHECKPOINT_DIR,
    build_trainer,
    checkpoint_file,
    export_network,
    fit,
    fit_classifier,
    fit_score_network,
    read_meta,
    read_weights,
    save_weights,
    trainable_state,
)
from ctrl_bio.training.sample import (
    SAMPLERS,
    SampleSource,
    check_targets,
    draw_samples,
    load_finetune_run,
    load_model_folder,
    load_sample_source,
    parse_request,
    plot_samples,
    run_sample,
)

log = logging.getLogger("ctrl_bio")

#: This module's own commands, and what it re-exports from command_config and sample (their old import path).
__all__ = ["COMMANDS", "MODEL_DIR", "run_pretrain", "run_train_classifier", "run_finetune", "export_model",
           "pair_seed", "train_label_classifiers", "load_classifier", "COUNT", "FRACTION", "OPTIONAL_POSITIVE_INT",
           "POSITIVE", "POSITIVE_INT", "SETTINGS", "TRAINING_SETTINGS", "Rule", "build_callbacks", "build_domain",
           "check_settings", "is_rank_zero", "run_length_key", "time_spacing", "trainer_kwargs", "SAMPLERS",
           "SampleSource", "check_targets", "draw_samples", "load_finetune_run", "load_model_folder",
           "load_sample_source", "parse_request", "plot_samples", "run_sample", "log"]


def run_pretrain(cfg: DictConfig, run_dir: Path, resume: Path | None) -> None:
    """Denoising score matching of the domain's score network on its training data; writes ``score.safetensors``."""
    domain = build_domain(cfg.plugin)
    torch.manual_seed(cfg.seed)
    net = domain.score_network()
    fit_score_network(net, domain.sde, domain.training_data(), steps=cfg.steps, batch_size=cfg.batch_size,
                      lr=cfg.lr, t_end=cfg.t_end, seed=cfg.seed, run_dir=run_dir, resume=checkpoint_file(resume),
                      **trainer_kwargs(cfg))
    if not is_rank_zero():
        return
    path = export_network(net, run_dir / "score.safetensors")
    print(f"pre-trained network: {path}")
    if cfg.evaluate and hasattr(domain, "evaluate_pretrained"):
        quality = domain.evaluate_pretrained(net)
        (run_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
        print("quality: " + ", ".join(f"{k}={v:.4g}" for k, v in quality.items()))


def pair_seed(seed: int, name: str) -> int:
    """The pairs of label ``name`` are drawn from their own stream: the same in train-classifier and finetune."""
    return int(seed) + zlib.crc32(name.encode()) % 100_000


def _load_pairs(cfg: DictConfig, domain: Domain) -> list[tuple[dict[str, Any], Any]]:
    specs = label_specs(OmegaConf.to_container(cfg.label, resolve=True))
    if not specs:
        raise LabelError("no label given: add label=<name> (a file under configs/label/)")
    return [(spec, load_label(spec, domain=domain, seed=pair_seed(cfg.seed, spec["name"]))) for spec in specs]


def train_label_classifiers(cfg: DictConfig, domain: Domain, labelled: Sequence[tuple[dict, Any]], run_dir: Path,
                            resuming: bool) -> list[CalibratedClassifier]:
    """One calibrated classifier per label into ``run_dir/classifiers/<name>.safetensors`` (+ ``.json`` report).

    When resuming, a finished classifier is loaded and an unfinished one continues from its checkpoint.
    """
    out = []
    for spec, pairs in labelled:
        name = spec["name"]
        path = run_dir / "classifiers" / f"{name}.safetensors"
        if resuming and path.is_file():
            out.append(load_classifier(path, spec, domain))
            continue
        if pairs.n_classes is None:
            raise LabelError(f"label '{name}': continuous labels need a regressor, not a classifier")
        sub = run_dir / "classifiers" / name
        last = sub / CHECKPOINT_DIR / "last.ckpt"
        torch.manual_seed(cfg.seed)
        net = build_classifier(spec, pairs.x.shape[1:], pairs.n_classes)
        training = dict(spec.get("training") or {})
        fraction = (spec.get("calibration") or {}).get("fraction", 0.2)
        clf, report = fit_classifier(net, pairs.x, pairs.y, calib_fraction=fraction, seed=cfg.seed, run_dir=sub,
                                     resume=last if resuming and last.is_file() else None, **training,
                                     **trainer_kwargs(cfg))
        if is_rank_zero():
            meta = {"label": spec, "n_classes": pairs.n_classes, "x_shape": list(pairs.x.shape[1:]),
                    "n_pairs": len(pairs), "n_skipped": pairs.n_skipped, "skipped": dict(pairs.skipped),
                    "report": vars(report)}
            save_weights(clf.state_dict(), path, meta)
            print(f"classifier '{name}': accuracy {report.accuracy:.3f}, ECE {report.ece_before:.4f} -> "
                  f"{report.ece_after:.4f} (temperature {report.temperature:.3f}); {path}")
        out.append(clf)
    return out


def load_classifier(path: Path, spec: Mapping[str, Any], domain: Domain) -> CalibratedClassifier:
    """A calibrated classifier written by ``train-classifier`` for this label."""
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"classifier: no '{path}' (with its .json) for label '{spec['name']}'")
    meta = read_meta(meta_path)
    if not {"label", "x_shape", "n_classes"} <= meta.keys():
        raise ValueError(f"{meta_path}: not a classifier report of train-classifier (no label, x_shape or n_classes)")
    target = (meta["label"].get("classifier") or {}).get("_target_")
    if target is not None and target != (spec.get("classifier") or {}).get("_target_"):
        # A _target_ the run's own label config does not name is imported only from a trusted package.
        check_trusted(target, f"{meta_path}: classifier _target_")
    net = build_classifier(meta["label"], meta["x_shape"], meta["n_classes"])
    clf = CalibratedClassifier(net)
    clf.load_state_dict(read_weights(path))
    return clf.requires_grad_(False).eval()


def run_train_classifier(cfg: DictConfig, run_dir: Path, resume: Path | None) -> None:
    """Calibrated reward classifiers p(y|x) of the requested labels, trained on clean pairs."""
    domain = build_domain(cfg.plugin)
    train_label_classifiers(cfg, domain, _load_pairs(cfg, domain), run_dir, resuming=resume is not None)


def _reward_fns(cfg: DictConfig, domain: Domain, labelled: Sequence[tuple[dict, Any]], run_dir: Path,
                resuming: bool) -> list:
    if cfg.reward == "exact":
        fns = [exact_log_prob(spec, domain) for spec, _ in labelled]
        missing = [spec["name"] for (spec, _), f in zip(labelled, fns) if f is None]
        if missing:
            raise LabelError(f"reward=exact: label(s) {missing} define no exact likelihood ('exact' field)")
        return fns
    if cfg.reward != "classifier":
        raise ValueError(f"reward must be 'classifier' or 'exact', got {cfg.reward!r}")
    if cfg.classifier is None:
        return train_label_classifiers(cfg, domain, labelled, run_dir, resuming)
    given = Path(cfg.classifier)
    if given.is_file() and len(labelled) == 1:
        return [load_classifier(given, labelled[0][0], domain)]
    return [load_classifier(given / "classifiers" / f"{spec['name']}.safetensors", spec, domain)
            for spec, _ in labelled]


def run_finetune(cfg: DictConfig, run_dir: Path, resume: Path | None) -> None:
    """CTRL fine-tuning of a zero-initialised label pathway; writes ``pathway.safetensors`` (+ ``.json``)."""
    domain = build_domain(cfg.plugin)
    labelled = _load_pairs(cfg, domain)
    fns = _reward_fns(cfg, domain, labelled, run_dir, resuming=resume is not None)
    prior = LabelPrior.from_labels([pairs.y for _, pairs in labelled], [pairs.n_classes for _, pairs in labelled])
    torch.manual_seed(cfg.seed)
    n_classes = [pairs.n_classes for _, pairs in labelled]
    model = domain.augment(domain.pretrained_model(), n_classes)
    # Suite-only settings (pool, control_scales, ...) must be at their defaults: refused by name, never ignored.
    method = settings_for(OmegaConf.to_container(cfg.method, resolve=True), (build_phases, CTRLModule),
                          "ctrl-bio finetune")
    phase_keys = inspect.signature(build_phases).parameters
    estimator, warm_start = method.get("estimator", "score_matching"), bool(method.get("warm_start", False))
    pool_size = method.get("pool_size", CTRLSettings.pool_size)
    if not uses_pool(estimator, warm_start) and pool_size != CTRLSettings.pool_size:
        raise ValueError(f"method.pool_size={pool_size} has no effect: estimator {estimator!r} takes no pool of "
                         "pre-trained samples (only score_matching, soft_value and warm-started estimators do)")
    if method.get("value_distill") == "none":
        raise ValueError("method.value_distill=none trains no pathway (the control is grad V at sampling time): run it "
                         "in a suite or from Python, ctrl_bio.estimators.soft_value.value_guided_score")
    phases = build_phases(**{k: v for k, v in method.items() if k in phase_keys}, progress=False)
    module = CTRLModule(model, domain.sde, LogLikelihoodReward(fns), prior, domain.x_shape, phases=phases,
                        n_steps=cfg.n_steps, t_end=cfg.t_end, spacing=time_spacing(cfg, domain), seed=cfg.seed,
                        **{k: v for k, v in method.items() if k not in phase_keys})
    if cfg.trainer.get("max_steps") not in (None, module.total_steps):
        raise ValueError(f"finetune runs method.sm_steps + method.steps = {module.total_steps} steps (each phase has "
                         f"its own schedule): set those instead of trainer.max_steps={cfg.trainer.max_steps}")
    trainer = build_trainer(run_dir, max_steps=module.total_steps, **trainer_kwargs(cfg))
    fit(trainer, module, checkpoint_file(resume))
    if is_rank_zero():
        labels = [{"name": spec["name"], "n_classes": pairs.n_classes, "classes": spec.get("classes"),
                   "n_pairs": len(pairs), "skipped": dict(pairs.skipped)} for spec, pairs in labelled]
        path = save_weights(trainable_state(model), run_dir / "pathway.safetensors",
                            {"labels": labels, "steps": trainer.global_step})
        print(f"fine-tuned label pathway: {path}")
        export_model(cfg, domain, model, labels, run_dir / MODEL_DIR)


#: The sub-folder of a finetune run holding its model in the Hugging Face convention (:mod:`ctrl_bio.hub`).
MODEL_DIR = "model"


def export_model(cfg: DictConfig, domain: Domain, model: torch.nn.Module, labels: list[dict[str, Any]],
                 folder: Path) -> Path | None:
    """The fine-tuned model as a ``save_pretrained`` folder (config.json, model.safetensors, model card, ``base/``).

    ``config.json["extra"]`` keeps what ``ctrl-bio sample run=<folder>`` needs besides the model: the domain's plugin
    node, the sample shape, the sampler's grid and the labels. A model the hub cannot describe (a network without a
    ``config``) is reported in one log line and not exported: ``pathway.safetensors`` is still the run's result.
    """
    from ctrl_bio.hub import save_pretrained

    method = cfg.method
    extra = {"plugin": OmegaConf.to_container(cfg.plugin, resolve=True), "x_shape": list(domain.x_shape),
             "n_steps": cfg.n_steps, "t_end": cfg.t_end, "spacing": time_spacing(cfg, domain), "labels": labels}
    try:
        save_pretrained(model, folder, labels=labels, alpha=method.get("alpha"), gamma=method.get("gamma"),
                        estimator=method.get("estimator"), extra=extra,
                        training_data=", ".join(f"{lab['n_pairs']} pairs of label '{lab['name']}'" for lab in labels))
    except TypeError as exc:
        log.warning("model/ not written (the Hub-style folder): %s", exc)
        return None
    print(f"fine-tuned model (save_pretrained folder): {folder}")
    return folder


COMMANDS = {"pretrain": run_pretrain, "train-classifier": run_train_classifier, "finetune": run_finetune,
            "sample": run_sample}
