"""Plot helpers the jobs' HTML reports share: a matplotlib figure as inline base64 PNG, a score histogram."""

from __future__ import annotations

import base64
import io


def png(fig) -> str:
    """``fig`` as a base64 PNG for an ``<img src="data:image/png;base64,...">``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def histogram(ax, values, threshold, title):
    """Histogram of ``values`` on ``ax`` with a dashed line at ``threshold`` (None: no line)."""
    if values:
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4878a8")
    else:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    if threshold is not None:
        ax.axvline(threshold, color="#c03030", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend()
    ax.set_title(title)
