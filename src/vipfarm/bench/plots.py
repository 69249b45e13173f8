"""PNG bar charts of per-mode figures (matplotlib, no display needed).

One panel per mode, each with its own y axis: keep-alive request rates are an order of magnitude
above new-connection ones, and a shared axis would flatten the latter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vipfarm.bench.report import fmt
from vipfarm.bench.wrk import Mode


def bar_panels(
    path: Path,
    title: str,
    ylabel: str,
    figures: Mapping[str, Any],
    bars: Sequence[tuple[str, str]],
) -> Path | None:
    """Bars `(result key, label)` per mode from `figures`; None when none of them was measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    present = [(key, label) for key, label in bars if isinstance(figures.get(key), dict)]
    if not present:
        return None
    modes = [m for m in Mode if any(str(m) in figures[k] for k, _ in present)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        labels = [label for _, label in present]
        values = [figures[key].get(str(mode), 0.0) for key, _ in present]
        drawn = ax.bar(labels, values, color=[f"C{i}" for i in range(len(present))])
        ax.bar_label(drawn, labels=[fmt(v) for v in values], fontsize=8)
        ax.set_title(f"{mode} ({'new connection per request' if mode is Mode.CLOSE else 'reused'})")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
