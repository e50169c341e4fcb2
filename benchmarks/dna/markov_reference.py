"""Does the pre-trained DNA network know more than k-mer statistics? A data-only reference per noise level (issue 24).

An order-k Markov chain fitted to the training split is a distribution whose exact denoiser E[x_0 | x_t] is
computable: under the domain's Gaussian one-hot ({-1, +1}, VP-SDE), x_t at each position is a noisy observation of
one base, so the posterior over bases is a hidden-Markov forward-backward over the 4^k k-mer states. The
denoising error of that exact denoiser on held-out test sequences, per t, is what k-mer statistics alone buy. The
shipped network's error beside it (on test and on training sequences) says at which noise levels the network
uses structure beyond k-mers, and whether it overfits. Samples of the chain, of the network and held-out real
sequences are then scored against the test sequences with the motif statistics of ``denoise_from_t.py``: if a
k-mer chain samples motifs as well as the network, the network has learned local statistics and no grammar.

    python benchmarks/dna/markov_reference.py --orders 1 3 5 --n 512

Errors are the summed squared error of x0_hat over the 4 x 200 one-hot entries (0 = exact; 400 = predicting 0
everywhere for a uniform base) and the share of bases whose argmax is right; ``eps_loss`` is the same error in
the units of the DSM training loss, alpha_t^2 / sigma_t^2 times the x_0 error.
"""
import argparse
import json
import time

import torch

from ctrl_bio.sampling import euler_maruyama, time_grid
from domains.dna.data import base_indices, from_indices, one_hot
from domains.dna.domain import DNADomain
from domains.dna.metrics import MarkovModel, kmer_codes, kmer_correlation
from domains.dna.motifs import MotifScanner, load_motifs


