"""Reports a person reads: metric tables (plain text, markdown, CSV) and plots (PNG, written atomically).

Every table the app prints or saves goes through :func:`markdown_table` / :func:`csv_table`, so the demo, the
ablation and `hci-atr evaluate` agree on labels and rounding.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

# the retrieval metrics of a side-by-side table, (key, column label)
METRIC_COLUMNS = [("t2a_R1", "T2A R@1"), ("t2a_R5", "R@5"), ("t2a_R10", "R@10"), ("t2a_mAP10", "mAP@10"),
                  ("a2t_R1", "A2T R@1"), ("a2t_R5", "R@5"), ("a2t_R10", "R@10"), ("a2t_mAP10", "mAP@10")]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(header))
    for row in rows:
        w.writerow(list(row))
    return buf.getvalue()


def pair_columns(results: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, label) of the compositional pair accuracies present in any of ``results`` (``pairs_<type>_acc``)."""
    keys = sorted({k for r in results for k in r if k.startswith("pairs_") and k.endswith("_acc")})
    return [(k, (k[len("pairs_"):-len("_acc")].replace("_", " ") or "all") + " pairs") for k in keys]


def variants_table(results: dict[str, dict[str, float]], labels: dict[str, str]) -> tuple[str, str]:
    """(markdown, csv) side by side: one row per variant (in ``labels`` order), the retrieval metrics in percent and
    any pair accuracies (0-1)."""
    present = [n for n in labels if n in results]
    pairs = pair_columns(results[n] for n in present)
    cols = METRIC_COLUMNS + pairs
    md_rows, csv_rows = [], []
    for name in present:
        vals = [results[name].get(k, float("nan")) for k, _ in cols]
        md_rows.append([labels[name]] + [f"{v:.1f}" if (k, _l) in METRIC_COLUMNS else f"{v:.3f}"
                                         for v, (k, _l) in zip(vals, cols)])
        csv_rows.append([name] + [f"{v:.4f}" for v in vals])
    return (markdown_table(["model"] + [c[1] for c in cols], md_rows),
            csv_table(["model"] + [c[0] for c in cols], csv_rows))


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically (readers never see half a file) and close it."""
    import matplotlib.pyplot as plt

    from hci_atr.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
