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
    if ax.get_legend_handles_labels()[0]:  # nothing to draw when no attack or UAP was configured
        ax.legend()
    return save(fig, path, dpi=120)


def uap_images(deltas: dict, path: Path, example=None) -> Path:
    """Top row: each eps's UAP (one perturbation for every image), with a colour bar in pixel units
    (a grey-scale UAP in a diverging map, a colour one as its RGB shifted to mid-grey). Bottom row,
    given `example` (one test image [C,H,W] in [0,1]): that image with the UAP added and clipped, as
    the ensemble sees it under attack."""
    rows = 2 if example is not None else 1
    fig, axes = plt.subplots(rows, len(deltas), figsize=(2.6 * len(deltas), 2.5 * rows), squeeze=False)
    for col, (eps, d) in enumerate(sorted(deltas.items())):
        img = d.permute(1, 2, 0).squeeze(-1).numpy()
        ax = axes[0][col]
        if img.ndim == 2:
            im = ax.imshow(img, cmap="seismic", vmin=-eps, vmax=eps)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="perturbation")
        else:
            ax.imshow(img / (2 * eps) + 0.5 if eps > 0 else img, vmin=0, vmax=1)
        ax.set_title(f"UAP, eps={eps}", fontsize=9)
        ax.axis("off")
        if example is not None:
            attacked = (example + d).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
            axes[1][col].imshow(attacked, cmap="gray" if attacked.ndim == 2 else None, vmin=0, vmax=1)
            axes[1][col].set_title(f"a test image + UAP {eps}", fontsize=9)
            axes[1][col].axis("off")
    return save(fig, path, dpi=120)


def tradeoff(points: list[dict], robust_name: str, color_name: str | None, path: Path,
             front: list[tuple[float, float]] = ()) -> Path:
    """Clean vs robust accuracy of every finished trial, coloured by a searched parameter (the
    Jacobian Ensembles paper's trade-off figure), with the Pareto front of the two drawn through."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colors = [p["color"] for p in points]
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in colors) and colors
    if numeric:
        positive = all(c > 0 for c in colors)
        norm = matplotlib.colors.LogNorm() if positive and max(colors) / min(colors) > 20 else None
        sc = ax.scatter([p["clean"] for p in points], [p["robust"] for p in points], c=colors, cmap="viridis",
                        norm=norm, s=36, edgecolors="k", linewidths=0.4, zorder=3)
        fig.colorbar(sc, ax=ax, label=color_name)
    else:
        for value in sorted({str(c) for c in colors}):
            sel = [p for p in points if str(p["color"]) == value]
            ax.scatter([p["clean"] for p in sel], [p["robust"] for p in sel], label=f"{color_name}={value}", s=36,
                       edgecolors="k", linewidths=0.4, zorder=3)
    if front:
        xs, ys = zip(*sorted(front))
        ax.plot(xs, ys, color="crimson", linestyle="--", marker="D", markersize=5, label="Pareto front", zorder=2)
    if ax.get_legend_handles_labels()[0]:  # the Pareto front, and the colours when they are categories
        ax.legend(fontsize=8)
    ax.set(xlabel="clean accuracy", ylabel=robust_name, title=f"trade-off over {len(points)} trials")
    ax.grid(alpha=0.3)
    return save(fig, path, dpi=120)


def save(fig, path: Path, dpi: int = 130) -> Path:
    """Lay out, write and close the figure (an open figure per plot would pile up in a long sweep)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
