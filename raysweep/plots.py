"""Result pictures: accuracy-vs-eps curves and the chosen UAPs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def robustness_curves(metrics: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in metrics.get("robust_acc", {}).items():
        eps = sorted(float(e) for e in curve)
        ax.plot(eps, [curve[str(e)] for e in eps], marker="o", label=name)
    if metrics.get("uap_acc"):
        eps = sorted(float(e) for e in metrics["uap_acc"])
        ax.plot([0.0] + eps, [metrics["clean_acc"]] + [metrics["uap_acc"][str(e)] for e in eps], marker="s",
                linestyle="--", label="UAP")
    ax.set(xlabel="eps", ylabel="accuracy", ylim=(0, 1), title="accuracy under attack")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def uap_images(deltas: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(deltas), figsize=(2.2 * len(deltas), 2.4), squeeze=False)
    for ax, (eps, d) in zip(axes[0], sorted(deltas.items())):
        img = d.permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow((img / (2 * eps) + 0.5) if eps > 0 else img, cmap="seismic" if img.ndim == 2 else None,
                  vmin=0, vmax=1)
        ax.set_title(f"UAP eps={eps}")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
