"""Signal-to-noise of the pathwise gradient of J on DNA cell type at the zero-initialised pathway.

Draws --repeats independent batches of --batch-size labels and paths, computes each batch's gradient of -J in the
pathway's parameters (memory=checkpoint: the exact gradient through the 50-step sampler), and reports
||mean||^2 against the mean squared deviation of one batch's gradient from the mean: SNR per update at this batch
size, and the batch size at which one update's gradient would carry as much signal as noise (batch x 1/SNR).
It needs the reward classifier cached by benchmarks/dna/pathwise_budget.py.

    python benchmarks/dna/pathwise_snr.py --batch-size 16 --repeats 8
"""
import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from ctrl_bio.estimators import Objective, Pathwise, Problem
from ctrl_bio.labels import load_label
from ctrl_bio.reward import LabelPrior, LogLikelihoodReward
from domains.dna.domain import DNADomain

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--repeats", type=int, default=8)
parser.add_argument("--cache", default="/tmp/ctrl_probe")
args = parser.parse_args()
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
domain = DNADomain()
spec = yaml.safe_load(open(ROOT / "configs/label/celltype.yaml"))
spec["pairs"]["n"] = 7877
pairs = load_label(spec, domain=domain, seed=7919)
classifier = torch.load(Path(args.cache) / "celltype_reward.pt", weights_only=False).eval()
reward = LogLikelihoodReward([classifier])
prior = LabelPrior.from_labels([pairs.y], [4])
torch.manual_seed(0)
model = domain.augment(domain.pretrained_model(), [4])
problem = Problem(model, domain.sde, reward, prior, domain.x_shape, Objective(gamma=4.0), n_steps=50)
est = Pathwise(memory="checkpoint")
params = [p for p in model.parameters() if p.requires_grad]
grads = []
start = time.perf_counter()
for r in range(args.repeats):
    g = torch.Generator().manual_seed(100 + r)
    y = prior.sample(args.batch_size, g)
    model.zero_grad()
    est.loss(problem, y, g).backward()
    grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
G = torch.stack(grads)
mean = G.mean(0)
dev = ((G - mean) ** 2).sum(1).mean() * args.repeats / (args.repeats - 1)
signal = (mean ** 2).sum() - dev / args.repeats  # unbiased ||E g||^2
snr = float(signal / dev)
print(json.dumps({"batch_size": args.batch_size, "repeats": args.repeats, "signal": float(signal),
                  "noise_per_batch": float(dev), "snr_per_update": snr,
                  "batch_for_snr_1": args.batch_size / snr if snr > 0 else None,
                  "seconds": round(time.perf_counter() - start, 1)}))
