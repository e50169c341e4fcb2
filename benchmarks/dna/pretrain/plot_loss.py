"""Plot the pre-training loss curve of the shipped DNA network from its Lightning metrics.csv."""
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
rows = [r for r in csv.DictReader(open(here / "metrics.csv")) if r.get("loss")]
steps, loss = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
window = 10  # a running mean over 500 steps: single minibatch losses of DSM are noisy
smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(steps, loss, lw=0.6, alpha=0.5, label="minibatch (every 50 steps)")
ax.plot(steps, smooth, lw=1.5, label="running mean of 10")
ax.set_xlabel("step (batch 128)")
ax.set_ylabel("DSM loss, noise units, summed over 4x200")
ax.set_yscale("log")
ax.set_title("ConvScoreNet pre-training on ENCODE DHS (training split)")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(here / "loss.png", dpi=120)
print(f"final running mean {smooth[-1]:.1f} at step {steps[-1]}")
