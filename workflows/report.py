"""Reports a person reads: metric tables (plain text, markdown, CSV) and plots (PNG, written atomically).

Every table the app prints or saves goes through :func:`markdown_table` / :func:`csv_table`, so the demo, the
ablation and `hci-atr evaluate` agree on labels and rounding. The ablation's table is built here from its runs'
results (:func:`aggregate`: mean ± std over seeds, paired differences to the baseline with a 95 % bootstrap interval
over (seed, query); :func:`format_markdown`, :func:`format_csv`, :func:`plot_ablation`).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hci_atr.errors import ConfigError

# the retrieval metrics of every table (percent), in column order, and their full labels
METRICS = ("t2a_R1", "t2a_R5", "t2a_R10", "t2a_mAP10", "a2t_R1", "a2t_R5", "a2t_R10", "a2t_mAP10")
METRIC_LABELS = {"t2a_R1": "T2A R@1", "t2a_R5": "T2A R@5", "t2a_R10": "T2A R@10", "t2a_mAP10": "T2A mAP@10",
                 "a2t_R1": "A2T R@1", "a2t_R5": "A2T R@5", "a2t_R10": "A2T R@10", "a2t_mAP10": "A2T mAP@10"}
# a side-by-side table's (key, column label): the direction named once, at R@1
METRIC_COLUMNS = [(m, METRIC_LABELS[m] if m.endswith("_R1") else METRIC_LABELS[m].split(" ", 1)[1]) for m in METRICS]


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


# ---------------------------------------------------------------------------------------------------------------
# the ablation table: aggregation over seeds, paired intervals, markdown / CSV, plot
# ---------------------------------------------------------------------------------------------------------------


# the per-query outcomes a paired interval is computed from: (result key, label)
PAIRED = (("t2a_R1", "T2A R@1"), ("a2t_R1", "A2T R@1"))
BOOTSTRAP_RESAMPLES = 2000


def pair_keys(results: Iterable[dict]) -> list[tuple[str, str]]:
    """(key, label) of the pair accuracies in any run's test metrics (``pairs_acc``, ``pairs_<type>_acc`` ...)."""
    return [(k, "all pairs" if k == "pairs_acc" else label)
            for k, label in pair_columns(r.get("test", {}) for r in results)]


def paired_interval(results: dict[tuple[str, int], dict], base: str, variant: str, metric: str,
                    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, float] | None:
    """Paired difference ``variant - base`` of the per-query ``metric`` outcomes (percent) with its 95 % bootstrap
    interval over (seed, query) units: the two variants' outcomes of every seed both have, concatenated in seed
    order, into :func:`hci_atr.metrics.paired_bootstrap`. ``{"diff", "lo", "hi", "n", "seeds"}``; None when no seed
    has per-query outcomes for both."""
    from hci_atr.metrics import paired_bootstrap

    seeds = sorted(s for (name, s) in results if name == variant and (base, s) in results
                   and metric in (results[(name, s)].get("per_query") or {})
                   and metric in (results[(base, s)].get("per_query") or {}))
    if not seeds:
        return None
    a, b = [], []
    for s in seeds:
        pa, pb = results[(base, s)]["per_query"], results[(variant, s)]["per_query"]
        if pa.get("queries") != pb.get("queries") or len(pa[metric]) != len(pb[metric]):
            raise ConfigError(f"ablation: {base} and {variant} seed {s} were evaluated on different test queries; "
                              "re-run with --no-resume")
        a.extend(pa[metric])
        b.extend(pb[metric])
    r = paired_bootstrap(np.asarray(a, np.float64) * 100, np.asarray(b, np.float64) * 100,
                         n_resamples=n_resamples, seed=seed)
    return {**r, "seeds": seeds}


