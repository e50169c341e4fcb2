"""The molecule domain's representation, score network and domain object, on the shipped QM9 slice."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")

from ctrl_bio.domain import check_domain  # noqa: E402
from ctrl_bio.model import NULL_LABEL  # noqa: E402
from ctrl_bio.sde import VPSDE  # noqa: E402
from domains.molecules.data import (  # noqa: E402
    COLS,
    MAX_ATOMS,
    NO_ATOM,
    ROWS,
    X_DIM,
    MoleculeDataError,
    decode,
    encode,
    join_x,
    load_qm9,
    smiles_to_graphs,
    split_x,
    to_smiles,
)
from domains.molecules.domain import MoleculeDomain  # noqa: E402
from domains.molecules.metrics import generation_metrics  # noqa: E402
from domains.molecules.nets import GraphClassifier, GraphScoreNet, edges_to_matrix  # noqa: E402


@pytest.fixture(scope="module")
def table():
    return load_qm9("slice")


def test_slice_is_read_with_charged_molecules_counted(table):
    assert len(table) + sum(table.skipped.values()) == 3000
    assert set(table.skipped) <= {"formal charge"}
    assert table.nodes.shape == (len(table), MAX_ATOMS) and table.edges.shape == (len(table), len(ROWS))


def test_graph_round_trip_is_the_identity(table):
    x = table.x()
    assert x.shape == (len(table), X_DIM) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert to_smiles(decode(x)) == table.smiles


def test_decode_applies_no_valency_correction():
    # Carbon with five single bonds (C bonded to 5 carbons) is not a molecule: it must come out invalid.
    nodes = torch.full((1, MAX_ATOMS), NO_ATOM)
    nodes[0, :6] = 0
    edges = torch.zeros(1, len(ROWS), dtype=torch.long)
    for k, (i, j) in enumerate(zip(ROWS, COLS)):
        if i == 0 and j <= 5:
            edges[0, k] = 1
    assert decode(encode(nodes, edges)) == [None]
    edges[0, 0] = 2  # and a double bond on a pentavalent carbon does not help
    assert decode(encode(nodes, edges)) == [None]


def test_bad_smiles_are_skipped_and_counted():
    nodes, edges, good, skipped = smiles_to_graphs(["CCO", "not a smiles", "", "[NH4+]", "CCCCCCCCCC", "CCCl", "C#N"])
    assert good == [0, 6]
    assert skipped == {"unparsable SMILES": 2, "formal charge": 1, "more than 9 heavy atoms": 1, "element Cl": 1}
    assert to_smiles(decode(encode(nodes, edges))) == ["CCO", "C#N"]


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(MoleculeDataError, match="no such file"):
        load_qm9(str(tmp_path / "missing.csv"))


def test_splits_and_pools_are_disjoint(table):
    test = table.split == "test"
    assert 0.05 < test.mean() < 0.15
    pairs, oracle = table.pairs_pool(), table.oracle_pool()
    assert not (pairs & oracle).any() and not (pairs & test).any() and not (oracle & test).any()
    assert (pairs | oracle | test).all()


def _permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    nodes, edges = split_x(x)
    matrix = edges_to_matrix(edges)[:, perm][:, :, perm]
    return join_x(nodes[:, perm], matrix[:, ROWS, COLS])


def test_score_network_is_permutation_equivariant():
    torch.manual_seed(0)
    net = GraphScoreNet(VPSDE(), hidden=32, edge_hidden=16, n_layers=2, emb_dim=32)
    x, t = torch.randn(3, X_DIM), torch.rand(3)
    perm = torch.randperm(MAX_ATOMS)
    assert torch.allclose(net(_permute(x, perm), t), _permute(net(x, t), perm), atol=1e-5)


def test_classifier_is_permutation_invariant():
    torch.manual_seed(0)
    clf = GraphClassifier(3, hidden=32, edge_hidden=16, n_layers=2, time_conditional=True).eval()
    x, t = torch.randn(4, X_DIM), torch.rand(4)
    perm = torch.randperm(MAX_ATOMS)
    assert torch.allclose(clf(_permute(x, perm), t), clf(x, t), atol=1e-5)


@pytest.mark.parametrize("lora_rank,label_time_features,train_copy", [(0, 0, False), (4, 0, False), (4, 8, False),
                                                                     (0, 0, True)])
def test_zero_initialised_pathway_reproduces_the_pretrained_score(lora_rank, label_time_features, train_copy):
    domain = MoleculeDomain(data="slice", lora_rank=lora_rank, label_time_features=label_time_features,
                            train_copy=train_copy)
    torch.manual_seed(0)
    net = GraphScoreNet(domain.sde, hidden=32, edge_hidden=16, n_layers=2, emb_dim=32).requires_grad_(False)
    before = {n: p.clone() for n, p in net.state_dict().items()}
    model = domain.augment(net, [3])
    x, t = torch.randn(4, X_DIM), torch.rand(4)
    y = torch.tensor([[0], [1], [2], [NULL_LABEL]])
    s, u = model.score_and_control(x, t, y)
    assert torch.equal(s, net(x, t)) and torch.equal(u, torch.zeros_like(u))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # a trained copy: every weight of the copy (net.*) but none of the frozen network beside it (frozen.*)
    expected = ("embedding", "net.") if train_copy else ("embedding", "lora_")
    assert trainable and all(any(k in n for k in expected) for n in trainable)
    assert not any(n.startswith("frozen.") for n in trainable)
    if lora_rank or train_copy:  # after training steps the pathway acts on labelled requests only
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(std=0.1)
        s, u = model.score_and_control(x, t, y)
        assert not torch.equal(s[:3], net(x, t)[:3]) and torch.equal(s[3], net(x, t)[3])
        assert not any("lora_" in n for n, _ in net.named_parameters())
        # the caller's network, which the other rows sample from, is untouched
        assert all(torch.equal(before[n], p) for n, p in net.state_dict().items())


def test_train_copy_needs_no_adapters():
    with pytest.raises(ValueError, match="lora_rank must be 0"):
        MoleculeDomain(data="slice", lora_rank=4, train_copy=True).augment(
            GraphScoreNet(VPSDE(), hidden=32, edge_hidden=16, n_layers=2, emb_dim=32), [3])


def test_project_snaps_noisy_encodings_to_the_graph_they_decode_to(table):
    domain = MoleculeDomain(data="slice")
    x = table.x()[:64]
    assert torch.equal(domain.project(x), x)  # graphs are fixed points
    noisy = 0.8 * x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    projected = domain.project(noisy)
    assert set(projected.unique().tolist()) == {-1.0, 1.0}
    assert to_smiles(decode(projected)) == to_smiles(decode(noisy))


def test_domain_protocol_and_samples_written(table, tmp_path):
    domain = check_domain(MoleculeDomain(data="slice"))
    x, bad = domain.encode_x(["CCO", "xx", "c1ccoc1"])
    assert bad == [1] and x.shape == (2, X_DIM)
    y = torch.tensor([[0], [NULL_LABEL]])
    path = domain.write_samples(x, y, ["qed"], tmp_path)
    lines = path.read_text().splitlines()
    assert lines[0] == "sample,smiles,valid,requested_qed"
    assert lines[1] == "0,CCO,1,0" and lines[2] == "1,c1ccoc1,1,"
    assert (tmp_path / "samples.sdf").read_text().count("$$$$") == 2


def test_generation_metrics_on_known_molecules(table):
    mols = decode(table.x()[:4]) + [None]
    train = set(table.smiles[:2])
    m = generation_metrics(mols, train)
    assert m["validity"] == pytest.approx(4 / 5)
    assert m["uniqueness"] == 1.0
    assert m["novelty"] == pytest.approx(2 / 4)
    two_fragments = decode(encode(torch.tensor([[0, 0] + [NO_ATOM] * 7]), torch.zeros(1, len(ROWS), dtype=torch.long)))
    assert generation_metrics(two_fragments, set())["connected"] == 0.0


@pytest.mark.slow
def test_pretrain_command_runs_on_the_slice(tmp_path):
    from ctrl_bio.cli import main

    main(["pretrain", "domain=molecules", "domain.data=slice", "steps=3", "batch_size=16", "progress=false",
          "domain.score_net.hidden=16", "domain.score_net.edge_hidden=8", "domain.score_net.n_layers=1",
          f"hydra.run.dir={tmp_path}"])
    assert (tmp_path / "score.safetensors").is_file() and (tmp_path / "quality.json").is_file()


@pytest.mark.slow
def test_suite_end_to_end_on_the_slice(tmp_path):
    """`ctrl-bio benchmark suite=molecules` with tiny settings: every row, results, SMILES/SDF/PNG, plots."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from ctrl_bio.training.runs import export_network

    domain = MoleculeDomain(data="slice")
    torch.manual_seed(0)
    export_network(GraphScoreNet(domain.sde, hidden=16, edge_hidden=8, n_layers=1, emb_dim=16),
                   tmp_path / "score.safetensors")
    run_dir = tmp_path / "run"
    overrides = [
        "suite=molecules", "label=qed", "domain.data=slice", f"domain.checkpoint={tmp_path / 'score.safetensors'}",
        "data.n_pairs=60", "label.qed.training.epochs=1", "label.qed.classifier.hidden=16",
        "label.qed.classifier.edge_hidden=8", "label.qed.classifier.n_layers=1",
        "suite.n_eval=9", "suite.n_select=6", "suite.n_steps=3", "suite.batch_size=9",
        "method.pool_size=32", "method.sm_steps=2", "method.sm_batch_size=8",
        "method.eval_every=2", "method.eval_batch_size=4", "method.steps=1",
        "method.batch_size=2", "method.grad_last_k=1", "suite.alpha0.steps=1",
        "suite.alpha0.batch_size=4", "suite.alpha0.grad_last_k=1", "suite.baselines.cfg.steps=2",
        "suite.baselines.classifier_guidance.steps=2", "suite.baselines.classifier_guidance.hidden=16",
        "suite.baselines.best_of_n.n=2", "suite.baselines.optimum.n=18", "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ctrl_bio.cli", "benchmark", *overrides], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["pretrained", "optimum", "ctrl", "ctrl_alpha0", "cfg",
                                                     "classifier_guidance", "dps", "best_of_n", "real_data"]
    assert result["info"]["optimum"]["pool_size"] == 18  # suite.baselines.optimum.n reached the row
    for row in result["rows"]:
        for key in ("accuracy", "macro_f1", "validity", "uniqueness", "novelty", "connected"):
            assert np.isfinite(row["metrics"][key]), (row["method"], key)
    real = next(r for r in result["rows"] if r["method"] == "real_data")["metrics"]
    assert real["accuracy"] == 1.0 and real["validity"] == 1.0  # an exact label: real molecules meet every request
    header = (run_dir / "samples" / "ctrl.csv").read_text().splitlines()[0]
    assert header == "sample,smiles,valid,requested_qed,qed,logp"
    for name in ("ctrl.sdf", "ctrl.png", "real_data.sdf"):
        assert (run_dir / "samples" / name).is_file()
    assert (run_dir / "per_class_accuracy_qed.png").is_file()


