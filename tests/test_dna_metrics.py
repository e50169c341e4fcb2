"""DNA motifs and sample metrics: the torch motif scan against Biopython, metrics against hand counts."""

import math

import numpy as np
import pytest
import torch

from domains.dna import metrics as M
from domains.dna.data import load_dhs, one_hot
from domains.dna.motifs import MotifScanner, load_motifs

GATA1 = "MA0035.5"


def _random_seq(n: int, rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("ACGT"), n))


def _biopython_pssm(motif):
    """Biopython PSSM from the Motif's own log-odds, so the check isolates the scan (not the loading)."""
    from Bio.motifs.matrix import PositionSpecificScoringMatrix

    return PositionSpecificScoringMatrix("ACGT", {b: list(motif.log_odds[i]) for i, b in enumerate("ACGT")})


@pytest.fixture(scope="module")
def gata1():
    return load_motifs([GATA1])[0]


def test_scanner_matches_biopython_on_planted_gata1(gata1):
    from Bio.Seq import Seq

    # Consensus of the PSSM (argmax per column); plant it forward at 40 and reverse-complemented at 120.
    consensus = "".join("ACGT"[i] for i in gata1.log_odds.argmax(0))
    rc = str(Seq(consensus).reverse_complement())
    pssm = _biopython_pssm(gata1)
    rng = np.random.default_rng(1)
    for _ in range(50):  # a background without any GATA1 hit
        background = _random_seq(200, rng)
        if not list(pssm.search(Seq(background), threshold=gata1.threshold)):
            break
    seq = background[:40] + consensus + background[40 + gata1.width: 120] + rc + background[120 + gata1.width:]
    scanner = MotifScanner([gata1])
    bio = list(pssm.search(Seq(seq), threshold=gata1.threshold, both=True))
    # Biopython reports reverse-strand hits at negative positions (position - len(seq)).
    bio_fwd = sorted(p for p, _ in bio if p >= 0)
    bio_rev = sorted(p + len(seq) for p, _ in bio if p < 0)
    assert 40 in bio_fwd and 120 in bio_rev
    scores = scanner.scores(one_hot([seq]))[0]
    ours_fwd = torch.nonzero(scores[0] >= gata1.threshold).flatten().tolist()
    ours_rev = torch.nonzero(scores[1] >= gata1.threshold).flatten().tolist()
    assert (ours_fwd, ours_rev) == (bio_fwd, bio_rev)
    assert scanner.hits(one_hot([seq])).item() == len(bio)
    # Scores themselves agree with Biopython's calculate() at every position.
    bio_scores = pssm.calculate(Seq(seq))
    np.testing.assert_allclose(scores[0, : len(bio_scores)].numpy(), bio_scores, atol=1e-4)
    assert scanner.hits(one_hot([background])).item() == 0
    assert not scanner.present(one_hot([background])).any()


def test_scanner_is_robust_to_continuous_input_and_default_set_loads(gata1):
    motifs = load_motifs()
    assert 30 <= len(motifs) <= 60 and len({m.id for m in motifs}) == len(motifs)
    scanner = MotifScanner(motifs)
    x = one_hot(load_dhs(source="slice").sequences[:64])
    noisy = 0.5 * x + 0.8 * (torch.rand_like(x) - 0.5)  # continuous values, same argmax as x
    assert torch.equal(noisy.argmax(1), x.argmax(1))
    assert torch.equal(scanner.hits(x), scanner.hits(noisy))
    assert scanner.hit_frequencies(x).shape == (len(motifs),)


def test_unknown_motif_id_is_a_value_error():
    with pytest.raises(ValueError, match="unknown motif id 'MA9999.9'"):
        load_motifs(["MA9999.9"])


def test_kmer_spectrum_hand_counts():
    # ACGTACGT has 2-mers AC, CG, GT, TA, AC, CG, GT: AC=2, CG=2, GT=2, TA=1 of 7.
    spec = M.kmer_spectrum(["ACGTACGT"], k=2)
    code = {a + b: 4 * "ACGT".index(a) + "ACGT".index(b) for a in "ACGT" for b in "ACGT"}
    expected = torch.zeros(16, dtype=torch.float64)
    for kmer, n in {"AC": 2, "CG": 2, "GT": 2, "TA": 1}.items():
        expected[code[kmer]] = n / 7
    torch.testing.assert_close(spec, expected)
    seqs = load_dhs(source="slice").sequences[:100]
    assert M.kmer_correlation(seqs, one_hot(seqs)) == pytest.approx(1.0)


def test_diversity_novelty_gc():
    seqs = load_dhs(source="slice").sequences[:50]
    assert M.diversity([seqs[0]] * 5) == 0.0
    assert M.diversity(["AAAA", "CCCC"]) == 1.0
    assert M.novelty(seqs[3:4], seqs) == 0.0
    assert M.novelty(["AACC"], ["AAAA", "CCCC"]) == 0.5
    assert M.nearest_distance(["AACC", "GGGG", "AAAC"], ["AAAA", "CCCC"]).tolist() == [2, 4, 1]
    torch.testing.assert_close(M.kmer_entropy(["AAAAAAAA", "ACACACAC", "AACCGGTT"], k=1),
                               torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(M.gc_content(["ACGT", "GGCA", "TTTT"]),
                               torch.tensor([0.5, 0.75, 0.0], dtype=torch.float64))


def test_markov_model_normalises_and_prefers_real_dna():
    table = load_dhs(source="slice")
    train, test = table.of_split("training"), table.of_split("test")
    mm = M.MarkovModel(train.sequences, k=3)
    torch.testing.assert_close(mm.log_probs.exp().sum(1), torch.ones(4**3, dtype=torch.float64))
    rng = np.random.default_rng(0)
    random = [_random_seq(200, rng) for _ in range(len(test))]
    real_ll, random_ll = mm.log_likelihood_per_base(test.sequences), mm.log_likelihood_per_base(random)
    assert real_ll.mean() > random_ll.mean() + 0.02
    # A model of uniform DNA gives exactly -log 4 per base.
    uniform = M.MarkovModel(["ACGT"], k=0, both_strands=False)
    uniform.log_probs = torch.full((1, 4), -math.log(4), dtype=torch.float64)
    assert uniform.log_likelihood_per_base(["ACGTTT"]).item() == pytest.approx(-math.log(4))


def test_motif_correlations_and_zero_variance():
    rng = np.random.default_rng(0)
    freq = torch.from_numpy(rng.uniform(0, 0.5, (4, 20)))
    assert M.motif_correlation(freq, freq) == pytest.approx(1.0)
    assert M.motif_contrast_correlation(freq, freq) == pytest.approx(1.0)
    flat = freq.mean(0, keepdim=True).expand(4, -1)  # class-independent: all contrasts are zero
    assert M.motif_contrast_correlation(flat, freq) == 0.0
    assert M.motif_correlation(torch.zeros(4, 20), freq) == 0.0
