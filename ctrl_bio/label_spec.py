"""A label definition (DESIGN.md "User-facing contract"; the fields in :mod:`ctrl_bio.labels`), checked before any
data is read: every problem is one :class:`LabelError` line naming the label and field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

LABEL_TYPES = ("categorical", "bins", "continuous")
#: The largest float32: a value beyond it is finite in Python's float64 but becomes inf in a tensor.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class LabelError(ValueError):
    """A label definition or its data is unusable; the message is one line naming the file and field."""


def where(spec: Mapping[str, Any], key: str) -> str:
    return f"label '{spec.get('name', '?')}': field '{key}'"


def check_label_spec(spec: Mapping[str, Any], *, domain_name: str | None = None,
                     label_types: Sequence[str] = LABEL_TYPES) -> None:
    """Validate a label definition without reading its data; raise :class:`LabelError` (one line)."""
    for key in ("name", "type", "pairs"):
        if spec.get(key) is None:
            raise LabelError(f"{where(spec, key)} is missing")
    kind = spec["type"]
    if kind not in LABEL_TYPES:
        raise LabelError(f"{where(spec, 'type')}: unknown type '{kind}' (one of {', '.join(LABEL_TYPES)})")
    if kind not in label_types:
        raise LabelError(f"{where(spec, 'type')}: domain '{domain_name}' cannot take '{kind}' labels "
                         f"(it takes {', '.join(label_types)})")
    if domain_name is not None and spec.get("domain") not in (None, domain_name):
        raise LabelError(f"{where(spec, 'domain')}: the label is for domain '{spec['domain']}', "
                         f"the run uses domain '{domain_name}'")
    if kind == "categorical" and spec.get("classes") is None:
        raise LabelError(f"{where(spec, 'classes')} is missing (a count, or the list of class values)")
    if kind == "bins":
        edges = spec.get("bins")
        if not edges or any(not isinstance(e, (int, float)) for e in edges) or list(edges) != sorted(edges):
            raise LabelError(f"{where(spec, 'bins')} must be a non-empty increasing list of numbers, got {edges}")
    pairs = spec["pairs"]
    if ("file" in pairs) == ("callable" in pairs):
        raise LabelError(f"{where(spec, 'pairs')} needs exactly one of 'file' or 'callable'")
    if "file" in pairs:
        if not Path(pairs["file"]).is_file():
            raise LabelError(f"{where(spec, 'pairs.file')}: no such file '{pairs['file']}'")
        if ("x_columns" in pairs) == ("x_column" in pairs):
            raise LabelError(f"{where(spec, 'pairs')} needs exactly one of 'x_columns' or 'x_column'")
        if not pairs.get("y_column"):
            raise LabelError(f"{where(spec, 'pairs.y_column')} is missing")
    n = pairs.get("n")
    if n is not None and (not isinstance(n, int) or n < 3):
        raise LabelError(f"{where(spec, 'pairs.n')} must be an integer >= 3 (or null for all rows), got {n}")
    fraction = (spec.get("calibration") or {}).get("fraction", 0.2)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
        raise LabelError(f"{where(spec, 'calibration.fraction')} must lie in (0, 1), got {fraction!r}")
    training = spec.get("training") or {}
    for key in ("epochs", "batch_size"):
        v = training.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LabelError(f"{where(spec, 'training.' + key)} must be a positive integer, got {v!r}")
    for key in ("lr", "weight_decay"):
        v = training.get(key, 1.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or (
                key == "lr" and v == 0):
            wanted = "a positive" if key == "lr" else "a non-negative"
            raise LabelError(f"{where(spec, 'training.' + key)} must be {wanted} number, got {v!r}")


def class_of(value: Any, spec: Mapping[str, Any]) -> int | float:
    """Map a raw y value to its class index (categorical, bins) or float (continuous); ValueError if unusable."""
    kind = spec["type"]
    if kind == "continuous":
        v = float(value)
        if not math.isfinite(v):
            raise ValueError("not a finite number")
        if abs(v) > FLOAT32_MAX:
            raise ValueError("y outside float32 range")
        return v
    if kind == "bins":
        v = float(value)
        if not math.isfinite(v):
            raise ValueError("not a finite number")
        return sum(v >= e for e in spec["bins"])
    classes = spec["classes"]
    if isinstance(classes, int):
        c = float(value)
        if c != int(c):
            raise ValueError("not an integer")
        return int(c)
    values = [str(v) for v in classes]
    text = str(value).strip()
    if text in values:
        return values.index(text)
    try:  # a numeric column read as text ("1.0" for class value 1)
        return values.index(str(int(float(text))))
    except ValueError:
        return -1


def n_classes_of(spec: Mapping[str, Any]) -> int | None:
    if spec["type"] == "categorical":
        return spec["classes"] if isinstance(spec["classes"], int) else len(spec["classes"])
    if spec["type"] == "bins":
        return len(spec["bins"]) + 1
    return None
