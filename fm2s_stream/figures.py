"""The demo's pictures, drawn with matplotlib (Agg, no display): labelled before/after panels and latency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["before_after_figure", "latency_figure", "ptc_figure"]

STATUS_MARKERS = {"denoised": "o", "bootstrap": "^", "raw": "x"}  # shape per status (colour is per channel)
STATUS_LABELS = {"denoised": "network", "bootstrap": "cold start (classical)", "raw": "raw (error)"}


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def before_after_figure(panels: Sequence[tuple[str, np.ndarray]], path: Path, title: str,
                        limits: tuple[float, float]) -> None:
    """Side-by-side grey panels (e.g. raw | fm2s | truth) at the same contrast, each titled, with gaps."""
    plt = _pyplot()
    h, w = panels[0][1].shape
    size = 4.0
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) * w / max(h, w) + 0.4, size * h / max(h, w)
                                                      + 0.55), squeeze=False, gridspec_kw={"wspace": 0.04})
    for ax, (label, img) in zip(axes[0], panels):
        ax.imshow(img, cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest")
        ax.set_title(label, fontsize=12)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def latency_figure(points: Sequence[tuple[float, float, str, str]], path: Path, budget_ms: float) -> None:
    """End-to-end latency per frame over the stream's time: colour per channel, marker per status, budget line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    channels = sorted({p[3] for p in points})
    colours = plt.get_cmap("tab10")
    for ci, channel in enumerate(channels):
        for status, marker in STATUS_MARKERS.items():
            sel = [(t, v) for t, v, s, c in points if c == channel and s == status]
            if sel:
                t, v = zip(*sel)
                ax.scatter(t, v, s=9 if marker != "x" else 16, marker=marker, color=colours(ci), alpha=0.75,
                           linewidths=0.8, label=f"{channel}: {STATUS_LABELS[status]}")
    ax.axhline(budget_ms, color="tab:red", linestyle="--", linewidth=1.2, label=f"budget {budget_ms:.0f} ms")
    ax.set_xlabel("time since the first frame (s)")
    ax.set_ylabel("end-to-end latency (ms)")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("latency of every frame (sent -> denoised frame received)")
    ax.legend(loc="upper right", fontsize=8, markerscale=1.8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, facecolor="white")
    plt.close(fig)


def ptc_figure(report: dict[str, object], path: Path, title: str) -> None:
    """The photon-transfer curve behind a calibration: each bin's noise variance against its level
    (filled: used in the fit; hollow: left out as structure), and the fitted law."""
    from .calibrate import NoiseEstimate

    plt = _pyplot()
    rows = np.array(report["ptc"], dtype=np.float64).reshape(-1, 4)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    used = rows[:, 3] > 0
    ax.scatter(rows[used, 0], rows[used, 1], s=14 + 30 * rows[used, 2] / max(rows[:, 2].max(), 1), color="tab:blue",
               label="bins used in the fit (size: tiles)")
    if (~used).any():
        ax.scatter(rows[~used, 0], rows[~used, 1], s=24, facecolors="none", edgecolors="tab:red",
                   label="bins left out (structure)")
    a, b, off = float(report["a"]), float(report["b"]), float(report["offset"])  # type: ignore[arg-type]
    est = NoiseEstimate(a, b - a * off, float(report["rho"]), off, 0.0, 0, bool(report["clipped"]))  # type: ignore[arg-type]
    levels = np.linspace(max(0.0, rows[:, 0].min() * 0.9), rows[:, 0].max() * 1.05, 200)
    ax.plot(levels, [est.observed_variance(v) for v in levels], color="black", linewidth=1.2,
            label=f"var = {a:.3g} (level - {off:.3g}) + {b:.3g}" + (" (clipped at 0)" if report["clipped"] else ""))
    ax.set_xlabel("level (ADU)")
    ax.set_ylabel("noise variance (ADU$^2$)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