@pytest.mark.slow
def test_policy_gradient_rows_query_the_exact_label_as_a_black_box(tmp_path):
    """ctrl_pg and ddpo run in suite=molecules with the RDKit label as their reward (values only), counted queries."""
    import json

    from ctrl_bio.cli import main
    from ctrl_bio.training.runs import export_network

    domain = MoleculeDomain(data="slice")
    torch.manual_seed(0)
    export_network(GraphScoreNet(domain.sde, hidden=16, edge_hidden=8, n_layers=1, emb_dim=16),
                   tmp_path / "score.safetensors")
    pg = "suite.baselines.policy_gradient"
    main(["benchmark", "suite=molecules", "label=qed", "domain.data=slice",
          f"domain.checkpoint={tmp_path / 'score.safetensors'}", "data.n_pairs=60", "label.qed.training.epochs=1",
          "suite.n_eval=6", "suite.n_select=6", "suite.n_steps=3", "suite.batch_size=6",
          "suite.methods=[ctrl_pg,ddpo]", f"{pg}.settings.iterations=2", f"{pg}.settings.batch_size=4",
          f"{pg}.settings.n_steps=3", f"{pg}.settings.reference_pool=8", f"{pg}.settings.reference_updates=2",
          f"{pg}.ddpo.iterations=3", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["method"]: r["metrics"] for r in results["rows"]}
    assert [h["reward_queries"] for h in results["info"]["histories"]["ctrl_pg"]] == [12, 16]  # the curves are kept
    # ctrl_pg: 2 batches of 4 paths plus the 8 scored reference paths; ddpo: 3 batches of 4, no reference pool.
    assert rows["ctrl_pg"]["reward_queries"] == 16 and rows["ddpo"]["reward_queries"] == 12
    assert rows["ctrl_pg"]["failed_rewards"] == 0
    assert (tmp_path / "run" / "reward_vs_queries.png").is_file()


def _tiny_qed_ctrl_run(tmp_path, *method) -> int:
    """Run the molecules suite's ``ctrl`` row alone on the slice with a tiny network and the given ``method.*``
    overrides (later overrides win); the exit status."""
    from ctrl_bio.cli import main
    from ctrl_bio.training.runs import export_network

    domain = MoleculeDomain(data="slice")
    torch.manual_seed(0)
    export_network(GraphScoreNet(domain.sde, hidden=16, edge_hidden=8, n_layers=1, emb_dim=16),
                   tmp_path / "score.safetensors")
    return main(["benchmark", "suite=molecules", "label=qed", "domain.data=slice",
                 f"domain.checkpoint={tmp_path / 'score.safetensors'}", "data.n_pairs=60",
                 "label.qed.training.epochs=1", "suite.n_eval=6", "suite.n_select=6", "suite.n_steps=3",
                 "suite.batch_size=6", "suite.methods=[ctrl]", "method.steps=2", "method.eval_every=2",
                 "method.eval_batch_size=4", *method, "progress=false", f"hydra.run.dir={tmp_path / 'run'}"])


def _tiny_qed_ctrl_row(tmp_path, *method) -> dict:
    """:func:`_tiny_qed_ctrl_run`, which must succeed; the row's info."""
    import json

    assert _tiny_qed_ctrl_run(tmp_path, *method) == 0
    return json.loads((tmp_path / "run" / "results.json").read_text())["info"]["ctrl"]


def test_ctrl_row_draws_no_pool_for_an_estimator_that_reads_none(tmp_path):
    """method.pool / method.pool_size mean nothing to the pathwise estimator: the ctrl row draws no pool for it and its
    info says so, instead of naming a pool nobody read."""
    info = _tiny_qed_ctrl_row(tmp_path, "method.estimator=pathwise", "method.batch_size=2", "method.grad_last_k=1")
    assert info["pool"] is None and info["pool_size"] == 0 and info["pool_ess"] is None


def test_soft_value_with_the_denoised_reward_value_runs_in_the_suite(tmp_path):
    """method.value_model=denoised_reward reaches the soft value: V is the reward classifier at x0_hat with a fitted
    scale a(t), which the row reports; with value_distill=guided the pathway learns on guided paths' states."""
    info = _tiny_qed_ctrl_row(tmp_path, "method.estimator=soft_value", "method.value_model=denoised_reward",
                              "method.value_steps=20", "method.value_batch_size=8", "method.pool_size=16",
                              "method.batch_size=4", "method.value_distill=guided", "method.value_guided_paths=8")
    scale = info["value_scale"]
    assert len(scale) == 9 and all(a >= 0 for a in scale.values())
    assert any(abs(a - 1.0) > 1e-4 for a in scale.values())  # the regression moved a(t) from its initial 1
    assert info["prepared"]["soft_value"]["guided_kl"] > 0


def test_an_undistilled_soft_value_row_samples_with_grad_v_and_saves_v(tmp_path, capsys):
    """method.value_distill=none with method.steps=0: the row fits V, samples s_pre + grad V, says so in its info
    and saves V's fitted weights beside the (untrained) pathway's."""
    from safetensors.torch import load_file

    info = _tiny_qed_ctrl_row(tmp_path, "method.estimator=soft_value", "method.value_model=denoised_reward",
                              "method.value_steps=20", "method.value_batch_size=8", "method.pool_size=16",
                              "method.steps=0", "method.value_distill=none")
    assert info["sampling"].startswith("s_pre + grad V")
    assert info["prepared"]["soft_value"]["value_seconds"] > 0
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "ctrl_value.safetensors"))
    assert any(k.startswith("calibration.") for k in saved)
    # ctrl_alpha0 would continue a pathway nobody trained: refused by name, not run from zero.
    (tmp_path / "alpha0").mkdir()
    assert _tiny_qed_ctrl_run(tmp_path / "alpha0", "method.estimator=soft_value", "method.value_steps=2",
                              "method.pool_size=16", "method.steps=0", "method.value_distill=none",
                              "suite.methods=[ctrl_alpha0]") == 2
    assert "leave ctrl_alpha0 out" in capsys.readouterr().err
