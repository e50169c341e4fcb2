"""Label configs: reading pairs, validation in one line, skipped rows counted, classifiers from the config."""

import pytest
import torch

from ctrl_bio.labels import LabelError, fit_reward_classifier, label_specs, load_label, split_pairs


class VectorDomain:
    name = "gmm"
    label_types = ("categorical", "bins")
    x_shape = (2,)


def write_csv(path, rows, header="x0,x1,y"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def spec_for(path, **changes):
    spec = {"name": "toy", "domain": "gmm", "type": "categorical", "classes": ["low", "high"],
            "pairs": {"file": str(path), "x_columns": ["x0", "x1"], "y_column": "y"}}
    spec.update(changes)
    return spec


def test_csv_pairs_are_read_and_bad_rows_counted(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["0.5,1.0,low", "1.5,-2,high", "oops,1,low", "1,2,", "0,0,high",
                                          "nan,1,low"])
    pairs = load_label(spec_for(path), domain=VectorDomain())
    assert pairs.x.tolist() == [[0.5, 1.0], [1.5, -2.0], [0.0, 0.0]]
    assert pairs.y.tolist() == [0, 1, 1]
    assert pairs.skipped == {"unparseable x": 2, "missing y": 1} and pairs.n_skipped == 3
    assert pairs.n_classes == 2 and pairs.source == str(path)


def test_bins_assign_classes_by_edges(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["0,0,-1.0", "0,0,0.2", "0,0,0.5", "0,0,7"])
    pairs = load_label(spec_for(path, type="bins", bins=[0.0, 0.5], classes=None), domain=VectorDomain())
    assert pairs.y.tolist() == [0, 1, 2, 2] and pairs.n_classes == 3


@pytest.mark.parametrize("change,needle", [
    ({"classes": ["low"]}, "value 'high' (pair 2) is outside the label's 1 classes"),
    ({"type": "continuous"}, "domain 'gmm' cannot take 'continuous' labels"),
    ({"type": "ordinal"}, "unknown type 'ordinal'"),
    ({"domain": "dna"}, "the label is for domain 'dna'"),
    ({"pairs": {"file": "missing.csv", "x_columns": ["x0"], "y_column": "y"}}, "no such file 'missing.csv'"),
    ({"type": "bins", "bins": [1.0, 0.0]}, "field 'bins' must be a non-empty increasing list"),
])
def test_bad_definitions_fail_in_one_line(tmp_path, change, needle):
    path = write_csv(tmp_path / "p.csv", ["0,0,low", "1,1,high", "2,2,high"])
    with pytest.raises(LabelError) as err:
        load_label(spec_for(path, **change), domain=VectorDomain())
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_column_names_file_and_header(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["0,0,low"])
    spec = spec_for(path)
    spec["pairs"]["y_column"] = "label"
    with pytest.raises(LabelError, match=r"p\.csv.*column 'label', not in the header \(x0, x1, y\)"):
        load_label(spec, domain=VectorDomain())


def test_nothing_usable_left_is_an_error(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["a,0,low", "b,1,high"])
    with pytest.raises(LabelError, match="0 usable pairs left"):
        load_label(spec_for(path), domain=VectorDomain())


def test_shape_mismatch_with_the_domain(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["0,0,1,low", "1,1,1,high", "2,2,2,high"], header="x0,x1,x2,y")
    spec = spec_for(path)
    spec["pairs"]["x_columns"] = ["x0", "x1", "x2"]
    with pytest.raises(LabelError, match=r"x has shape \(3,\) per pair, the domain's samples have \(2,\)"):
        load_label(spec, domain=VectorDomain())


def test_callable_pairs_and_calibrated_classifier(small_testbed):
    spec = {"name": "component", "domain": "gmm", "type": "categorical", "classes": 2,
            "pairs": {"callable": "domains.gmm.pairs:component_pairs", "n": 600},
            "classifier": {"_target_": "ctrl_bio.reward.flat_mlp_classifier", "hidden": 32, "depth": 2},
            "training": {"epochs": 40}}
    pairs = load_label(spec, domain=small_testbed, seed=1)
    assert len(pairs) == 600 and pairs.y.unique().tolist() == [0, 1]
    train, held_out = split_pairs(pairs, 0.3, torch.Generator().manual_seed(0))
    assert len(train) + len(held_out) == 600
    clf, report = fit_reward_classifier(train, spec, seed=0)
    bayes = small_testbed.component_label.bayes_label(held_out.x)
    # The learned classifier agrees with the Bayes classifier of the true mixture on unseen pairs.
    assert (clf(held_out.x).argmax(1) == bayes).float().mean() > 0.95
    assert report.nll_after <= report.nll_before + 1e-6


def test_label_specs_accepts_packaged_and_bare_definitions():
    one = {"name": "a", "type": "categorical", "pairs": {}}
    assert label_specs(one) == [one]
    assert label_specs({"a": one, "b": one | {"name": "b"}})[1]["name"] == "b"


class SequenceDomain:
    """A text x column encoded by the domain (as DNA will be): 'ab' strings of length 2, one-hot."""

    name = "toyseq"
    label_types = ("categorical",)
    x_shape = (2, 2)

    @staticmethod
    def encode_x(texts):
        good = [i for i, t in enumerate(texts) if len(t) == 2 and set(t) <= {"a", "b"}]
        x = torch.zeros(len(good), 2, 2)
        for row, i in enumerate(good):
            for pos, ch in enumerate(texts[i]):
                x[row, "ab".index(ch), pos] = 1.0
        return x, [i for i in range(len(texts)) if i not in set(good)]


def test_a_text_column_is_encoded_by_the_domain_and_bad_sequences_counted(tmp_path):
    path = tmp_path / "seqs.csv"
    path.write_text("seq,y\nab,0\nbb,1\nabc,1\nxz,0\nba,1\n")
    spec = {"name": "toy", "domain": "toyseq", "type": "categorical", "classes": 2,
            "pairs": {"file": str(path), "x_column": "seq", "y_column": "y"}}
    pairs = load_label(spec, domain=SequenceDomain())
    assert pairs.x.shape == (3, 2, 2) and pairs.y.tolist() == [0, 1, 1]
    assert pairs.skipped == {"invalid x": 2}
    torch.testing.assert_close(pairs.x[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_values_beyond_float32_are_skipped_not_turned_into_inf(tmp_path):
    """1e39 is finite in float64 but inf in float32: a row holding it would end training with a NaN loss."""

    class ContinuousDomain(VectorDomain):
        label_types = ("continuous",)

    path = write_csv(tmp_path / "p.csv", ["0,0,0.5", "1e39,0,1.0", "1,1,-1e39", "2,2,2.5", "3,3,1e38"])
    pairs = load_label(spec_for(path, type="continuous", classes=None), domain=ContinuousDomain())
    assert pairs.skipped == {"x outside float32 range": 1, "y outside float32 range": 1}
    assert torch.isfinite(pairs.x).all() and torch.isfinite(pairs.y).all() and len(pairs) == 3


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("x0,x1,y\n0,0,low\n1,1,high\n2,2,high\n".encode("utf-8-sig"))  # as spreadsheets save it
    assert load_label(spec_for(path), domain=VectorDomain()).x.tolist() == [[0, 0], [1, 1], [2, 2]]
