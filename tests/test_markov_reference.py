"""benchmarks/dna/markov_reference.py: the k-mer chain's forward-backward denoiser is exact (issue 24's reference)."""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "dna" / "markov_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("markov_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("order", [1, 2, 3])
def test_posterior_marginals_match_enumeration(ref, order):
    g = torch.Generator().manual_seed(order)
    idx = torch.randint(0, 4, (300, 7), generator=g)
    idx[:, 3] = (idx[:, 2] + 1) % 4  # structure the chain has to carry
    init, trans = ref.fit_markov(idx, order)
    length = 6
    emit = torch.randn(2, length, 4, dtype=torch.float64, generator=g)
    post = ref.markov_posterior(emit, init, trans, order)
    seqs = torch.tensor(list(itertools.product(range(4), repeat=length)))
    log_p = _enumerated_log_p(init, trans, order, seqs)
    for b in range(2):
        w = torch.softmax(log_p + emit[b, torch.arange(length), seqs].sum(1), 0)
        exact = torch.stack([torch.zeros(4, dtype=torch.float64).index_add_(0, seqs[:, i], w) for i in range(length)])
        torch.testing.assert_close(post[b], exact)


def test_chain_samples_follow_the_fitted_transitions(ref):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4, (2000, 30), generator=g)
    idx[:, 1:] = torch.where(idx[:, 1:] == 3, (idx[:, :-1] + 1) % 4, idx[:, 1:])  # 'next = prev + 1' is enriched
    init, trans = ref.fit_markov(idx, 1)
    samples = ref.sample_markov(init, trans, 1, 4000, 30, g)
    follows = ((samples[:, 1:] - samples[:, :-1]) % 4 == 1).double().mean()
    expected = ((idx[:, 1:] - idx[:, :-1]) % 4 == 1).double().mean()
    assert abs(float(follows - expected)) < 0.01


def _enumerated_log_p(init, trans, order, seqs):
    state = torch.zeros(len(seqs), dtype=torch.long)
    for j in range(order):
        state = state * 4 + seqs[:, j]
    log_p = init[state].clone()
    for i in range(order, seqs.shape[1]):
        log_p += trans[state, seqs[:, i]]
        state = (state % 4 ** (order - 1)) * 4 + seqs[:, i]
    return log_p


def test_mixture_of_chains_posterior_matches_enumeration(ref):
    g = torch.Generator().manual_seed(5)
    order, length = 2, 5
    a = torch.randint(0, 2, (400, 7), generator=g)  # one component uses A/C, the other G/T
    chains = [ref.fit_markov(a, order), ref.fit_markov(a + 2, order)]
    log_weights = torch.tensor([0.3, 0.7], dtype=torch.float64).log()
    emit = torch.randn(2, length, 4, dtype=torch.float64, generator=g)
    post = ref.mixture_posterior(emit, chains, log_weights, order)
    seqs = torch.tensor(list(itertools.product(range(4), repeat=length)))
    per_chain = torch.stack([_enumerated_log_p(init, trans, order, seqs) for init, trans in chains])
    log_p = torch.logsumexp(per_chain + log_weights[:, None], dim=0)
    for b in range(2):
        w = torch.softmax(log_p + emit[b, torch.arange(length), seqs].sum(1), 0)
        exact = torch.stack([torch.zeros(4, dtype=torch.float64).index_add_(0, seqs[:, i], w) for i in range(length)])
        torch.testing.assert_close(post[b], exact)
