"""Exact accuracy of CTRL's optimum on an RDKit-exact molecule label, without any diffusion model.

The optimum of J with reward classifier p(y|x) is p(x|y) ∝ p_pre(x) p(y|x)^gamma. Importance-weighting the real
test molecules (never seen by the classifier) by p(y|x)^gamma gives that distribution with p_data in place of p_pre;
its exact accuracy (each molecule's real RDKit bin) is what a perfect estimator and a perfect pre-trained model would
reach with this classifier. The gap between it and a row's accuracy is the estimator's and the pre-trained model's.

    python benchmarks/molecules/tilted_target.py qed 5000 20000    # label, then numbers of pairs to try

Recorded (2026-11-30, one thread, 5,000 pairs as in the suite): qed: classifier 0.792, accuracy 0.717 / 0.808 /
0.870 / 0.911 / 0.935 at gamma 1 / 2 / 4 / 8 / 16 (effective sample size per class at gamma 4: 3,109 of 12,963
test molecules; the optimum's J* -1.10 / -1.43 / -1.79 / -2.21 / -2.73, 87 s); logp: classifier 0.944,
accuracy 0.906 / 0.950 / 0.973 / 0.985 / 0.992.
A DFT label (gap, mu, alpha) has no exact bin: its samples are scored by the property oracle, so the optimum is
scored by the oracle's bins too (2026-11-30, eleventh session): mu: classifier 0.638, accuracy 0.607 / 0.730 / 0.848 /
0.934 / 0.975 at gamma 1 / 2 / 4 / 8 / 16 (ESS at gamma 4: 2,483). Above the oracle's own binned accuracy on real
molecules (0.703): the oracle agrees with the classifier's choices, whatever the true dipole moments.
"""
import sys
from pathlib import Path

import torch
import yaml

from ctrl_bio.labels import evaluation_log_prob, fit_reward_classifier, load_label
from ctrl_bio.metrics import tilted_accuracy, tilted_objective
from domains.molecules.domain import MoleculeDomain

ROOT = Path(__file__).resolve().parents[2]  # configs are read from the repository, whatever the cwd
torch.set_num_threads(1)
name, sizes = sys.argv[1], [int(a) for a in sys.argv[2:]] or [5000]
domain = MoleculeDomain()
x = domain.table.of_split("test").x()
spec = yaml.safe_load(open(ROOT / f"configs/label/{name}.yaml"))
# The label's exact bins (RDKit labels) or, for DFT labels, the oracle's: what the suite scores samples with.
true = evaluation_log_prob(spec, domain)(x).argmax(1)
for n in sizes:
    spec["pairs"]["n"] = n
    pairs = load_label(spec, domain=domain, seed=7919)  # the suite's seed for its first label
    classifier, report = fit_reward_classifier(pairs, spec, seed=17)
    with torch.no_grad():
        log_p = torch.cat([classifier(x[i:i + 2048]) for i in range(0, len(x), 2048)])
    cells = []
    for gamma in (1, 2, 4, 8, 16):
        acc, ess = tilted_accuracy(log_p, true, gamma)
        cells.append(f"gamma {gamma}: accuracy {acc:.3f} (ESS {ess:.0f}, J* {tilted_objective(log_p, gamma):.2f})")
    print(f"{name}, {n} pairs, classifier held-out accuracy {report.accuracy:.3f} | " + " | ".join(cells), flush=True)