def fit_markov(idx: torch.Tensor, order: int, pseudocount: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-k chain from (N, L) base indices: log p(first k-mer) (4^k,) and log p(next base | k-mer) (4^k, 4),
    the transitions those of the naturalness metric's :class:`MarkovModel` on one strand."""
    init = torch.bincount(kmer_codes(idx[:, :order], order)[:, 0], minlength=4**order).double() + pseudocount
    trans = MarkovModel(from_indices(idx), order, both_strands=False, pseudocount=pseudocount).log_probs
    return (init / init.sum()).log(), trans


def state_digits(order: int) -> torch.Tensor:
    """(4^k, k) the bases of each k-mer state, most significant first."""
    codes = torch.arange(4**order)
    return torch.stack([(codes // 4**(order - 1 - j)) % 4 for j in range(order)], dim=1)


def markov_posterior(emit: torch.Tensor, init: torch.Tensor, trans: torch.Tensor, order: int,
                     with_evidence: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior marginals p(base_i | x_t) (B, L, 4) of an order-k chain from emission log-likelihoods
    (B, L, 4), by forward-backward over k-mer states (state at position i = the k-mer ending at i); with
    ``with_evidence`` also log p(x_t) (B,) up to the terms the emissions leave out (the same for every chain)."""
    batch, length, _ = emit.shape
    n_states, rest = 4**order, 4**(order - 1)
    digits = state_digits(order)
    trans3 = trans.view(4, rest, 4)  # [top base of the k-mer, the other k-1 bases, next base]
    first = init + sum(emit[:, p, digits[:, p]] for p in range(order))  # (B, S): the first k-mer and its emissions
    fwd = [first]
    for i in range(order, length):
        prev = fwd[-1].view(batch, 4, rest, 1)
        nxt = torch.logsumexp(prev + trans3, dim=1) + emit[:, i, None, :]  # (B, rest, 4) = state r*4 + b
        fwd.append(nxt.reshape(batch, n_states))
    bwd = [torch.zeros(batch, n_states, dtype=emit.dtype)]
    for i in range(length - 1, order - 1, -1):
        after = bwd[0].view(batch, 1, rest, 4)
        cur = torch.logsumexp(trans3 + emit[:, i, None, None, :] + after, dim=-1)  # (B, 4, rest)
        bwd.insert(0, cur.reshape(batch, n_states))
    post = torch.empty(batch, length, 4, dtype=emit.dtype)
    for pos, (f, b) in enumerate(zip(fwd, bwd)):
        log_state = f + b
        log_state = log_state - torch.logsumexp(log_state, dim=1, keepdim=True)
        state_p = log_state.exp()
        if pos == 0:  # the first k-mer carries the first k positions
            for p in range(order):
                post[:, p] = torch.zeros(batch, 4, dtype=emit.dtype).index_add_(1, digits[:, p], state_p)
        else:
            post[:, order - 1 + pos] = state_p.view(batch, rest, 4).sum(1)
    return (post, torch.logsumexp(fwd[-1], dim=1)) if with_evidence else post


def mixture_posterior(emit: torch.Tensor, chains: list[tuple[torch.Tensor, torch.Tensor]], log_weights: torch.Tensor,
                      order: int) -> torch.Tensor:
    """Posterior marginals (B, L, 4) of a mixture of order-k chains: each chain's marginals weighted by its
    posterior probability given x_t, p(component | x_t) ∝ weight * p_component(x_t). A sequence drawn from
    it keeps one component's statistics from end to end, which a single chain cannot express."""
    parts = [markov_posterior(emit, init, trans, order, with_evidence=True) for init, trans in chains]
    resp = torch.softmax(torch.stack([log_z for _, log_z in parts], 1) + log_weights, dim=1)  # (B, K)
    return sum(resp[:, k, None, None] * post for k, (post, _) in enumerate(parts))


def sample_markov(init: torch.Tensor, trans: torch.Tensor, order: int, n: int, length: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(n, length) base indices drawn from the chain."""
    digits = state_digits(order)
    state = torch.multinomial(init.exp(), n, replacement=True, generator=generator)
    out = [digits[state, p] for p in range(order)]
    for _ in range(order, length):
        base = torch.multinomial(trans[state].exp(), 1, generator=generator).squeeze(1)
        out.append(base)
        state = (state % 4**(order - 1)) * 4 + base
    return torch.stack(out, dim=1)


class SampleStatistics:
    """Motif and k-mer statistics of samples against a reference set (real test sequences): the share of strong
    JASPAR hits per sequence against the reference's, the correlation of per-motif hit frequencies (motif usage),
    and 3-mer and 6-mer spectrum correlations."""

    def __init__(self, reference: torch.Tensor):
        self.reference = reference
        self.scanner = MotifScanner(load_motifs(None))
        self.hits = self.scanner.hits(reference).double().sum(1).mean()
        self.freq = self.scanner.hit_frequencies(reference)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        freq = self.scanner.hit_frequencies(x)
        return {"motif_hits_vs_real": float(self.scanner.hits(x).double().sum(1).mean() / self.hits),
                "motif_usage_correlation": float(torch.corrcoef(torch.stack([freq, self.freq]))[0, 1]),
                "kmer3_correlation": kmer_correlation(x, self.reference, 3),
                "kmer6_correlation": kmer_correlation(x, self.reference, 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--n", type=int, default=512, help="test (and training) sequences denoised at each t")
    parser.add_argument("--times", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7])
    parser.add_argument("--n-samples", type=int, default=1024, help="samples of each model scored for motifs")
    parser.add_argument("--steps", type=int, default=50, help="the network's sampler steps (the suite's 50)")
    parser.add_argument("--checkpoint", default=None, help="another pre-trained network (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-celltype", action="store_true",
                        help="also the exact denoiser of a mixture of chains, one per training cell type: how much "
                             "the denoising loss rewards a sequence that keeps to one cell type")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    domain = DNADomain(checkpoint=args.checkpoint)
    sde, net = domain.sde, domain.pretrained_model()
    train_idx = base_indices(domain.training_data())
    test_x = one_hot(domain.table.of_split("test").sequences)
    chains = {k: fit_markov(train_idx, k) for k in args.orders}
    if args.per_celltype:
        cell = torch.from_numpy(domain.table.of_split("training").celltype)
        components = {k: [fit_markov(train_idx[cell == c], k) for c in range(int(cell.max()) + 1)]
                      for k in args.orders}
        log_weights = (torch.bincount(cell).double() / len(cell)).log()
    picks = {"test": test_x[torch.randperm(len(test_x), generator=g)[:args.n]],
             "train": from_indices(train_idx[torch.randperm(len(train_idx), generator=g)[:args.n]])}

    def report(row: dict) -> None:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    for t in args.times:
        start = time.perf_counter()
        tt = torch.tensor(t)
        alpha, sigma = float(sde.alpha(tt)), float(sde.sigma(tt))
        snr = alpha**2 / sigma**2
        for split, x0 in picks.items():
            t_vec = torch.full((len(x0),), t)
            x_t = sde.perturb(x0, t_vec, torch.randn(x0.shape, generator=g))
            estimates = {}
            with torch.no_grad():
                estimates["network"] = sde.denoise(x_t, t_vec, net(x_t, t_vec))
            if split == "test":
                # log N(x_t; alpha v_b, sigma^2) up to terms common to all bases b: v_b = 2 e_b - 1.
                emit = (2 * alpha / sigma**2 * x_t.double()).permute(0, 2, 1)
                for k, (init, trans) in chains.items():
                    post = torch.cat([markov_posterior(e, init, trans, k) for e in emit.split(128)])
                    estimates[f"markov{k}"] = (2 * post - 1).permute(0, 2, 1).float()
                    if args.per_celltype:
                        post = torch.cat([mixture_posterior(e, components[k], log_weights, k) for e in emit.split(128)])
                        estimates[f"markov{k}_per_celltype"] = (2 * post - 1).permute(0, 2, 1).float()
            for name, x0_hat in estimates.items():
                err = float(((x0_hat - x0) ** 2).sum((1, 2)).mean())
                report({"t": t, "snr": snr, "split": split, "denoiser": name, "x0_error": err, "eps_loss": snr * err,
                        "base_accuracy": float((base_indices(x0_hat) == base_indices(x0)).double().mean()),
                        "seconds": round(time.perf_counter() - start, 1)})

    if not args.n_samples:
        return
    # Samples of each model against the test sequences.
    reference = SampleStatistics(test_x)

    def score(name: str, x: torch.Tensor) -> None:
        report({"samples": name, "n": len(x), **reference(x)})

    score("real_train", from_indices(train_idx[torch.randperm(len(train_idx), generator=g)[:args.n_samples]]))
    for k, (init, trans) in chains.items():
        score(f"markov{k}", from_indices(sample_markov(init, trans, k, args.n_samples, test_x.shape[-1], g)))
    with torch.no_grad():
        x_init = sde.prior_sampling((args.n_samples, *test_x.shape[1:]), generator=g)
        out = euler_maruyama(sde, net, x_init, time_grid(args.steps), generator=g, keep_trajectory=False).x
    score("network", from_indices(base_indices(out)))


if __name__ == "__main__":
    main()
