"""DNA domain on the shipped slice: I/O, labels, the label pathway, oracle disjointness, and the suite end to end."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrl_bio.labels import load_label
from domains.dna.data import (
    CELL_TYPES,
    DNADataError,
    decode,
    load_dhs,
    one_hot,
    read_sequences,
    write_fasta,
)
from domains.dna.domain import DNADomain, pathway_settings
from domains.dna.labels import celltype_pairs, gc_content, gc_log_prob, motif_log_prob

ROOT = Path(__file__).resolve().parents[1]
GATA1_SITE = "AGATAAGG"  # the GATA consensus (A/T)GATA(A/G) in its most common erythroid form


@pytest.fixture(scope="module")
def table():
    return load_dhs(source="slice")


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny pre-trained network and a tiny oracle, both trained in seconds on the slice."""
    from ctrl_bio.nets import ConvScoreNet
    from ctrl_bio.training.runs import export_network
    from domains.dna.oracle import save_oracle, train_oracle

    out = tmp_path_factory.mktemp("dna_assets")
    domain = DNADomain(data="slice")
    torch.manual_seed(0)
    net = ConvScoreNet(domain.sde, hidden=16, n_blocks=2, emb_dim=16, n_fourier=8)
    export_network(net, out / "score.safetensors")
    oracle, report = train_oracle(domain.table, hidden=16, epochs=1, progress=False)
    save_oracle(oracle, report, out / "oracle.safetensors")
    return out


def test_slice_has_every_split_and_cell_type(table):
    assert len(table) == 720
    for split in ("training", "validation", "test"):
        sub = table.of_split(split)
        assert np.bincount(sub.celltype, minlength=4).tolist() == [60, 60, 60, 60]
    assert all(len(s) == 200 for s in table.sequences)


def test_one_hot_argmax_identity(table):
    x = one_hot(table.sequences[:50])
    assert x.shape == (50, 4, 200)
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert ((x > 0).sum(dim=1) == 1).all()  # exactly one base per position
    assert decode(x) == table.sequences[:50]
    # Continuous samples decode by their largest channel.
    noisy = x + 0.3 * torch.randn_like(x)
    assert decode(noisy) == decode(noisy.argmax(1).unsqueeze(1).eq(torch.arange(4)[None, :, None]).float())


def test_project_snaps_samples_to_the_one_hot_they_decode_to(table):
    domain, x = DNADomain(data="slice"), one_hot(table.sequences[:20])
    assert torch.equal(domain.project(x), x)
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(domain.project(noisy), one_hot(decode(noisy)))


def test_fasta_round_trip(table, tmp_path):
    path = write_fasta(tmp_path / "s.fasta", table.sequences[:20], [f"r{i}|celltype=K562" for i in range(20)])
    read = read_sequences(path)
    assert read.sequences == table.sequences[:20]
    assert read.ids[0] == "r0|celltype=K562"
    assert not read.skipped


def test_bad_fasta_records_are_skipped_and_counted(table, tmp_path):
    good = table.sequences[0]
    path = tmp_path / "bad.fa"
    path.write_text(f">a\n{good}\n>b\n{good[:-1]}N\n>c\n{good[:150]}\n>a\n{table.sequences[1]}\n>d\n\n"
                    f">e\n{table.sequences[2].lower()}\n")
    read = read_sequences(path)
    assert read.ids == ["a", "e"]  # lower case is upper-cased, not skipped
    assert read.skipped == {"characters other than ACGT": 1, "length != 200": 1, "duplicate id": 1,
                            "empty sequence": 1}


def test_unusable_files_give_one_line(tmp_path):
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    with pytest.raises(DNADataError, match="empty"):
        read_sequences(empty)
    junk = tmp_path / "junk.fasta"
    junk.write_text(">x\nNNNN\n")
    with pytest.raises(DNADataError, match=r"no usable sequence left \(1 characters other than ACGT\)"):
        read_sequences(junk)
    with pytest.raises(DNADataError, match="no such file"):
        read_sequences(tmp_path / "missing.fa")
    csv = tmp_path / "pairs.csv"
    csv.write_text("seq,value\nACGT,1\n")
    with pytest.raises(DNADataError, match="no column 'sequence'"):
        read_sequences(csv)


