"""Property labels defined by configuration: where the pairs come from, the label type, the classifier.

A label is a mapping (a YAML file under ``configs/label/`` or a user folder, DESIGN.md "User-facing
contract") with these fields::

    name: gc                          # how rows and files call it
    domain: gmm                       # the domain it belongs to; checked against the run's domain
    type: categorical                 # categorical | bins | continuous
    classes: 4                        # categorical: a count (values 0..n-1) or the list of values
    bins: [0.4, 0.5]                  # bins: increasing edges; class k = number of edges <= value
    pairs:                            # a CSV file ...
      file: pairs.csv
      x_columns: [x0, x1, x2, x3]     #   numeric columns (vector domains), or
      x_column: sequence              #   one text column the domain encodes (its ``encode_x``)
      y_column: y
      n: 500                          #   keep the first n usable rows (null: all)
    # pairs: {callable: "pkg.module:function", kwargs: {}, n: 500}
    #   ... or a callable (domain, n, generator, **kwargs) -> (x, raw y values)
    classifier: {_target_: ctrl_bio.reward.flat_mlp_classifier, hidden: 128, depth: 2}
    training: {epochs: 200, batch_size: 256, lr: 3.0e-3}
    calibration: {fraction: 0.2}      # held out for temperature scaling, never trained on
    exact: {callable: "pkg.module:function", kwargs: {}}   # optional: domain -> (x -> log p(y|x)),
                                                           # the exact label likelihood, for evaluation

Everything is validated before any training: a missing file, an unknown column, a label value outside
its classes or a type the domain cannot take ends in one line naming the file and field; so does a file that
is not text or a CSV line longer than the csv module reads. Rows whose x or y cannot be used (not a number,
not finite, beyond float32, empty, or a text x the domain rejects, with the domain's reason) are skipped and
counted by reason (:attr:`LabelledPairs.skipped`), logged, never silently dropped.

The core stays free of Hydra: ``_target_`` is resolved here with importlib. A ``_target_`` or class read back
from a saved file (``score.json``, ``classifiers/<label>.json``) is imported only from a trusted package
(:func:`check_trusted`): a shared run directory must not be able to run code of its choosing.
"""

from __future__ import annotations

import csv
import importlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.label_spec import (  # re-exported: they were defined here
    FLOAT32_MAX,
    LABEL_TYPES,
    LabelError,
    check_label_spec,
    class_of,
    n_classes_of,
    where,
)
from ctrl_bio.reward import CalibratedClassifier, ClassifierReport, LogLikelihoodReward, train_classifier

#: Packages whose callables a saved file may name; more, comma-separated, in this environment variable.
TRUSTED_PACKAGES = ("ctrl_bio", "domains")
TRUSTED_ENV = "CTRL_BIO_TRUSTED_PACKAGES"

log = logging.getLogger("ctrl_bio")


@dataclass
class LabelledPairs:
    """Offline pairs (x, y) of one label.

    Attributes:
        name: the label's name.
        x: inputs, (N, ...).
        y: class indices (N,) for categorical and binned labels; float values (N,) for continuous ones.
        n_classes: number of classes, None for continuous labels.
        kind: ``categorical``, ``bins`` or ``continuous``.
        source: the file or callable the pairs came from.
        skipped: rows skipped, counted by reason.
    """

    name: str
    x: Tensor
    y: Tensor
    n_classes: int | None
    kind: str
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Tensor) -> LabelledPairs:
        return LabelledPairs(self.name, self.x[index], self.y[index], self.n_classes, self.kind, self.source,
                             dict(self.skipped))


class BadRows(list):
    """Indices of the rows a domain's ``encode_x`` cannot use (a plain list of them), with ``reasons[i]`` why."""

    def __init__(self, reasons: Mapping[int, str]):
        super().__init__(sorted(reasons))
        self.reasons = dict(reasons)


def trusted_packages() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get(TRUSTED_ENV, "").split(",") if p.strip()]
    return (*TRUSTED_PACKAGES, *extra)


