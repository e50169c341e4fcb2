"""Oracle accuracy of CTRL's optimum on the DNA celltype label, without any fine-tuning.

The optimum of J with reward classifier p(y|x) is p(x|y) ∝ p_pre(x) p(y|x)^gamma. Importance-weighting real test
sequences (never seen by the oracle or the classifier) by p(y|x)^gamma gives that distribution with p_data in place
of p_pre, and its oracle accuracy is what a perfect estimator would reach with this classifier. ``--pretrained N``
weights N samples of the shipped pre-trained model instead (the suite's 50-step sampler, argmax-decoded): that is
the optimum with the actual p_pre, the most any estimator can reach from this pre-trained model.

    python benchmarks/dna/tilted_target.py 2000 7877              # numbers of pairs to try
    python benchmarks/dna/tilted_target.py --pretrained 8192 7877
    python benchmarks/dna/tilted_target.py --pretrained 8192 --checkpoint runs/pretrain_dna_30k 7877

Recorded (2026-11-30, one thread): 2,000 pairs: classifier 0.425, accuracy 0.33 / 0.38 / 0.45 / 0.53 at
gamma 1 / 2 / 4 / 8; 7,877 pairs (the whole pool): classifier 0.641, accuracy 0.52 / 0.69 / 0.82 / 0.90
(effective sample size per class at gamma 4: 546 of 4,565; the optimum's J* -1.39 / -2.06 / -2.76 / -3.48 at gamma
1 / 2 / 4 / 8, about 3 min). With --pretrained 8192 (7,877 pairs): accuracy
0.250 / 0.381 / 0.474 / 0.583 / 0.689 / 0.779 at gamma 0 / 1 / 2 / 4 / 8 / 16, effective sample size per class
8,192 / 4,579 / 2,143 / 776 / 267 / 94 (about 30 min wall beside three other runs). With --checkpoint
runs/pretrain_dna_30k (the same network pre-trained 30,000 steps; benchmarks/dna/README.md): 0.250 / 0.388 / 0.484 /
0.594 / 0.694 / 0.776, effective sample size 8,192 / 4,543 / 2,290 / 854 / 304 / 111.
"""
import argparse
import sys
from pathlib import Path

import torch
import yaml

from ctrl_bio.finetune import sample_pretrained_pool
from ctrl_bio.labels import LabelledPairs, fit_reward_classifier, load_label
from ctrl_bio.metrics import tilted_accuracy, tilted_objective
from ctrl_bio.reward import LabelPrior
from domains.dna.data import base_indices, from_indices, one_hot
from domains.dna.domain import DNADomain
from domains.dna.metrics import kmer_codes
from domains.dna.oracle import load_oracle


def kmeans_groups(idx: torch.Tensor, n_clusters: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """(N,) k-means cluster (Lloyd, cosine) of each sequence's standardised 4-mer spectrum: groups found without y."""
    codes = kmer_codes(idx, 4)
    spec = torch.zeros(len(idx), 256).scatter_add_(1, codes, torch.ones(codes.shape))
    spec = torch.nn.functional.normalize((spec - spec.mean(0)) / spec.std(0).clamp_min(1e-6), dim=1)
    centres = spec[torch.randperm(len(spec), generator=generator)[:n_clusters]]
    for _ in range(iters):
        assign = (spec @ centres.T).argmax(1)
        centres = torch.nn.functional.normalize(
            torch.zeros_like(centres).index_add_(0, assign, spec) + 1e-8, dim=1)
    return assign


ROOT = Path(__file__).resolve().parents[2]  # configs are read from the repository, whatever the cwd
GAMMAS = (0, 1, 2, 4, 8, 16)


def pretrained_samples(domain: DNADomain, n: int, seed: int = 0) -> torch.Tensor:
    """n samples of the domain's pre-trained network with the suite's 50-step sampler, argmax-decoded."""
    net = domain.augment(domain.pretrained_model(), [4]).eval()
    with torch.no_grad():
        x = sample_pretrained_pool(net, domain.sde, domain.x_shape, n, n_steps=50, t_end=1e-3,
                                   batch_size=512, generator=torch.Generator().manual_seed(seed))
    return from_indices(base_indices(x))


def celltype_pairs_and_reward(domain: DNADomain, n_pairs: int = 7877) -> tuple[LabelledPairs, torch.nn.Module, float]:
    """The suite's celltype pairs (``n_pairs`` of them, the suite's seeds), the reward classifier fitted on them and its
    held-out accuracy.

    It depends on the data table only, not on the pre-trained network, so one fit serves every set of samples.
    """
    spec = yaml.safe_load(open(ROOT / "configs/label/celltype.yaml"))
    spec["pairs"]["n"] = n_pairs
    pairs = load_label(spec, domain=domain, seed=7919)  # the suite's seed for its first label
    classifier, report = fit_reward_classifier(pairs, spec, seed=17)
    return pairs, classifier, report.accuracy


def fit_celltype_reward(domain: DNADomain, n_pairs: int = 7877) -> tuple[torch.nn.Module, float]:
    """The suite's celltype reward classifier and its held-out accuracy (:func:`celltype_pairs_and_reward`)."""
    return celltype_pairs_and_reward(domain, n_pairs)[1:]


def celltype_value_setup(pool_size: int) -> tuple[DNADomain, torch.nn.Module, LabelPrior, torch.Tensor]:
    """What the soft value probes (``value_guidance.py``, ``value_distillation.py``) share: the domain, the celltype
    reward classifier, the label prior of its pairs and ``pool_size`` training sequences (a fixed random subset) for
    V's regression."""
    domain = DNADomain()
    pairs, classifier, _ = celltype_pairs_and_reward(domain)
    x_train = domain.training_data()
    pool = x_train[torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(7100))[:pool_size]]
    return domain, classifier, LabelPrior.from_labels([pairs.y], [4]), pool


