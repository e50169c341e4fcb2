"""Where does the pre-trained DNA model lose regulatory grammar? Denoise real sequences from noise level t (issue 24).

Real test sequences are noised to x_t ~ p(x_t | x_0) and run back to t_end by the shipped network's reverse SDE on
the suite's step size (round(50 t) Euler-Maruyama steps from t). At small t the result is the real sequence; at
t = 1 it is an unconditional sample. In between, what survives says at which noise levels the model makes the
decisions that carry motif grammar and cell type. For each t, against the real test sequences: identity to the
source (share of bases kept), motif-usage correlation (per cell type, the suite's JASPAR motifs), mean motif hits
per sequence relative to real, 3-mer correlation, and the oracle's agreement with the source's cell type.

    python benchmarks/dna/denoise_from_t.py --n 512 --times 0.1 0.2 0.3 0.4 0.5 0.6 0.8 1.0
"""
import argparse
import json
import time

import torch

from ctrl_bio.sampling import euler_maruyama
from domains.dna.data import CELL_TYPES, base_indices, from_indices, one_hot
from domains.dna.domain import DNADomain
from domains.dna.metrics import kmer_correlation, motif_correlation
from domains.dna.motifs import MotifScanner, load_motifs
from domains.dna.oracle import load_oracle

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n", type=int, default=512, help="real test sequences denoised at each t")
parser.add_argument("--times", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
parser.add_argument("--steps-per-unit", type=int, default=50, help="the suite's 50 steps over t in (t_end, 1]")
parser.add_argument("--t-end", type=float, default=1e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--checkpoint", default=None, help="another pre-trained network (default: the shipped one)")
args = parser.parse_args()
torch.set_num_threads(1)
domain = DNADomain(checkpoint=args.checkpoint)
test = domain.table.of_split("test")
g = torch.Generator().manual_seed(args.seed)
pick = torch.randperm(len(test.sequences), generator=g)[:args.n]
x_real_all = one_hot(test.sequences)
celltype_all = torch.from_numpy(test.celltype)
x0, celltype = x_real_all[pick], celltype_all[pick]
scanner = MotifScanner(load_motifs(None))
oracle = load_oracle()
pretrained = domain.pretrained_model()


def motif_table(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    present = scanner.present(x).double()
    return torch.stack([present[c == k].mean(0) for k in range(len(CELL_TYPES))])


real_freq = motif_table(x_real_all, celltype_all)
real_hits = float(scanner.hits(x_real_all).double().sum(1).mean())
print(json.dumps({"reference": "real test sequences", "n": int(x_real_all.shape[0]),
                  "mean_motif_hits": round(real_hits, 3)}), flush=True)
for t in args.times:
    start = time.perf_counter()
    n_steps = max(1, round(args.steps_per_unit * t))
    times = torch.linspace(t, args.t_end, n_steps + 1)
    with torch.no_grad():
        x_t = domain.sde.perturb(x0, torch.full((x0.shape[0],), t), torch.randn(x0.shape, generator=g))
        out = euler_maruyama(domain.sde, pretrained, x_t, times, generator=g, keep_trajectory=False).x
        x = from_indices(base_indices(out))
        row = {"t": t, "steps": n_steps,
               "identity_to_source": float((base_indices(x) == base_indices(x0)).double().mean()),
               "motif_correlation": motif_correlation(motif_table(x, celltype), real_freq),
               "motif_hits_vs_real": float(scanner.hits(x).double().sum(1).mean()) / real_hits,
               "kmer_correlation": kmer_correlation(x, x_real_all),
               "oracle_keeps_celltype": float((oracle(x).argmax(1) == celltype).double().mean()),
               "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