def check_trusted(path: str, where: str) -> None:
    """Refuse to import ``path`` (a class or callable named by a saved file) outside the trusted packages.

    Both the module and the object's own ``__module__`` must lie in one (``ctrl_bio``, ``domains`` and those listed
    in ``$CTRL_BIO_TRUSTED_PACKAGES``), so a trusted module cannot re-export ``os.system`` either.
    """
    packages = trusted_packages()

    def trusted(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    module_name = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
    if not trusted(module_name):
        raise LabelError(f"{where}: '{path}' is outside the trusted packages ({', '.join(packages)}); if you trust "
                         f"the file, add its package to {TRUSTED_ENV}")
    obj = resolve_callable(path)
    if not trusted(getattr(obj, "__module__", "") or ""):
        raise LabelError(f"{where}: '{path}' is defined in {getattr(obj, '__module__', None)!r}, outside the "
                         f"trusted packages ({', '.join(packages)})")


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import ``pkg.module:function`` (or ``pkg.module.function``)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LabelError(f"cannot import '{path}': {exc}") from exc


def _x_reason(values: Sequence[float]) -> str | None:
    """Why numeric x values are unusable, or None: non-finite ones, and finite ones float32 turns into inf."""
    if not all(math.isfinite(v) for v in values):
        return "unparseable x"
    if any(abs(v) > FLOAT32_MAX for v in values):
        return "x outside float32 range"
    return None


def _read_csv(spec: Mapping[str, Any], encode_x: Callable[[list[str]], Tensor] | None,
              n: int | None) -> tuple[Tensor, list[Any], Counter]:
    pairs = spec["pairs"]
    path = Path(pairs["file"])
    x_columns = [pairs["x_column"]] if "x_column" in pairs else list(pairs["x_columns"])
    xs, ys, skipped = [], [], Counter()
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark is no column name
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames or []
            for col in [*x_columns, pairs["y_column"]]:
                if col not in header:
                    raise LabelError(f"{path}: {where(spec, 'pairs')} names column '{col}', not in the header "
                                     f"({', '.join(header) or 'empty file'})")
            for row in reader:
                if n is not None and len(ys) >= n:
                    break
                y_raw = (row.get(pairs["y_column"]) or "").strip()
                if not y_raw:
                    skipped["missing y"] += 1
                    continue
                try:
                    x = [row[c] for c in x_columns] if "x_column" in pairs else [float(row[c]) for c in x_columns]
                except (TypeError, ValueError):
                    skipped["unparseable x"] += 1
                    continue
                reason = None if "x_column" in pairs else _x_reason(x)
                if reason:
                    skipped[reason] += 1
                    continue
                xs.append(x)
                ys.append(y_raw)
        except UnicodeDecodeError as exc:
            raise LabelError(f"{path}: {where(spec, 'pairs.file')}: not a UTF-8 text file (byte "
                             f"0x{exc.object[exc.start]:02x} at position {exc.start})") from None
        except csv.Error as exc:
            raise LabelError(f"{path}: line {reader.line_num + 1}: {exc}") from None  # the line it failed on
    if "x_column" in pairs:
        if encode_x is None:
            raise LabelError(f"{where(spec, 'pairs.x_column')}: this domain reads numeric x_columns only")
        x_tensor, bad = encode_x([x[0] for x in xs])
        reasons = getattr(bad, "reasons", {})
        for i in bad:
            skipped[f"invalid x: {reasons[i]}" if i in reasons else "invalid x"] += 1
        bad_rows = set(bad)
        ys = [y for i, y in enumerate(ys) if i not in bad_rows]
    else:
        x_tensor = torch.tensor(xs, dtype=torch.float32).reshape(len(xs), len(x_columns))
    return x_tensor, ys, skipped


def load_label(spec: Mapping[str, Any], *, domain: Any = None, seed: int = 0) -> LabelledPairs:
    """Read and validate one label's pairs.

    Args:
        spec: the label definition (see the module docstring).
        domain: the run's domain object; may define ``name``, ``label_types``, ``x_shape`` and
            ``encode_x(list[str]) -> (Tensor, bad_row_indices)``; a ``pairs.callable`` receives it.
        seed: seeds the generator handed to a ``pairs.callable``.

    Raises:
        LabelError: one line naming the file and field, before any training.
    """
    domain_name = getattr(domain, "name", None)
    check_label_spec(spec, domain_name=domain_name, label_types=getattr(domain, "label_types", LABEL_TYPES))
    pairs, name = spec["pairs"], spec["name"]
    n = pairs.get("n")
    if "callable" in pairs:
        fn = resolve_callable(pairs["callable"])
        x, raw = fn(domain, n, torch.Generator().manual_seed(seed), **dict(pairs.get("kwargs") or {}))
        source, raw, skipped = pairs["callable"], raw.tolist(), Counter()
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if not finite.all():  # a callable's x of float64 beyond float32 range, or NaN
            skipped["unparseable x"] += int((~finite).sum())
            x, raw = x[finite], [v for v, ok in zip(raw, finite.tolist()) if ok]
    else:
        x, raw, skipped = _read_csv(spec, getattr(domain, "encode_x", None), n)
        source = str(pairs["file"])
    y, keep = [], []
    for i, value in enumerate(raw):
        try:
            y.append(class_of(value, spec))
            keep.append(i)
        except (TypeError, ValueError) as exc:
            skipped["y outside float32 range" if "float32" in str(exc) else "unparseable y"] += 1
    x = x[keep]
    n_classes = n_classes_of(spec)
    if n_classes is not None:
        y_t = torch.tensor(y, dtype=torch.long)
        bad = ((y_t < 0) | (y_t >= n_classes)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise LabelError(f"{source}: {where(spec, pairs.get('y_column', 'y'))}: value {raw[keep[i]]!r} "
                             f"(pair {keep[i] + 1}) is outside the label's {n_classes} classes {spec.get('classes')}")
    else:
        y_t = torch.tensor(y, dtype=torch.float32)
    x_shape = getattr(domain, "x_shape", None)
    if x_shape is not None and tuple(x.shape[1:]) != tuple(x_shape):
        raise LabelError(f"{source}: {where(spec, 'pairs')}: x has shape {tuple(x.shape[1:])} per pair, "
                         f"the domain's samples have {tuple(x_shape)}")
    if x.shape[0] < 3:
        raise LabelError(f"{source}: {where(spec, 'pairs')}: {x.shape[0]} usable pairs left "
                         f"({sum(skipped.values())} rows skipped: {dict(skipped)}); need at least 3")
    if skipped:
        log.warning("label '%s': skipped %d of %d rows of %s: %s", name, sum(skipped.values()),
                    x.shape[0] + sum(skipped.values()), source, ", ".join(f"{k} {v}" for k, v in skipped.items()))
    return LabelledPairs(name, x, y_t, n_classes, spec["type"], source, dict(skipped))


def split_pairs(pairs: LabelledPairs, fraction: float, generator: torch.Generator) -> tuple[LabelledPairs,
                                                                                          LabelledPairs]:
    """Two disjoint random parts, the second holding ``fraction`` of the pairs (e.g. an oracle's share)."""
    perm = torch.randperm(len(pairs), generator=generator)
    n_second = max(int(round(fraction * len(pairs))), 1)
    return pairs.subset(perm[n_second:]), pairs.subset(perm[:n_second])


def build_classifier(spec: Mapping[str, Any], x_shape: Sequence[int], n_classes: int) -> torch.nn.Module:
    """Instantiate the label's classifier ``_target_`` with the sample shape and class count."""
    cfg = dict(spec.get("classifier") or {"_target_": "ctrl_bio.reward.flat_mlp_classifier"})
    cfg.pop("_partial_", None)
    factory = resolve_callable(cfg.pop("_target_"))
    return factory(x_shape=tuple(x_shape), n_classes=n_classes, **cfg)


def fit_reward_classifier(pairs: LabelledPairs, spec: Mapping[str, Any], *,
                          seed: int = 0) -> tuple[CalibratedClassifier, ClassifierReport]:
    """Train the label's classifier on clean pairs and temperature-scale it on its calibration split."""
    if pairs.n_classes is None:
        raise LabelError(f"{where(spec, 'type')}: continuous labels need a regressor, not a classifier")
    torch.manual_seed(seed)
    net = build_classifier(spec, pairs.x.shape[1:], pairs.n_classes)
    training = dict(spec.get("training") or {})
    fraction = (spec.get("calibration") or {}).get("fraction", 0.2)
    return train_classifier(net, pairs.x, pairs.y, calib_fraction=fraction,
                            generator=torch.Generator().manual_seed(seed), **training)


def fit_reward_classifiers(specs: Sequence[Mapping[str, Any]], pairs: Sequence[LabelledPairs], *, seed: int = 0,
                           info: dict[str, Any] | None = None
                           ) -> tuple[LogLikelihoodReward, dict[str, ClassifierReport]]:
    """CTRL's reward for several labels: one calibrated classifier per label, each from its own pairs.

    Label k's classifier is seeded with ``seed + 17 (k + 1)``; the classifiers combine by conditional
    independence given x (:class:`ctrl_bio.reward.LogLikelihoodReward`). With ``info`` each report is also logged
    and recorded there as ``classifier_<label>`` (what a suite's results.json holds).

    Returns:
        The summed log-likelihood reward and each label's calibration report, by label name.
    """
    classifiers, reports = [], {}
    for k, (spec, p) in enumerate(zip(specs, pairs)):
        classifier, reports[spec["name"]] = fit_reward_classifier(p, spec, seed=seed + 17 * (k + 1))
        classifiers.append(classifier)
        if info is not None:
            info[f"classifier_{spec['name']}"] = asdict(reports[spec["name"]])
            log.info("reward classifier %s: %s", spec["name"], reports[spec["name"]])
    return LogLikelihoodReward(classifiers), reports


def exact_log_prob(spec: Mapping[str, Any], domain: Any) -> Callable[[Tensor], Tensor] | None:
    """The label's exact likelihood ``x -> log p(y | x)`` (B, n_classes) if its config names one, else None."""
    exact = spec.get("exact")
    if not exact:
        return None
    return resolve_callable(exact["callable"])(domain, **dict(exact.get("kwargs") or {}))


#: log-probability an exact label function gives the classes it rules out: finite, so that sums stay finite.
LOG_EPS = math.log(1e-6)


def bin_log_prob(values: Callable[[Tensor], Tensor], edges: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """x -> log p(y | x) of a deterministic binned label: 0 for the bin of ``values(x)``, :data:`LOG_EPS` elsewhere.

    Class k is the number of edges <= value, as ``type: bins`` reads raw values.
    """
    edges_t = torch.tensor(list(edges), dtype=torch.float64)

    def log_prob(x: Tensor) -> Tensor:
        k = torch.bucketize(values(x).to(torch.float64), edges_t.to(x.device), right=True)
        out = torch.full((x.shape[0], len(edges) + 1), LOG_EPS, device=x.device)
        out[torch.arange(x.shape[0]), k] = 0.0
        return out

    return log_prob


def evaluation_log_prob(spec: Mapping[str, Any], domain: Any) -> Callable[[Tensor], Tensor]:
    """The label's evaluation likelihood: its ``exact`` function, else its ``oracle`` callable (a model trained on data
    disjoint from every pair); never a reward classifier."""
    exact = exact_log_prob(spec, domain)
    if exact is not None:
        return exact
    oracle = spec.get("oracle")
    if not oracle:
        raise LabelError(f"{where(spec, 'exact')}: the label has neither 'exact' nor 'oracle', so a suite cannot "
                         "score it")
    return resolve_callable(oracle["callable"])(domain, **dict(oracle.get("kwargs") or {}))


def label_specs(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The label definitions of a run's ``label`` node, in order.

    ``label=a`` and ``label=[a,b]`` give ``{a: {...}, b: {...}}`` when each file starts with
    ``# @package label.<name>``; a file without that header composes to the bare definition, taken as one label.
    """
    if "pairs" in node:
        return [dict(node)]
    return [dict(v) for v in node.values()]
