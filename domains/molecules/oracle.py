"""The evaluation oracle of the molecule domain: a graph regressor of three QM9 DFT properties, never a reward.

One :class:`domains.molecules.nets.GraphClassifier` with three outputs predicts the standardised HOMO-LUMO
``gap`` (eV), dipole moment ``mu`` (D) and isotropic polarizability ``alpha`` (bohr^3) jointly (mean squared
error on targets standardised with the training part's mean and standard deviation). It learns only from the
oracle pool (:meth:`MoleculeTable.oracle_pool`), so no molecule it saw is ever a reward classifier's or cfg's
pair; the best epoch is chosen on a held-out tenth of that pool, and its mean absolute errors and binned
accuracies are measured on the test split. The trained oracle ships as
``domains/molecules/checkpoints/oracle.safetensors`` (+ ``.json`` with its settings, normalisation and test
metrics); ``python -m domains.molecules.oracle`` retrains it (benchmarks/molecules/oracle.md).

As a label's ``oracle:`` field, :func:`oracle_log_prob` bins the predicted value: log-probability 0 for the
predicted bin, :data:`ctrl_bio.labels.LOG_EPS` for the others. The oracle reads the argmax graph of x (the
molecule :func:`domains.molecules.data.decode` would build), not the raw continuous sample. It can predict a
value for any graph, including ones RDKit rejects; with ``require_valid`` (the default) such molecules belong
to no bin, as for the RDKit-exact labels (:mod:`domains.molecules.labels`), so invalid samples count as wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.labels import LOG_EPS, bin_log_prob
from ctrl_bio.progress import progress_bar
from domains.molecules.data import PROPERTIES, UNITS, MoleculeTable, decode, encode, graph_types, load_qm9
from domains.molecules.nets import GraphClassifier

log = logging.getLogger(__name__)

SHIPPED_ORACLE = Path(__file__).parent / "checkpoints" / "oracle.safetensors"
#: The oracle's outputs, in order.
NAMES = tuple(PROPERTIES)


class PropertyOracle(nn.Module):
    """A graph regressor returning the DFT properties in physical units, (B, 189) -> (B, 3) in :data:`NAMES` order.

    Args:
        net: the regressor of standardised targets.
        mean, std: the standardisation of each property (3,).
    """

    def __init__(self, net: GraphClassifier, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.std + self.mean


def project(x: Tensor) -> Tensor:
    """The argmax graph of x as a clean x in {-1, +1} (the molecule that x decodes to)."""
    return encode(*graph_types(x.detach().float().cpu()))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 2048) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _targets(table: MoleculeTable) -> Tensor:
    return torch.from_numpy(np.stack([table.properties[k] for k in NAMES], axis=1)).float()


def train_oracle(table: MoleculeTable, *, hidden: int = 64, edge_hidden: int = 32, n_layers: int = 4,
                 epochs: int = 16, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-2,
                 val_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> tuple[PropertyOracle, dict]:
    """Train the property oracle on the oracle pool and select its best epoch on a held-out part of it.

    Returns:
        The frozen oracle and a report: sizes, normalisation, validation and test MAE per property (physical
        units), test binned accuracy per property (with :data:`domains.molecules.labels.BIN_EDGES`), seconds.
    """
    from domains.molecules.labels import BIN_EDGES

    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pool = table.select(table.oracle_pool())
    perm = torch.randperm(len(pool), generator=g).numpy()
    n_val = max(int(round(val_fraction * len(pool))), 1)
    val_mask = np.zeros(len(pool), dtype=bool)
    val_mask[perm[:n_val]] = True
    train, val, test = pool.select(~val_mask), pool.select(val_mask), table.of_split("test")
    x_tr, y_tr = train.x(), _targets(train)
    x_va, y_va = val.x(), _targets(val)
    x_te, y_te = test.x(), _targets(test)
    mean, std = y_tr.mean(0), y_tr.std(0)
    z_tr = (y_tr - mean) / std
    net = GraphClassifier(len(NAMES), hidden=hidden, edge_hidden=edge_hidden, n_layers=n_layers)
    model = PropertyOracle(net, mean, std)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = x_tr.shape[0] // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    best, best_state, history = float("inf"), None, []
    with progress_bar(epochs * steps_per_epoch, "oracle", enabled=progress) as advance:
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(x_tr.shape[0], generator=g)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss = F.mse_loss(net(x_tr[idx]), z_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance(loss=loss.item())
            mae = (predict(model, x_va) - y_va).abs().mean(0)
            score = float((mae / std).mean())  # MAE in standard deviations, averaged over the properties
            history.append({"epoch": epoch + 1, "loss": loss.item(), "val_mae_std": score,
                            **{f"val_mae_{k}": float(m) for k, m in zip(NAMES, mae)}})
            log.info("oracle epoch %d: validation MAE %s", epoch + 1,
                     ", ".join(f"{k} {float(m):.3f} {UNITS[k]}" for k, m in zip(NAMES, mae)))
            if score < best:
                best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.requires_grad_(False).eval()
    pred_va, pred_te = predict(model, x_va), predict(model, x_te)
    report = {
        "train_size": int(x_tr.shape[0]), "validation_size": int(x_va.shape[0]), "test_size": int(x_te.shape[0]),
        "properties": list(NAMES), "units": [UNITS[k] for k in NAMES],
        "mean": mean.tolist(), "std": std.tolist(),
        "validation_mae": {k: float(m) for k, m in zip(NAMES, (pred_va - y_va).abs().mean(0))},
        "test_mae": {k: float(m) for k, m in zip(NAMES, (pred_te - y_te).abs().mean(0))},
        "test_bin_accuracy": {k: _bin_accuracy(pred_te[:, j], y_te[:, j], BIN_EDGES[k])
                              for j, k in enumerate(NAMES)},
        "bin_edges": {k: list(BIN_EDGES[k]) for k in NAMES},
        "history": history, "seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
        "settings": {"hidden": hidden, "edge_hidden": edge_hidden, "n_layers": n_layers, "epochs": epochs,
                     "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "val_fraction": val_fraction, "seed": seed}}
    return model, report


def _bin_accuracy(pred: Tensor, true: Tensor, edges: Sequence[float]) -> float:
    e = torch.tensor(list(edges), dtype=pred.dtype)
    bins_pred = torch.bucketize(pred.contiguous(), e, right=True)
    return float((bins_pred == torch.bucketize(true.contiguous(), e, right=True)).float().mean())


def save_oracle(model: PropertyOracle, report: dict, path: str | Path = SHIPPED_ORACLE) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return path


_LOADED: dict[str, PropertyOracle] = {}


def load_oracle(path: str | Path = SHIPPED_ORACLE) -> PropertyOracle:
    """The oracle saved by :func:`save_oracle`, frozen (read once per path); one clear line if it is missing."""
    from safetensors.torch import load_file

    path = Path(path)
    key = str(path.resolve())
    if key in _LOADED:
        return _LOADED[key]
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no molecule oracle at '{path}': train one with `python -m domains.molecules.oracle`")
    meta = json.loads(meta_path.read_text())
    s = meta["settings"]
    net = GraphClassifier(len(meta["properties"]), hidden=s["hidden"], edge_hidden=s["edge_hidden"],
                          n_layers=s["n_layers"])
    model = PropertyOracle(net, meta["mean"], meta["std"])
    model.load_state_dict(load_file(str(path)))
    _LOADED[key] = model.requires_grad_(False).eval()
    return _LOADED[key]


def predict_properties(x: Tensor, path: str | Path | None = None) -> dict[str, Tensor]:
    """The oracle's ``gap`` (eV), ``mu`` (D) and ``alpha`` (bohr^3) of the molecules x (N, 189), each (N,).

    The oracle reads the argmax graph of x; it predicts a value for every graph, also for the ones RDKit rejects
    (check validity with :func:`domains.molecules.data.decode` where it matters).
    """
    model = load_oracle(path or SHIPPED_ORACLE)
    out = predict(model, project(x))
    return {k: out[:, j].to(x.device) for j, k in enumerate(NAMES)}


def oracle_log_prob(domain, property: str, edges: Sequence[float], path: str | None = None,  # noqa: A002
                    require_valid: bool = True) -> Callable[[Tensor], Tensor]:
    """The label config's ``oracle`` callable: x -> log p(bin | x) (N, len(edges) + 1) of the oracle's prediction.

    Args:
        domain: the run's domain (unused; the callable signature of ``oracle:``).
        property: ``gap``, ``mu`` or ``alpha``.
        edges: the label's bin edges (class k = number of edges <= predicted value).
        path: an oracle checkpoint; None: the shipped one.
        require_valid: molecules RDKit rejects belong to no bin (:data:`LOG_EPS` everywhere).
    """
    if property not in NAMES:
        raise ValueError(f"unknown molecule property '{property}' (one of {', '.join(NAMES)})")
    load_oracle(path or SHIPPED_ORACLE)  # fail early, with the one-line message, if it is missing
    binned = bin_log_prob(lambda x: predict_properties(x, path)[property], edges)

    def log_prob(x: Tensor) -> Tensor:
        out = binned(x)
        if require_valid:
            invalid = torch.tensor([m is None for m in decode(x)], device=out.device)
            out[invalid] = LOG_EPS
        return out

    return log_prob


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the molecule domain's DFT-property evaluation oracle.")
    parser.add_argument("--out", default=str(SHIPPED_ORACLE))
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--edge-hidden", type=int, default=32)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="full", help="full | slice | a CSV path")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    oracle, report = train_oracle(load_qm9(args.data), hidden=args.hidden, edge_hidden=args.edge_hidden,
                                  n_layers=args.n_layers, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed, progress=not args.no_progress)
    path = save_oracle(oracle, report, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    print(f"oracle: {path}")


if __name__ == "__main__":
    main()