def test_gc_label_is_exact():
    seqs = ["G" * 50 + "A" * 150, "GC" * 100, "AT" * 80 + "GC" * 20]
    x = one_hot(seqs)
    assert gc_content(x).tolist() == pytest.approx([0.25, 1.0, 0.2])
    classes = gc_log_prob(None, [0.42, 0.48])(x).argmax(1)
    assert classes.tolist() == [0, 2, 0]
    # Edges read as the `bins` type reads them: class k = number of edges <= value.
    at_edge = one_hot(["G" * 84 + "A" * 116])  # GC fraction 0.42 exactly
    assert gc_log_prob(None, [0.42, 0.48])(at_edge).argmax(1).item() == 1


def test_motif_label_on_a_planted_site():
    rng = np.random.default_rng(0)
    # A background of A/C only can never hold GATA; plant the site on the reverse strand at position 90.
    background = "".join(rng.choice(["A", "C"], 200))
    rc_site = GATA1_SITE[::-1].translate(str.maketrans("ACGT", "TGCA"))
    planted = background[:90] + rc_site + background[90 + len(rc_site):]
    present = motif_log_prob(None, "MA0035.5")(one_hot([background, planted])).argmax(1)
    assert present.tolist() == [0, 1]


def test_pairs_never_meet_the_oracle(table):
    domain = DNADomain(data="slice")
    pool, oracle_pool = table.pairs_pool(), table.oracle_pool()
    assert not (pool & oracle_pool).any()
    assert (pool | oracle_pool).sum() == (table.split == "training").sum()
    x, y = celltype_pairs(domain, 30, torch.Generator().manual_seed(0))
    pair_seqs = set(decode(x))
    oracle_seqs = {s for s, m in zip(table.sequences, oracle_pool) if m}
    assert not pair_seqs & oracle_seqs
    assert pair_seqs <= {s for s, m in zip(table.sequences, pool) if m}


