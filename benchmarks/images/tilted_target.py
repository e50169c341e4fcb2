"""Exact JPEG-class accuracy of CTRL's optimum on the compress label, without any diffusion model.

The optimum of J with reward classifier p(y|x) is p(x|y) ∝ p_pre(x) p(y|x)^gamma. Importance-weighting real test
patches (never seen by the classifier) by p(y|x)^gamma gives that distribution with p_data in place of p_pre; its
exact accuracy (the patches' real JPEG class) is what a perfect estimator and a perfect pre-trained model would reach
with this classifier. The gap between it and a row's accuracy is the estimator's and the pre-trained model's.

    python benchmarks/images/tilted_target.py 4000       # numbers of pairs to try
"""
import sys
from pathlib import Path

import torch
import yaml

from ctrl_bio.labels import exact_log_prob, fit_reward_classifier, load_label
from ctrl_bio.metrics import tilted_accuracy
from domains.images.data import load_patches
from domains.images.domain import ImageDomain

ROOT = Path(__file__).resolve().parents[2]  # configs are read from the repository, whatever the cwd
torch.set_num_threads(1)
domain = ImageDomain()
x = load_patches("test").x
spec = yaml.safe_load(open(ROOT / "configs/label/compress.yaml"))
true = exact_log_prob(spec, domain)(x).argmax(1)
for n in [int(a) for a in sys.argv[1:]] or [4000]:
    spec["pairs"]["n"] = n
    pairs = load_label(spec, domain=domain, seed=7919)  # the suite's seed for its first label
    classifier, report = fit_reward_classifier(pairs, spec, seed=17)
    with torch.no_grad():
        log_p = classifier(x)
    cells = []
    for gamma in (1, 2, 4, 8):
        acc, ess = tilted_accuracy(log_p, true, gamma)
        cells.append(f"gamma {gamma}: accuracy {acc:.3f} (ESS {ess:.0f})")
    print(f"{n} pairs, classifier held-out accuracy {report.accuracy:.3f} | " + " | ".join(cells))
