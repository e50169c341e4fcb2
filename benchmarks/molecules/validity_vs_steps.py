"""Validity of the shipped pre-trained molecule model's unconditional samples against the sampler's step count.

Asks whether issue 6's validity gap (0.86-0.89 against the 0.95 asked) is the Euler-Maruyama discretisation or the
pre-trained network. 512 samples per step count, seed 1, one thread:

    python benchmarks/molecules/validity_vs_steps.py 100 200 400
    python benchmarks/molecules/validity_vs_steps.py 100 --checkpoint runs/pretrain_molecules   # another network

Recorded 2026-11-30 (one thread, beside one other run): validity 0.893 / 0.863 / 0.889, connected 0.813 / 0.787 /
0.814 at 100 / 200 / 400 steps (18 / 35 / 71 s). The standard error at 512 samples is about 0.014, so more steps do
not raise validity: the gap is the pre-trained network's, not the sampler's. The 30,000-step network that replaced it
(`--checkpoint runs/pretrain_molecules`, 2026-11-30, one thread beside two suite runs): validity 0.973 / 0.975,
connected 0.943 / 0.938 at 100 / 200 steps (20 / 37 s).
"""
import argparse
import json
import time

import torch

from domains.molecules.data import decode
from domains.molecules.domain import MoleculeDomain
from domains.molecules.metrics import generation_metrics

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("steps", type=int, nargs="*", default=[100], help="sampler step counts")
parser.add_argument("--checkpoint", default=None, help="a pretrain run directory or .safetensors (default: shipped)")
args = parser.parse_args()
torch.set_num_threads(1)
domain = MoleculeDomain(checkpoint=args.checkpoint)
net = domain.pretrained_model()
train = set(domain.table.of_split("training").smiles)
for steps in args.steps:
    start = time.time()
    x = domain.sample(net, 512, n_steps=steps, seed=1)
    metrics = generation_metrics(decode(x), train)
    metrics["seconds"], metrics["n_steps"] = time.time() - start, steps
    print(json.dumps(metrics), flush=True)