@pytest.mark.parametrize("kind", ["conv", "embedding", "lora", "copy"])
def test_zero_initialised_pathway_reproduces_the_pretrained_score(tiny_assets, kind):
    domain = DNADomain(data="slice", checkpoint=str(tiny_assets), pathway={"kind": kind, "hidden": 16}
                       if kind == "conv" else {"kind": kind})
    pre = domain.pretrained_model()
    model = domain.augment(pre, (4, 3))
    x, t = torch.randn(5, 4, 200), torch.rand(5)
    y = torch.tensor([[0, 1], [3, 2], [-1, 0], [2, -1], [-1, -1]])
    s, u = model.score_and_control(x, t, y)
    assert torch.equal(s, pre(x, t))
    assert torch.equal(u, torch.zeros_like(u))
    if kind == "lora":  # adapters go into a copy: the pre-trained network other rows sample from has none
        assert not any("lora_" in name for name, _ in pre.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        s, u = model.score_and_control(x, t, y)
        assert torch.equal(s[4], pre(x, t)[4]) and not torch.allclose(s[:4], pre(x, t)[:4])
    if kind == "copy":  # every weight of the copy trains; the network other rows sample from does not change
        before = {n: p.clone() for n, p in pre.state_dict().items()}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(n.startswith(("net.", "embedding.")) for n in trainable) and len(trainable) > 10
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        s, u = model.score_and_control(x, t, y)
        assert torch.equal(s[4], pre(x, t)[4]) and not torch.allclose(s[:4], pre(x, t)[:4])
        assert all(torch.equal(before[n], p) for n, p in pre.state_dict().items())


def test_pathway_settings_keep_their_kinds_keys_and_refuse_typos(caplog):
    """A command-line kind=lora merges into the default conv keys: those are dropped with a log line, typos raise."""
    conv = {"kind": "conv", "hidden": 64, "n_blocks": 4, "emb_dim": 64}
    assert pathway_settings(conv) == conv
    with caplog.at_level(logging.INFO, logger="domains.dna.domain"):
        assert pathway_settings({**conv, "kind": "lora", "lora_rank": 8}) == {"kind": "lora", "lora_rank": 8}
    assert "emb_dim, hidden, n_blocks" in caplog.text
    with pytest.raises(ValueError, match="hiden"):
        pathway_settings({"kind": "conv", "hiden": 16})
    with pytest.raises(ValueError, match="kind must be one of"):
        pathway_settings({"kind": "unet"})


def test_label_from_a_user_csv_with_no_python(table, tmp_path):
    """docs/dna.md's tutorial: a CSV of (sequence, value) and a YAML label, bad rows skipped and counted."""
    csv = tmp_path / "activity.csv"
    rows = [f"{s},{v:.3f}" for s, v in zip(table.sequences[:40], np.linspace(-1, 1, 40))]
    rows += ["ACGTN" * 40 + ",0.5", "ACGT,0.1", table.sequences[41] + ",not-a-number"]
    csv.write_text("sequence,activity\n" + "\n".join(rows) + "\n")
    spec = {"name": "activity", "domain": "dna", "type": "bins", "bins": [0.0],
            "pairs": {"file": str(csv), "x_column": "sequence", "y_column": "activity"},
            "classifier": {"_target_": "domains.dna.nets.sequence_classifier", "hidden": 16}}
    pairs = load_label(spec, domain=DNADomain(data="slice"))
    assert len(pairs) == 40 and pairs.x.shape == (40, 4, 200)
    assert pairs.y.tolist() == [0] * 20 + [1] * 20
    assert pairs.n_skipped == 3


@pytest.mark.parametrize("label", ["celltype", "gc"])
def test_suite_end_to_end_on_the_slice(tiny_assets, tmp_path, label):
    """`ctrl-bio benchmark suite=dna` with tiny settings: every row, results, FASTA with labels, plots."""
    run_dir = tmp_path / "run"
    overrides = [
        "suite=dna", f"label={label}", "domain.data=slice", f"domain.checkpoint={tiny_assets}", "data.n_pairs=40",
        "domain.pathway.hidden=16", "domain.pathway.n_blocks=1", "domain.pathway.emb_dim=16",
        f"label.{label}.training.epochs=2",
        "suite.n_eval=8", "suite.n_select=8", "suite.n_steps=3", "suite.batch_size=8", "suite.motifs=[MA0035.5]",
        "method.pool_size=32", "method.sm_steps=2", "method.sm_batch_size=8",
        "method.eval_every=2", "method.eval_batch_size=4", "method.steps=1",
        "method.batch_size=2", "method.grad_last_k=1", "suite.alpha0.steps=1",
        "suite.alpha0.batch_size=4", "suite.alpha0.grad_last_k=1", "suite.baselines.cfg.steps=2",
        "suite.baselines.classifier_guidance.steps=2", "suite.baselines.classifier_guidance.hidden=16",
        "suite.baselines.best_of_n.n=2", "suite.baselines.optimum.n=16", "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    if label == "celltype":
        overrides.append(f"+label.celltype.oracle.kwargs.path={tiny_assets / 'oracle.safetensors'}")
    else:  # the line search of J along ctrl's learned control
        overrides.append("method.control_scales=[1.0,2.0]")
    proc = subprocess.run([sys.executable, "-m", "ctrl_bio.cli", "benchmark", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "results.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["pretrained", "optimum", "ctrl", "ctrl_alpha0", "cfg", "classifier_guidance", "dps",
                       "best_of_n", "real_data"]
    assert result["info"]["optimum"]["pool_size"] == 16  # suite.baselines.optimum.n reached the row
    motif_metrics = ("motif_correlation",) if label == "celltype" else ()  # motif content is per cell type
    for row in result["rows"]:
        m = row["metrics"]
        for key in ("accuracy", "macro_f1", "kmer_correlation", "diversity", "novelty", "naturalness",
                    *motif_metrics):
            assert np.isfinite(m[key]), (row["method"], key)
    if label == "gc":  # an exact label: real test sequences meet every request
        assert next(r for r in result["rows"] if r["method"] == "real_data")["metrics"]["accuracy"] == 1.0
        ctrl = next(r for r in result["rows"] if r["method"] == "ctrl")["metrics"]
        per_scale = result["info"]["ctrl"]["per_scale_reward_J"]
        assert set(per_scale) == {"1.0", "2.0"} and per_scale[str(ctrl["guidance_scale"])] == max(per_scale.values())
    fasta = read_sequences(run_dir / "samples" / "ctrl.fasta")
    assert len(fasta.sequences) == 8
    assert fasta.ids[0].split("|")[1] == (f"celltype={CELL_TYPES[0]}" if label == "celltype" else "gc=0")
    plots = [f"per_class_accuracy_{label}.png", "training.png"] + (["motif_scatter.png"] if label == "celltype" else [])
    for plot in plots:
        assert (run_dir / plot).stat().st_size > 0
    assert (run_dir / "motif_scatter.png").exists() == (label == "celltype")
