"""Signal-to-noise of CTRL's pathwise gradient of J at the zero-initialised pathway, on any suite's label task.

Builds the suite's domain, pairs and calibrated reward classifier exactly as ``ctrl-bio benchmark suite=<suite>`` does
(its config, seeds and ``load_task`` / ``fit_reward_classifiers``), draws ``--repeats`` independent batches of
``--batch-size`` labels and paths, and takes each batch's gradient of -J in the pathway's parameters through the whole
sampler (``memory=checkpoint``: the exact gradient). At the zero-initialised pathway the KL's gradient is zero, so this
is the reward's. It reports the unbiased squared norm of the mean gradient (signal) against the mean squared deviation
of one batch's gradient from it (noise per update): SNR per update at this batch size, and the batch at which one
update would carry as much signal as noise (batch / SNR), with a jackknife standard error of the SNR over the repeats.

    python benchmarks/estimators/pathwise_snr.py --suite dna --batch-size 16 --repeats 8
    python benchmarks/estimators/pathwise_snr.py --suite molecules label=qed --batch-size 16 --repeats 8
"""
import argparse
import json
import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctrl_bio.cli import compose_config
from ctrl_bio.estimators import Objective, Pathwise, Problem
from ctrl_bio.labels import fit_reward_classifiers, label_specs
from ctrl_bio.reward import LabelPrior
from ctrl_bio.rows import load_task

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--suite", default="dna")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--repeats", type=int, default=8)
parser.add_argument("overrides", nargs="*", help="config overrides of the suite (label=qed, ...)")
args = parser.parse_args()
torch.set_num_threads(1)
cfg = compose_config("benchmark", [f"suite={args.suite}", "device=cpu", *args.overrides])
suite = OmegaConf.to_container(cfg.suite, resolve=True)
domain = instantiate(suite["domain"])
specs = label_specs(suite["labels"]["node"])
seed = int(suite["seed"])
specs, pairs, _, _ = load_task(specs, domain, seed)
reward, reports = fit_reward_classifiers(specs, pairs, seed=seed)
n_classes = [int(p.n_classes) for p in pairs]
prior = LabelPrior.from_labels([p.y for p in pairs], n_classes)
torch.manual_seed(seed)  # as RowRunner.new_model
model = domain.augment(domain.pretrained_model(), n_classes)
problem = Problem(model, domain.sde, reward, prior, domain.x_shape, Objective.of(suite["method"]),
                  n_steps=int(suite["n_steps"]), t_end=float(suite["t_end"]),
                  spacing=suite.get("spacing", "uniform"))
estimator = Pathwise(memory="checkpoint")
params = [p for p in model.parameters() if p.requires_grad]
grads = []
start = time.perf_counter()
for r in range(args.repeats):
    g = torch.Generator().manual_seed(100 + r)
    model.zero_grad()
    estimator.loss(problem, prior.sample(args.batch_size, g), g).backward()
    grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
grads = torch.stack(grads).double()


def signal_and_noise(g: torch.Tensor) -> tuple[float, float]:
    """(unbiased ||E g||^2, E||g - E g||^2) from R independent gradients g (R, P)."""
    r, mean = g.shape[0], g.mean(0)
    noise = float(((g - mean) ** 2).sum(1).mean()) * r / (r - 1)
    return float((mean**2).sum()) - noise / r, noise


signal, noise = signal_and_noise(grads)
snr = signal / noise
# Jackknife standard error of the SNR: with few repeats the signal is hard to tell from zero.
leave_one_out = [signal_and_noise(torch.cat([grads[:i], grads[i + 1:]])) for i in range(args.repeats)]
jack = torch.tensor([s / n for s, n in leave_one_out], dtype=torch.float64)
snr_se = float(((args.repeats - 1) / args.repeats * ((jack - jack.mean()) ** 2).sum()).sqrt())
print(json.dumps({"suite": args.suite, "overrides": args.overrides, "n_steps": problem.n_steps,
                  "batch_size": args.batch_size, "repeats": args.repeats, "signal": signal,
                  "noise_per_update": noise, "snr_per_update": round(snr, 4), "snr_standard_error": round(snr_se, 4),
                  "batch_for_snr_1": round(args.batch_size / snr) if snr > 0 else None,
                  "gradient_seconds": round(time.perf_counter() - start, 1)}))