def celltype_optimum(x: torch.Tensor, classifier: torch.nn.Module, gammas=GAMMAS) -> list[tuple]:
    """[(gamma, oracle accuracy, ESS, J*)] of the optimum p(x) p(y|x)^gamma on samples x of p(x)."""
    oracle = load_oracle()
    with torch.no_grad():
        oracle_pred = torch.cat([oracle(x[i:i + 1024]) for i in range(0, len(x), 1024)]).argmax(1)
        log_p = torch.cat([classifier(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    return [(g, *tilted_accuracy(log_p, oracle_pred, g), tilted_objective(log_p, g)) for g in gammas]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=int, nargs="*", default=[7877])
    parser.add_argument("--pretrained", type=int, default=0, help="weight this many pre-trained samples, not test data")
    parser.add_argument("--checkpoint", default=None,
                        help="a pretrain run directory or .safetensors (default: shipped)")
    parser.add_argument("--markov", type=int, default=0, metavar="K",
                        help="with --pretrained N: weight N samples of an order-K Markov chain fitted to the training "
                             "data")
    parser.add_argument("--clusters", type=int, default=0, metavar="C",
                        help="with --markov: one chain per k-means cluster of the 4-mer spectra (no cell types used)")
    parser.add_argument("--per-celltype", action="store_true",
                        help="with --markov: one chain per cell type, mixed in the training proportions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    domain = DNADomain(checkpoint=args.checkpoint)
    if args.pretrained and args.markov:
        sys.path.insert(0, str(Path(__file__).parent))
        from markov_reference import fit_markov, sample_markov

        train_idx, g = base_indices(domain.training_data()), torch.Generator().manual_seed(0)
        if args.per_celltype or args.clusters:  # a sequence commits to one group's k-mer statistics end to end
            if args.per_celltype:
                cell, what = torch.from_numpy(domain.table.of_split("training").celltype), "cell type"
            else:
                cell, what = kmeans_groups(train_idx, args.clusters, g), f"k-means cluster of {args.clusters}"
            counts = torch.bincount(cell[torch.randint(len(cell), (args.pretrained,), generator=g)],
                                    minlength=int(cell.max()) + 1)
            idx = torch.cat([sample_markov(*fit_markov(train_idx[cell == k], args.markov), args.markov, int(n),
                                           domain.x_shape[-1], g) for k, n in enumerate(counts)])
            source = f"{args.pretrained} samples of a mixture of order-{args.markov} Markov chains, one per {what}"
        else:
            idx = sample_markov(*fit_markov(train_idx, args.markov), args.markov, args.pretrained,
                                domain.x_shape[-1], g)
            source = f"{args.pretrained} samples of an order-{args.markov} Markov chain"
        x = from_indices(idx)
    elif args.pretrained:
        x, source = pretrained_samples(domain, args.pretrained), f"{args.pretrained} pre-trained samples"
    else:
        x, source = one_hot(domain.table.of_split("test").sequences), "real test sequences"
    for n in args.pairs:
        classifier, accuracy = fit_celltype_reward(domain, n)
        rows = celltype_optimum(x, classifier)
        cells = [f"gamma {g}: accuracy {acc:.3f} (ESS {ess:.0f}, J* {j:.2f})" for g, acc, ess, j in rows]
        print(f"{source}, {n} pairs, classifier held-out accuracy {accuracy:.3f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
