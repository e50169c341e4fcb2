"""The evaluation oracle of the DNA domain: a cell-type classifier that never served as a reward.

It learns from the training split minus the labelled-pairs pool (:meth:`DHSTable.oracle_pool`), so no
sequence it saw is ever a reward classifier's or cfg's pair; it is selected and temperature-calibrated on the
validation chromosome (chr1) and its accuracy on the test chromosome (chr2) is the suite's ``real_data``
row, the ceiling of cell-type accuracy. The trained oracle ships as
``domains/dna/checkpoints/oracle.safetensors`` (+ ``.json`` with its settings and test metrics);
``python -m domains.dna.oracle`` retrains it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from ctrl_bio.metrics import macro_f1
from ctrl_bio.progress import progress_bar
from ctrl_bio.reward import CalibratedClassifier, expected_calibration_error, fit_temperature
from domains.dna.data import CELL_TYPES, DHSTable, load_dhs, one_hot
from domains.dna.nets import SequenceCNN, reverse_complement

log = logging.getLogger(__name__)

SHIPPED_ORACLE = Path(__file__).parent / "checkpoints" / "oracle.safetensors"


@torch.no_grad()
def predict_logits(net: torch.nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    net.eval()
    return torch.cat([net(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def train_oracle(table: DHSTable, *, hidden: int = 128, kernel_size: int = 15, epochs: int = 12,
                 batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 1e-2, seed: int = 0,
                 progress: bool = True) -> tuple[CalibratedClassifier, dict]:
    """Train, select (best validation accuracy over epochs) and calibrate the cell-type oracle.

    Returns:
        The calibrated oracle and a report: sizes, validation and test accuracy / macro-F1, ECE before and
        after temperature scaling, seconds.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train = table.select(table.oracle_pool())
    val, test = table.of_split("validation"), table.of_split("test")
    x_tr, y_tr = one_hot(train.sequences), torch.from_numpy(train.celltype)
    x_va, y_va = one_hot(val.sequences), torch.from_numpy(val.celltype)
    x_te, y_te = one_hot(test.sequences), torch.from_numpy(test.celltype)
    net = SequenceCNN(len(CELL_TYPES), hidden=hidden, kernel_size=kernel_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = x_tr.shape[0] // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    best, best_state, history = -1.0, None, []
    with progress_bar(epochs * steps_per_epoch, "oracle", enabled=progress) as advance:
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(x_tr.shape[0], generator=g)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                xb = x_tr[idx]
                # Reverse-complement augmentation: a site is the same site on either strand.
                flip = torch.rand(xb.shape[0], generator=g) < 0.5
                xb = torch.where(flip[:, None, None], reverse_complement(xb), xb)
                loss = F.cross_entropy(net(xb), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance(loss=loss.item())
            acc = float((predict_logits(net, x_va).argmax(1) == y_va).float().mean())
            history.append({"epoch": epoch + 1, "val_accuracy": acc, "loss": loss.item()})
            log.info("oracle epoch %d: validation accuracy %.4f", epoch + 1, acc)
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    logits_va = predict_logits(net, x_va)
    temperature = fit_temperature(logits_va, y_va)
    logits_te = predict_logits(net, x_te)
    pred_te = logits_te.argmax(1)
    report = {
        "train_size": int(x_tr.shape[0]), "validation_size": int(x_va.shape[0]), "test_size": int(x_te.shape[0]),
        "validation_accuracy": best, "temperature": temperature,
        "test_accuracy": float((pred_te == y_te).float().mean()),
        "test_macro_f1": macro_f1(pred_te, y_te, len(CELL_TYPES)),
        "test_ece_before": expected_calibration_error(logits_te.softmax(1), y_te),
        "test_ece_after": expected_calibration_error((logits_te / temperature).softmax(1), y_te),
        "history": history, "seconds": time.perf_counter() - start,
        "settings": {"hidden": hidden, "kernel_size": kernel_size, "epochs": epochs, "batch_size": batch_size,
                     "lr": lr, "weight_decay": weight_decay, "seed": seed}}
    return CalibratedClassifier(net, temperature).requires_grad_(False).eval(), report


def save_oracle(oracle: CalibratedClassifier, report: dict, path: str | Path = SHIPPED_ORACLE) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return path


def load_oracle(path: str | Path = SHIPPED_ORACLE) -> CalibratedClassifier:
    """The calibrated oracle saved by :func:`save_oracle`, frozen; one clear line if it is missing."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no DNA oracle at '{path}': train one with `python -m domains.dna.oracle`")
    settings = json.loads(meta_path.read_text())["settings"]
    net = SequenceCNN(len(CELL_TYPES), hidden=settings["hidden"], kernel_size=settings["kernel_size"])
    oracle = CalibratedClassifier(net)
    oracle.load_state_dict(load_file(str(path)))
    return oracle.requires_grad_(False).eval()


def oracle_log_prob(domain, path: str | None = None):
    """The label config's ``oracle`` callable: x -> calibrated log p(cell type | x) of the shipped oracle."""
    oracle = load_oracle(path or SHIPPED_ORACLE)

    def log_prob(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([oracle(x[i:i + 1024]) for i in range(0, x.shape[0], 1024)])

    return log_prob


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the DNA domain's cell-type evaluation oracle.")
    parser.add_argument("--out", default=str(SHIPPED_ORACLE))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="full", help="full | slice | a table path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    table = load_dhs(source="slice") if args.data == "slice" else load_dhs(None if args.data == "full" else args.data)
    oracle, report = train_oracle(table, hidden=args.hidden, epochs=args.epochs, seed=args.seed, progress=False)
    path = save_oracle(oracle, report, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    print(f"oracle: {path}")


if __name__ == "__main__":
    main()
