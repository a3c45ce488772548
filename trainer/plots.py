"""The PNG of a run's loss and evaluation curves, drawn from its metrics rows."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt


def plot_metrics(records: list[dict[str, Any]], output: Path) -> Path:
    evaluated = [r for r in records if "val_uniformity" in r]
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["step"] for r in records], [r["loss"] for r in records])
    loss_axis.set(title="training loss", xlabel="step", ylabel="loss")
    for name in ("val_alignment", "val_uniformity", "val_effective_rank"):
        if evaluated:
            eval_axis.plot([r["step"] for r in evaluated], [r[name] for r in evaluated], marker="o", label=name)
    eval_axis.set(title="validation", xlabel="step")
    eval_axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