def aggregate(results: dict[tuple[str, int], dict], variants: Sequence[Any],
              n_resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict[str, Any]]:
    """Per variant (:class:`workflows.variants.Variant`s, the first the baseline): mean and sample std (ddof=1; 0
    for one seed) of every test metric and pair accuracy over its seeds; the paired difference of T2A R@1 against
    the first variant (same seeds) as mean ± std over seeds; and, for T2A and A2T R@1, the paired difference over
    (seed, query) with its 95 % bootstrap interval
    (:func:`paired_interval`: ``d_<metric>_diff``, ``_lo``, ``_hi``, ``_n`` queries)."""
    out = []
    base = variants[0].name if variants else None
    pairs = pair_keys(results.values())
    for v in variants:
        seeds = sorted(s for (name, s) in results if name == v.name)
        if not seeds:
            continue
        docs = [results[(v.name, s)] for s in seeds]
        row: dict[str, Any] = {"variant": v.name, "label": v.label, "seeds": seeds, "baseline": v.name == base}
        for m in METRICS:
            vals = np.array([d["test"][m] for d in docs], dtype=np.float64)
            row[f"{m}_mean"] = float(vals.mean())
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        for key, _label in pairs:
            vals = np.array([d["test"][key] for d in docs if key in d["test"]], dtype=np.float64)
            if len(vals):
                row[f"{key}_mean"] = float(vals.mean())
                row[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                row[f"{key[:-len('_acc')]}_n"] = float(docs[0]["test"].get(f"{key[:-len('_acc')]}_n", 0.0))
        paired = [results[(v.name, s)]["test"]["t2a_R1"] - results[(base, s)]["test"]["t2a_R1"]
                  for s in seeds if (base, s) in results]
        if paired:
            d = np.array(paired, dtype=np.float64)
            row["d_t2a_R1_mean"] = float(d.mean())
            row["d_t2a_R1_std"] = float(d.std(ddof=1)) if len(d) > 1 else 0.0
        if v.name != base:
            for m, _label in PAIRED:
                iv = paired_interval(results, base, v.name, m, n_resamples)
                if iv is not None:
                    row.update({f"d_{m}_{k}": iv[k] for k in ("diff", "lo", "hi", "n")})
        row["best_epochs"] = [d.get("best_epoch") for d in docs]
        row["epochs_run"] = [d.get("epochs_run", len(d.get("history") or [])) for d in docs]
        out.append(row)
    return out


def _interval_cell(r: dict[str, Any], m: str) -> str:
    if f"d_{m}_diff" in r:
        return f"{r[f'd_{m}_diff']:+.2f} [{r[f'd_{m}_lo']:+.2f}, {r[f'd_{m}_hi']:+.2f}]"
    return "baseline" if r.get("baseline") else ""


def _pair_label(rows: list[dict[str, Any]], key: str, label: str) -> str:
    n = next((r[f"{key[:-len('_acc')]}_n"] for r in rows if f"{key[:-len('_acc')]}_n" in r), None)
    return f"{label} (n={int(n)})" if n is not None else label


def _row_pair_keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = pair_columns({k[:-len("_mean")]: 1 for k in r if k.endswith("_acc_mean")} for r in rows)
    return [(k, "all pairs" if k == "pairs_acc" else label) for k, label in keys]


def _epochs_cell(r: dict[str, Any]) -> str:
    return ", ".join(f"{b}/{e}" for b, e in zip(r.get("best_epochs", []), r.get("epochs_run", []))
                     if b is not None and e)


def format_markdown(rows: list[dict[str, Any]], base_label: str | None = None) -> str:
    """The aggregate as a markdown table, one row per variant: ``mean ± std`` over seeds per metric (percent); the
    paired T2A R@1 difference to the first variant over seeds; the paired T2A / A2T R@1 differences with their 95 %
    bootstrap interval over (seed, query); pair accuracies (fractions, chance 0.5) as ``mean ± std``; and per seed
    the best epoch / epochs run (a run that stopped early before the epoch limit converged)."""
    base = base_label or "first"
    pairs = _row_pair_keys(rows)
    head = ["variant", *[METRIC_LABELS[m] for m in METRICS], f"Δ T2A R@1 vs {base} (paired)",
            *[f"Δ {label} vs {base}, 95 % CI (seed × query)" for _m, label in PAIRED],
            *[_pair_label(rows, k, label) for k, label in pairs], "best / last epoch per seed"]
    body = []
    for r in rows:
        cells = [r["label"]] + [f"{r[f'{m}_mean']:.2f} ± {r[f'{m}_std']:.2f}" for m in METRICS]
        cells.append(f"{r['d_t2a_R1_mean']:+.2f} ± {r['d_t2a_R1_std']:.2f}" if "d_t2a_R1_mean" in r else "")
        cells += [_interval_cell(r, m) for m, _label in PAIRED]
        cells += [f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_std']:.3f}" if f"{k}_mean" in r else "" for k, _l in pairs]
        cells.append(_epochs_cell(r))
        body.append(cells)
    return markdown_table(head, body) + "\n"


def format_csv(rows: list[dict[str, Any]]) -> str:
    """The aggregate as CSV: the markdown table's numbers unrounded (4 decimals), interval bounds and pair counts in
    their own columns."""
    pairs = _row_pair_keys(rows)
    interval = [f"d_{m}_{k}" for m, _label in PAIRED for k in ("diff", "lo", "hi", "n")]
    pair_cols = [c for k, _l in pairs for c in (f"{k}_mean", f"{k}_std", f"{k[:-len('_acc')]}_n")]
    cols = ["variant", "label", "n_seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + \
        ["d_t2a_R1_mean", "d_t2a_R1_std"] + interval + pair_cols + ["best_epochs", "epochs_run"]
    body = []
    for r in rows:
        body.append([r["variant"], r["label"], len(r["seeds"])] +
                    [f"{r[f'{m}_{s}']:.4f}" for m in METRICS for s in ("mean", "std")] +
                    [f"{r[k]:.4f}" if k in r else "" for k in ["d_t2a_R1_mean", "d_t2a_R1_std", *interval,
                                                               *pair_cols]] +
                    [" ".join(str(x) for x in r.get(k, []) if x is not None) for k in ("best_epochs", "epochs_run")])
    return csv_table(cols, body)


def plot_ablation(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars (T2A/A2T R@1, R@5, R@10) per variant with ± std error bars; matplotlib Agg, written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metrics = ("t2a_R1", "t2a_R5", "t2a_R10", "a2t_R1", "a2t_R5", "a2t_R10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    width = 0.8 / max(1, len(rows))
    for ax, direction in zip(axes, ("t2a", "a2t")):
        ms = [m for m in metrics if m.startswith(direction)]
        x = np.arange(len(ms))
        for k, r in enumerate(rows):
            ax.bar(x + (k - (len(rows) - 1) / 2) * width, [r[f"{m}_mean"] for m in ms], width,
                   yerr=[r[f"{m}_std"] for m in ms], capsize=2, label=r["label"], color=f"C{k % 10}")
        ax.set_xticks(x, [METRIC_LABELS[m] for m in ms])
        ax.set_ylabel("%")
        ax.set_title("text -> audio" if direction == "t2a" else "audio -> text")
    axes[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
