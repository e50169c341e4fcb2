"""Oracle accuracy of CTRL's optimum on the DNA celltype label, without any diffusion model.

The optimum of J with reward classifier p(y|x) is p(x|y) ∝ p_pre(x) p(y|x)^gamma. Importance-weighting real test
sequences (never seen by the oracle or the classifier) by p(y|x)^gamma gives that distribution with p_data in place
of p_pre, and its oracle accuracy is what a perfect estimator would reach with this classifier.

    python benchmarks/dna/tilted_target.py 2000 7877      # numbers of pairs to try

Recorded (2026-11-30, one thread): 2,000 pairs: classifier 0.425, accuracy 0.33 / 0.38 / 0.45 / 0.53 at
gamma 1 / 2 / 4 / 8; 7,877 pairs (the whole pool): classifier 0.641, accuracy 0.52 / 0.69 / 0.82 / 0.90
(effective sample size per class at gamma 4: 546 of 4,565).
"""
import sys

import numpy as np
import torch
import yaml

from ctrl_bio.labels import fit_reward_classifier, load_label
from domains.dna.data import one_hot
from domains.dna.domain import DNADomain
from domains.dna.oracle import load_oracle

torch.set_num_threads(1)
domain = DNADomain()
test = domain.table.of_split("test")
x = one_hot(test.sequences)
with torch.no_grad():
    oracle_pred = torch.cat([load_oracle()(x[i:i + 1024]) for i in range(0, len(x), 1024)]).argmax(1)
spec = yaml.safe_load(open("configs/label/celltype.yaml"))
for n in [int(a) for a in sys.argv[1:]] or [7877]:
    spec["pairs"]["n"] = n
    pairs = load_label(spec, domain=domain, seed=7919)  # the suite's seed for its first label
    classifier, report = fit_reward_classifier(pairs, spec, seed=17)
    with torch.no_grad():
        log_p = torch.cat([classifier(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    cells = []
    for gamma in (1, 2, 4, 8):
        w = [(gamma * log_p[:, y]).softmax(0) for y in range(4)]
        acc = np.mean([float((w[y] * (oracle_pred == y).float()).sum()) for y in range(4)])
        ess = min(float(1 / (w[y] ** 2).sum()) for y in range(4))
        cells.append(f"gamma {gamma}: accuracy {acc:.3f} (ESS {ess:.0f})")
    print(f"{n} pairs, classifier held-out accuracy {report.accuracy:.3f} | " + " | ".join(cells))
