"""Plot a pre-training loss curve from a ``ctrl-bio pretrain`` run's Lightning metrics.csv.

    python benchmarks/plot_pretrain_loss.py benchmarks/images/pretrain/metrics.csv "UNet2DModel on patches" 128

writes loss.png beside the CSV and prints the final running mean; the last argument is the batch size (default 128).
"""
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(metrics: Path, title: str, batch_size: int = 128) -> None:
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("loss")]
    steps, loss = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
    window = 10  # a running mean over ten logged points: single minibatch losses of DSM are noisy
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
              for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="minibatch (every 50 steps)")
    ax.plot(steps, smooth, lw=1.5, label="running mean of 10")
    ax.set_xlabel(f"step (batch {batch_size})")
    ax.set_ylabel("DSM loss, noise units, summed over x")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(metrics.parent / "loss.png", dpi=120)
    print(f"final running mean {smooth[-1]:.3g} at step {steps[-1]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "pre-training loss",
         int(sys.argv[3]) if len(sys.argv) > 3 else 128)
