"""The pictures the commands draw: training curves (train), reference margins (inspect), the beta
sweep (sweep); `figure` is the frame they share, which iterate's rounds picture (iterate.rounds_plot) uses too.

matplotlib runs on its file-only Agg backend: there is no display here or on a cluster. Every
figure is laid out by matplotlib's constrained layout (titles, axis labels and legends inside the
picture, none on a neighbouring panel), has its tick labels thinned until they stand apart, and is
written by `storage.write_bytes_atomic`: a whole PNG under its name, with a plain file's mode, and a
refused write (a read-only output) is one line naming the file.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator

from stages.core import storage

DPI = 110
TICK_BINS = (6, 4, 3, 2)  # fewer and fewer intervals on an axis whose tick labels touch
TICK_GAP = 2.0  # pixels between two tick labels, at least


@contextmanager
def figure(path: str, panels: int, panel_size: tuple[float, float], title: str = "") -> Iterator[list]:
    """Axes for `panels` side-by-side plots, saved to `path` (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(panel_size[0] * panels, panel_size[1]), squeeze=False,
                             layout="constrained")
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title, fontsize=9)
        _thin_ticks(fig)
        buf = io.BytesIO()
        # A tight box as well: whatever still sticks out (a very long title) is in the file, not cut off.
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.05)
        storage.write_bytes_atomic(path, buf.getvalue())
    finally:
        plt.close(fig)


def _thin_ticks(fig) -> None:
    """Fewer ticks on the axes whose labels touch: matplotlib picks their number from the axis's
    length, not from how wide the labels are (0.00125 or -40000 on a narrow panel)."""
    from matplotlib.ticker import MaxNLocator

    fig.set_dpi(DPI)  # measured as it will be saved
    for bins in TICK_BINS:
        fig.draw_without_rendering()  # the layout, and each label's place
        renderer = fig.canvas.get_renderer()
        crowded = [axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) if _labels_touch(axis, renderer)]
        if not crowded:
            return
        for axis in crowded:
            axis.set_major_locator(MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10]))


def _labels_touch(axis, renderer) -> bool:
    """Whether two neighbouring tick labels drawn on `axis` (inside its view) touch."""
    lo, hi = sorted(axis.get_view_interval())
    boxes = [label.get_window_extent(renderer).padded(TICK_GAP / 2)
             for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels()) if lo <= loc <= hi and label.get_text()]
    return any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def training_curves(records: list[dict], path: str, title: str = "") -> str:
    """Loss, reward accuracy, margins and chosen/rejected rewards against step (eval points too)."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    panels = [("loss", ["loss"]), ("reward accuracy", ["rewards/accuracies"]), ("reward margin", ["rewards/margins"]),
              ("rewards", ["rewards/chosen", "rewards/rejected"])]
    with figure(path, len(panels), (4.2, 3.4), title) as axes:
        for ax, (name, keys) in zip(axes, panels):
            for key in keys:
                ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r],
                        label=f"train {key.split('/')[-1]}", alpha=0.85)
                points = [(r["step"], r[f"eval/{key}"]) for r in evals if f"eval/{key}" in r]
                if points:
                    ax.plot(*zip(*points), "o--", label=f"eval {key.split('/')[-1]}")
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return path


def margin_histogram(margins: list[float], path: str, title: str) -> str:
    """Histogram of ref_chosen_logps - ref_rejected_logps over a precompute output."""
    with figure(path, 1, (6, 3.4)) as (ax,):
        ax.hist(margins, bins=min(60, max(10, len(margins) // 5)), color="#4c72b0", alpha=0.85)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("ref_chosen_logps - ref_rejected_logps (nats)")
        ax.set_ylabel("pairs")
        ax.set_title(title, fontsize=9)
    return path


def sweep_tradeoff(rows: list[dict], path: str) -> str:
    """Held-out reward accuracy and margin against how far the policy moved from the reference on the
    held-out chosen answers (mean log-ratio), one point per beta."""
    kl = [r["eval/logratio/chosen"] for r in rows]
    with figure(path, 2, (4.5, 3.6)) as axes:
        for ax, key, name in ((axes[0], "eval/rewards/accuracies", "held-out reward accuracy"),
                              (axes[1], "eval/rewards/margins", "held-out reward margin")):
            ys = [r[key] for r in rows]
            ax.plot(kl, ys, "o-", color="#4c72b0")
            for x, y, r in zip(kl, ys, rows):
                ax.annotate(f"beta {r['beta']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.margins(x=0.18, y=0.12)  # room for the last point's beta label inside the panel
            # Two lines: on one, the label is wider than its panel and runs into the next one.
            ax.set_xlabel("mean log(policy / reference) on held-out\nchosen answers, nats per sequence")
            ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
    return path
