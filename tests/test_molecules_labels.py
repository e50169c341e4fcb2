"""The molecule domain's labels (RDKit-exact QED, logP, rings; DFT gap, mu, alpha) and its property oracle.

Everything runs on the shipped 3,000-molecule QM9 slice; nothing is fetched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ctrl_bio.labels import LOG_EPS, evaluation_log_prob, label_specs, load_label
from domains.molecules import labels
from domains.molecules.data import ATOMS, COLS, MAX_ATOMS, N_PAIRS, NO_ATOM, ROWS, encode, smiles_to_graphs
from domains.molecules.domain import MoleculeDomain
from domains.molecules.oracle import SHIPPED_ORACLE, load_oracle, oracle_log_prob, predict_properties

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("qed", "logp", "rings", "gap", "mu", "alpha")

#: RDKit 2024 values of small QM9 molecules: (SMILES, QED, Crippen logP, rings).
KNOWN = [
    ("CC(C)=O", 0.398237, 0.5953, 0),
    ("c1ccoc1", 0.446031, 1.2796, 1),
    ("OC1CC1", 0.419811, 0.1411, 1),
    ("C1CC2CC12", 0.402427, 1.4163, 2),
    ("C12C3C1C23C", 0.393536, 0.8821, 4),
    ("CCO", 0.406808, -0.0014, 0),
]


@pytest.fixture(scope="module")
def domain():
    return MoleculeDomain(data="slice")


def _x(smiles):
    nodes, edges, good, _ = smiles_to_graphs(smiles)
    assert len(good) == len(smiles)
    return encode(nodes, edges)


def _invalid_x():
    """An oxygen with two triple bonds: a graph RDKit rejects."""
    nodes = np.full((1, MAX_ATOMS), NO_ATOM)
    nodes[0, :3] = [ATOMS.index("O"), ATOMS.index("C"), ATOMS.index("C")]
    edges = np.zeros((1, N_PAIRS), dtype=np.int64)
    pair = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(ROWS, COLS))}
    edges[0, pair[(0, 1)]] = edges[0, pair[(0, 2)]] = 3
    return encode(nodes, edges)


def _spec(name, n_pairs=40):
    raw = OmegaConf.load(ROOT / "configs" / "label" / f"{name}.yaml")
    cfg = OmegaConf.create({"data": {"n_pairs": n_pairs}, "label": raw})
    return OmegaConf.to_container(cfg, resolve=True)["label"]


def test_rdkit_labels_are_exact_on_known_molecules():
    x = _x([s for s, *_ in KNOWN])
    for column, name in enumerate(("qed", "logp", "rings"), start=1):
        want = torch.tensor([row[column] for row in KNOWN], dtype=torch.float64)
        torch.testing.assert_close(labels.exact_values(x, name), want, atol=1e-5, rtol=0)
    # Binned: QED 0.446 of furan lies at or above the first edge 0.445; rings 4 is class "3+".
    qed_class = labels.qed_log_prob(None, [0.445, 0.5])(x).argmax(1)
    assert qed_class.tolist() == [0, 1, 0, 0, 0, 0]
    logp_class = labels.logp_log_prob(None, [-0.1, 0.7])(x).argmax(1)
    assert logp_class.tolist() == [1, 2, 1, 2, 2, 1]
    rings_class = labels.rings_log_prob(None, [1, 2, 3])(x).argmax(1)
    assert rings_class.tolist() == [0, 1, 1, 2, 3, 0]


def test_an_invalid_molecule_belongs_to_no_class():
    x = torch.cat([_x(["CCO"]), _invalid_x()])
    for name, edges in (("qed", [0.445, 0.5]), ("logp", [-0.1, 0.7]), ("rings", [1, 2, 3])):
        values = labels.exact_values(x, name)
        assert math.isfinite(values[0]) and math.isnan(values[1])
        lp = labels.exact_log_prob(None, name, edges)(x)
        assert lp.shape == (2, len(edges) + 1)
        assert (lp[0] == 0).sum() == 1
        assert torch.all(lp[1] == LOG_EPS)  # wrong whichever class was requested


def test_pairs_come_from_the_pairs_pool_only(domain):
    table = domain.table
    pairs_idx = set(table.index[table.pairs_pool()].tolist())
    oracle_idx = set(table.index[table.oracle_pool()].tolist())
    test_idx = set(table.of_split("test").index.tolist())
    assert pairs_idx and oracle_idx and not pairs_idx & oracle_idx and not pairs_idx & test_idx
    sub = labels._pool(domain, 60, torch.Generator().manual_seed(3))
    assert len(sub) == 60 and set(sub.index.tolist()) <= pairs_idx
    full = labels._pool(domain, None, torch.Generator().manual_seed(3))
    assert set(full.index.tolist()) == pairs_idx
    # The callables draw exactly that pool's molecules and QM9's own values.
    x, y = labels.property_pairs(domain, 60, torch.Generator().manual_seed(3), property="gap")
    torch.testing.assert_close(x, sub.x())
    torch.testing.assert_close(y, torch.from_numpy(sub.properties["gap"]))
    x, y = labels.rings_pairs(domain, 60, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, sub.x())
    assert not torch.isnan(y).any()
    with pytest.raises(ValueError, match="pairs pool holds"):
        labels._pool(domain, len(pairs_idx) + 1, torch.Generator())


@pytest.mark.parametrize("name", LABELS)
def test_label_yaml_loads_and_its_evaluation_agrees_with_its_pairs(domain, name):
    spec = _spec(name)
    assert spec["name"] == name and spec["domain"] == "molecules" and spec["type"] == "bins"
    assert tuple(spec["bins"]) == labels.BIN_EDGES[name]
    assert tuple((spec.get("exact") or spec.get("oracle"))["kwargs"]["edges"]) == labels.BIN_EDGES[name]
    pairs = load_label(spec, domain=domain, seed=1)
    assert len(pairs) == 40 and pairs.x.shape == (40, 189) and pairs.n_classes == len(spec["bins"]) + 1
    assert pairs.n_skipped == 0
    log_p = evaluation_log_prob(spec, domain)(pairs.x)
    assert log_p.shape == (40, pairs.n_classes)
    agreement = float((log_p.argmax(1) == pairs.y).float().mean())
    if name in labels.EXACT:
        assert "exact" in spec and agreement == 1.0  # the pairs' labels are the exact function's
    else:
        assert "oracle" in spec and "exact" not in spec and agreement > 0.6  # an oracle, not the truth


def test_label_yamls_compose_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train-classifier", overrides=["domain=molecules", f"label=[{','.join(LABELS)}]",
                                                     "data.n_pairs=50"])
    specs = label_specs(OmegaConf.to_container(cfg.label, resolve=True))
    assert [s["name"] for s in specs] == list(LABELS)
    assert all(s["pairs"]["n"] == 50 for s in specs)


def test_shipped_oracle_predicts_dft_values(domain):
    meta = json.loads(SHIPPED_ORACLE.with_suffix(".json").read_text())
    assert set(meta["test_mae"]) == {"gap", "mu", "alpha"}
    oracle = load_oracle()
    assert not any(p.requires_grad for p in oracle.parameters())
    test = domain.table.of_split("test")
    x = test.x()[:200]
    pred = predict_properties(x)
    mae = {k: float((pred[k].double() - torch.from_numpy(test.properties[k][:200])).abs().mean()) for k in pred}
    assert mae["gap"] < 0.4 and mae["mu"] < 0.9 and mae["alpha"] < 2.5, mae
    # The oracle reads the argmax graph: a slightly noisy x is the same molecule.
    noisy = predict_properties(x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    for k in pred:
        torch.testing.assert_close(noisy[k], pred[k])


def test_oracle_log_prob_bins_the_prediction_and_rejects_invalid_molecules(domain):
    x = torch.cat([domain.table.of_split("test").x()[:5], _invalid_x()])
    edges = list(labels.BIN_EDGES["gap"])
    lp = oracle_log_prob(domain, property="gap", edges=edges)(x)
    pred = predict_properties(x)["gap"]
    want = torch.bucketize(pred.double(), torch.tensor(edges, dtype=torch.float64), right=True)
    assert lp[:5].argmax(1).tolist() == want[:5].tolist()
    assert torch.all(lp[5] == LOG_EPS)
    lenient = oracle_log_prob(domain, property="gap", edges=edges, require_valid=False)(x)
    assert int(lenient[5].argmax()) == int(want[5])
    with pytest.raises(ValueError, match="unknown molecule property"):
        oracle_log_prob(domain, property="homo", edges=edges)
