"""Ablation of HCI levels and AC uses: every variant x seed trained and evaluated under one budget, as Ray tasks.

```
data (demo, made on request | any dataset reader path)
  -> extract_features (Ray Data)                       -> <out>/features/part-*.parquet
  -> train/val/test rows, ray.put once
  -> per seed s, a DAG of Ray tasks (num_cpus=1 each, torch threads 1, so N cores run N tasks at once):
       train(<caption_variant>, s) -> caption(s) -> train(<each AC variant>, s)
       train(<each other variant>, s)
  -> <out>/runs/<variant>/seed<s>.json                  (one result per task; a re-run skips finished ones)
  -> table.md, table.csv, ablation.png, summary.json    (mean ± sample std over seeds; paired differences to the
                                                         first variant with a 95 % bootstrap interval)
  -> MLflow: one parent run (the table, plot, settings) with one child run per variant x seed
```

Every task runs the library's fit loop in-process (:func:`hci_atr.training.fit` with
:class:`hci_atr.training.InProcess` hooks; every ``hci-atr train`` worker runs the same loop): AdamW on the trainable
parameters, ``train.epochs`` epochs (early stopping when ``train.early_stopping_patience`` is set), best epoch by
validation R-sum (as ``hci-atr train`` picks its best checkpoint), then the test split is evaluated once with that
epoch's weights.
Only the switches of :data:`VARIANTS` differ between variants; data, epochs, batch size, encoders and seeds are equal.

What each run keeps of its test split: the metrics, the per-query R@1 outcomes (every caption's T2A hit, every clip's
A2T hit: :func:`hci_atr.metrics.per_query_hits`) and, with a pair file (the demo's ``demo_pairs.json`` or
``--pairs``), the pair accuracy per type. The table compares each variant with the first (the baseline) on the same
seeds: the paired difference of T2A and A2T R@1 with a 95 % percentile-bootstrap interval over (seed, query)
units (:func:`hci_atr.metrics.paired_bootstrap` of the seeds' outcomes concatenated), besides mean ± std over seeds.
:data:`PRESETS` names whole setups (``--preset compositional``: the order/attribute benchmark, every variant trained
to convergence by early stopping).

Auxiliary captions. The AC variants need a generated caption per clip. Per seed ``s``, the ``nearest`` captioner
(:class:`hci_atr.captioners.nearest.NearestCaptioner`, the backend ``hci-atr caption-all --captioner nearest`` runs) is
built on the model of variant ``caption_variant`` (default ``clip``) trained with seed ``s`` on the training split only
(its best epoch chosen on validation), with the training split's features as its caption bank. A clip gets a caption
of its nearest OTHER training clip (leave-one-out; its own reference captions are excluded too), so training clips do
not get their own caption back and no test caption is ever in the bank or seen by the captioning model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hci_atr.files import atomic_write_bytes, atomic_write_text
from workflows.settings import Settings
from hci_atr.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: an MLflow-safe ``name``, a table ``label`` and its config switches."""

    name: str
    label: str
    switches: dict[str, Any]

    @property
    def uses_captions(self) -> bool:
        return any(self.switches.get(f"model.{u}") for u in ("ac_fusion", "ac_branch", "ac_augment"))


def _switches(clip=True, segment=False, frame=False, fusion=False, branch=False, augment=False) -> dict[str, Any]:
    return {"model.use_clip": clip, "model.use_segment": segment, "model.use_frame": frame,
            "model.ac_fusion": fusion, "model.ac_branch": branch, "model.ac_augment": augment}


# the order-aware switches of the compositional benchmark (hci_atr.models.temporal / order / weighting), and hard
# negatives (hci_atr.data.negatives) on top
_ORDER = {"model.temporal_context": "gru", "model.segment_order": "position_bias", "model.fusion": "calibrated"}
_HARD = {"model.hard_negatives": "both", "model.hard_negative_weight": 0.5}

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("clip", "clip only", _switches()),
    Variant("clip_segment", "clip + segment", _switches(segment=True)),
    Variant("clip_frame", "clip + frame", _switches(frame=True)),
    Variant("hci", "HCI (clip + segment + frame)", _switches(segment=True, frame=True)),
    Variant("hci_acfusion", "HCI + AC fusion", _switches(segment=True, frame=True, fusion=True)),
    Variant("hci_ac", "HCI + AC (fusion, branch, augment)",
            _switches(segment=True, frame=True, fusion=True, branch=True, augment=True)),
    Variant("clip_ac", "clip + AC (fusion, branch, augment)", _switches(fusion=True, branch=True, augment=True)),
    Variant("hci_order", "HCI + order (GRU, position bias, calibrated)",
            {**_switches(segment=True, frame=True), **_ORDER}),
    Variant("hci_order_hard", "HCI + order + hard negatives (w 0.5)",
            {**_switches(segment=True, frame=True), **_ORDER, **_HARD}),
]}
# what runs without --variants: the HCI levels and AC uses (the order variants are the compositional preset's)
DEFAULT_VARIANTS = ("clip", "clip_segment", "clip_frame", "hci", "hci_acfusion", "hci_ac", "clip_ac")

METRICS = ("t2a_R1", "t2a_R5", "t2a_R10", "t2a_mAP10", "a2t_R1", "a2t_R5", "a2t_R10", "a2t_mAP10")
METRIC_LABELS = {"t2a_R1": "T2A R@1", "t2a_R5": "T2A R@5", "t2a_R10": "T2A R@10", "t2a_mAP10": "T2A mAP@10",
                 "a2t_R1": "A2T R@1", "a2t_R5": "A2T R@5", "a2t_R10": "A2T R@10", "a2t_mAP10": "A2T mAP@10"}


def parse_variants(names: str | Sequence[str] | None) -> list[Variant]:
    """``"clip,hci"`` or a list -> Variants (:data:`DEFAULT_VARIANTS` when empty); unknown names are a ConfigError."""
    if not names:
        return [VARIANTS[n] for n in DEFAULT_VARIANTS]
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return [VARIANTS[n] for n in dict.fromkeys(items)]


def variant_config(base: Settings, variant: Variant, seed: int) -> Settings:
    """The base config with the variant's switches and the seed applied (everything else stays equal)."""
    return base.override({**variant.switches, "train.seed": seed}, f"ablation variant {variant.name}")


# The fit loop's rules (seeding, warm-up; hci_atr/training/loop.py) decide the numbers too: results of older rules are
# recomputed, not resumed.
LOOP_RULES = 2
# What a run's JSON holds (2: per-query outcomes and pair accuracies): a result of an older format is recomputed.
RESULT_FORMAT = 2


@dataclass(frozen=True)
class Preset:
    """A named ablation setup (``hci-atr ablate --preset NAME``): the demo data it makes, its variants and the
    settings every variant shares. Flags given on the command line win over a preset's values."""

    name: str
    description: str
    demo_size: int
    pairs_in_split: bool
    variants: tuple[str, ...]
    overrides: dict[str, Any]


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("compositional",
           "order / attribute / count benchmark: 2000 demo clips (300 test clips x 5 captions: one query moves "
           "T2A R@1 by 0.07 points, A2T R@1 by 0.33) with the hard-negative pairs inside each split; every variant "
           "trained until validation R-sum has not improved for 4 epochs (at most 40)",
           demo_size=2000, pairs_in_split=True, variants=("clip", "hci", "hci_order", "hci_order_hard"),
           overrides={"audio.duration": 5.0, "model.audio_width": 8, "train.epochs": 40,
                      "train.early_stopping_patience": 4}),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown ablation preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def config_key(cfg: Settings, extra: dict[str, Any] | None = None) -> str:
    """A short hash of everything that decides a run's numbers (resolved config + data + caption source + the fit
    loop's rules)."""
    blob = json.dumps({"config": cfg.to_dict(), "loop": LOOP_RULES, **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# one variant x seed (plain PyTorch; runs inside a Ray task, or directly in tests)
# ---------------------------------------------------------------------------------------------------------------


def with_captions(rows: list[dict], captions: dict[str, str] | None) -> list[dict]:
    """Shallow copies of ``rows`` with ``generated_caption`` from ``captions`` (None where a clip has none)."""
    return [{**r, "generated_caption": (captions or {}).get(r["audio_id"])} for r in rows]


def queries_key(audio_ids: Sequence[str], captions: Sequence[str]) -> str:
    """A short hash of a test split's queries (clips and captions, in order): per-query outcomes of two runs pair up
    only when their keys are equal."""
    return hashlib.sha256(json.dumps([list(audio_ids), list(captions)]).encode()).hexdigest()[:16]


def split_outcomes(model, rows: list[dict], cfg, pairs: Sequence | None = None) -> tuple[dict[str, float], dict]:
    """``(metrics, per_query)`` of ``model`` on ``rows``: the metrics of :func:`workflows.evaluate.score_metrics`
    (pair accuracies with ``pairs``, row indices into ``rows``) plus ``n_audio`` / ``n_text``, and the per-query R@1
    outcomes ``{"t2a_R1": [0/1 per caption], "a2t_R1": [0/1 per clip], "queries": queries_key}``."""
    import torch

    from hci_atr.metrics import per_query_hits
    from hci_atr.training import embed_split
    from workflows.evaluate import score_metrics

    core = getattr(model, "module", model)
    with torch.no_grad():
        emb = embed_split(model, rows, cfg)
        scores = core.score(emb.audio, emb.text)
    metrics = score_metrics(scores, emb.text_to_audio, pairs)
    metrics["n_audio"] = float(len(emb.audio_ids))
    metrics["n_text"] = float(len(emb.captions))
    hits = per_query_hits(scores.fused, emb.text_to_audio, k=1)
    per_query = {"t2a_R1": hits["t2a"].astype(int).tolist(), "a2t_R1": hits["a2t"].astype(int).tolist(),
                 "queries": queries_key(emb.audio_ids, emb.captions)}
    return {k: float(v) for k, v in metrics.items()}, per_query


def train_and_evaluate(cfg: Settings, train_rows: list[dict], val_rows: list[dict], test_rows: list[dict], *,
                       captions: dict[str, str] | None = None, model_dir: str | os.PathLike | None = None,
                       threads: int = 1, pairs: Sequence | None = None) -> dict[str, Any]:
    """Train ``HciAtrModel(cfg)`` with the library's fit loop (:func:`hci_atr.training.fit`, in-process hooks: the
    same seeding, warm-up, best epoch and early stopping as each ``hci-atr train`` worker), put back the epoch with
    the best validation R-sum, evaluate it on ``test_rows``. Returns ``{"test": metrics, "val": metrics,
    "per_query", "best_epoch", "epochs_run", "stopped_early", "history", "seconds", "threads"}`` (metrics as
    :func:`hci_atr.training.evaluate` gives them, in percent; ``test`` also has the pair accuracies of ``pairs``
    (:func:`hci_atr.data.pairs.read_pairs` of ``test_rows``); ``per_query`` as :func:`split_outcomes`).
    ``model_dir``: save the best model there.

    The training rows are batched in audio_id order (as :func:`hci_atr.data.shards.read_split_rows` returns them),
    the order a single ``hci-atr train`` worker sees its split in, so one worker and this loop give the same numbers.
    """
    import torch

    from hci_atr.training import InProcess, evaluate, fit, seeded_model

    torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    tc = cfg.train
    train_rows, val_rows, test_rows = (with_captions(r, captions) for r in (train_rows, val_rows, test_rows))
    if len(train_rows) < 2 or not val_rows or not test_rows:
        raise ConfigError(f"ablation needs >= 2 training rows and non-empty validation/test splits (got "
                          f"{len(train_rows)}/{len(val_rows)}/{len(test_rows)}); use a larger dataset or --size")
    train_rows = sorted(train_rows, key=lambda r: str(r["audio_id"]))
    model = seeded_model(cfg)
    hooks = InProcess(cfg, train_rows, val_rows, batch_size=min(tc.batch_size, len(train_rows)))
    result = fit(model, cfg, hooks)
    state = result.state
    hooks.restore_best(model)
    val = evaluate(model, val_rows, cfg)
    test, per_query = split_outcomes(model, test_rows, cfg, pairs)
    if model_dir is not None:
        model.save_pretrained(model_dir)
    return {"test": test, "val": val, "per_query": per_query, "best_epoch": state.best_epoch,
            "epochs_run": len(state.history), "stopped_early": bool(result.stopped_early), "history": state.history,
            "seconds": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads()}


def nearest_captions(model_dir: str | os.PathLike, features_dir: str | os.PathLike, rows: list[dict],
                     bank_split: str = "train", threads: int = 1, batch_size: int = 32) -> dict[str, Any]:
    """Caption every row with the ``nearest`` backend on the model in ``model_dir`` (caption bank: the
    ``bank_split`` rows of ``features_dir``). Returns ``{"captions": {audio_id: caption}, "errors": {...}}``.

    Rows need ``audio_id``, ``audio_path`` and ``captions`` (the own captions, only used to exclude them).
    """
    import torch

    from hci_atr.captioners.nearest import NearestCaptioner

    torch.set_num_threads(max(1, int(threads)))
    cap = NearestCaptioner(str(model_dir), features=str(features_dir), split=bank_split)
    out: dict[str, str] = {}
    errors: dict[str, str] = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {"audio_id": np.array([r["audio_id"] for r in chunk], dtype=object),
                 "audio_path": np.array([r["audio_path"] for r in chunk], dtype=object),
                 "captions": np.empty(len(chunk), dtype=object)}
        for j, r in enumerate(chunk):  # one list per cell (np.array of lists would make a 2-D array)
            batch["captions"][j] = list(r["captions"])
        res = cap(batch)
        for aid, text, err in zip(res["audio_id"], res["generated_caption"], res["error"]):
            if err:
                errors[str(aid)] = str(err)
            elif text:
                out[str(aid)] = str(text)
    return {"captions": out, "errors": errors}


# ---------------------------------------------------------------------------------------------------------------
# aggregation, table, plot
# ---------------------------------------------------------------------------------------------------------------


# the per-query outcomes a paired interval is computed from: (result key, label)
PAIRED = (("t2a_R1", "T2A R@1"), ("a2t_R1", "A2T R@1"))
BOOTSTRAP_RESAMPLES = 2000


def pair_keys(results: Iterable[dict]) -> list[tuple[str, str]]:
    """(key, label) of the pair accuracies in any run's test metrics (``pairs_acc``, ``pairs_<type>_acc`` ...)."""
    from workflows.report import pair_columns

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


def aggregate(results: dict[tuple[str, int], dict], variants: Sequence[Variant],
              n_resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict[str, Any]]:
    """Per variant: mean and sample std (ddof=1; 0 for one seed) of every test metric and pair accuracy over its
    seeds; the paired difference of T2A R@1 against the first variant (same seeds) as mean ± std over seeds; and,
    for T2A and A2T R@1, the paired difference over (seed, query) with its 95 % bootstrap interval
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
    from workflows.report import pair_columns

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
    from workflows.report import markdown_table

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
    from workflows.report import csv_table

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

    from workflows.report import save_figure

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


# ---------------------------------------------------------------------------------------------------------------
# the distributed run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    """What :func:`run_ablation` returns: the aggregate table's rows, every variant x seed result and where they
    were written."""

    out_dir: str
    rows: list[dict[str, Any]]  # aggregate() output
    results: dict[tuple[str, int], dict] = field(repr=False)  # (variant, seed) -> run JSON
    markdown: str = ""
    parent_run_id: str | None = None
    computed: int = 0  # variant x seed runs trained by this call (the rest were resumed from JSON)


def _result_path(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}.json"


def _load_done(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("key") == key else None


def _ensure_demo(out: Path, size: int, duration: float, sample_rate: int, seed: int,
                 pairs_in_split: bool = False) -> Path:
    from hci_atr.data.demo import make_demo

    root = out / f"demo_{size}x{duration:g}s_{sample_rate}hz_seed{seed}{'_pairs' if pairs_in_split else ''}"
    if not (root / "demo_metadata.json").is_file():  # make_demo renames a complete folder into place
        make_demo(root, seed=seed, size=size, duration=duration, sample_rate=sample_rate, progress=False,
                  pairs_in_split=pairs_in_split)
    return root


def pairs_source(data: str | os.PathLike, pairs_file: str | os.PathLike | None) -> Path | None:
    """The pair file a run scores: ``pairs_file`` when given, else the dataset folder's ``demo_pairs.json`` (what
    make-demo writes) when it has one, else None."""
    if pairs_file:
        return Path(pairs_file)
    own = Path(data) / "demo_pairs.json"
    return own if Path(data).is_dir() and own.is_file() else None


def run_ablation(out_dir: str | os.PathLike, *, cfg: Settings | None = None, data: str | os.PathLike | None = None,
                 fmt: str = "auto", demo_size: int = 240, demo_duration: float | None = None, demo_seed: int = 0,
                 variants: str | Sequence[str] | None = None, seeds: Iterable[int] = (0, 1, 2),
                 caption_variant: str = "clip", test_split: str = "test", tracking_uri: str | None = None,
                 experiment: str = "hci-atr-ablation", log_mlflow: bool = True, resume: bool = True,
                 command: str = "", echo: Callable[[str], None] | None = None, demo_pairs_in_split: bool = False,
                 pairs_file: str | os.PathLike | None = None) -> AblationResult:
    """Run every variant x seed as a Ray task and write the table, plot and MLflow runs. See the module docstring.

    ``data``: a dataset path (any format :func:`hci_atr.data.formats.read_dataset` reads); None makes the demo
    (``demo_size`` clips of ``demo_duration`` s, default ``cfg.audio.duration``; ``demo_pairs_in_split``: its
    hard-negative pairs inside each split, :func:`hci_atr.data.demo.make_demo`). ``cfg``: the base config (budget:
    epochs, batch size, encoders ...). ``resume``: skip variant x seed runs whose JSON exists for the same settings.
    ``pairs_file``: the hard-negative pairs scored on the test split (default: the dataset's ``demo_pairs.json``).
    """
    import ray

    from workflows.cluster import ensure_ray
    from workflows.features import extract_features
    from workflows.tracking import data_fingerprint
    from hci_atr.data.pairs import read_pairs
    from hci_atr.data.shards import read_split_rows

    say = echo or (lambda s: None)
    cfg = cfg or Settings()
    out = Path(out_dir).resolve()
    chosen = parse_variants(variants)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("ablation: give at least one seed")
    if caption_variant not in VARIANTS or VARIANTS[caption_variant].uses_captions:
        raise ConfigError(f"ablation: caption_variant must be a variant without AC (got {caption_variant!r})")
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a mistyped command leaves nothing behind

    if pairs_file:
        read_pairs(pairs_file, [])  # a malformed pair file fails here, before any data is made or trained
    if data is None:
        data = _ensure_demo(out, demo_size, float(demo_duration or cfg.audio.duration), cfg.audio.sample_rate,
                            demo_seed, demo_pairs_in_split)
        say(f"demo data: {data}")
    features = out / "features"
    ensure_ray()
    m = extract_features(data, features, cfg=cfg, fmt=fmt, seed=demo_seed, progress=False)
    say(f"features: {m['rows']} rows ({m['computed_shards']} shards computed) -> {features}")
    fingerprint = data_fingerprint(features)
    splits = {name: read_split_rows(features, name) for name in (cfg.run.train_split, cfg.run.val_split,
                                                                 test_split)}
    for name, rows in splits.items():
        if not rows:
            raise ConfigError(f"{features}: split '{name}' has no rows; the ablation needs train, validation and "
                              f"test splits (set train.train_split / train.val_split / --test-split)")
    say("rows: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    pairs_path = pairs_source(data, pairs_file)
    pairs, pairs_key = None, None
    if pairs_path is not None:
        pairs = read_pairs(pairs_path, [str(r["audio_id"]) for r in splits[test_split]])
        pairs_key = hashlib.sha256(pairs_path.read_bytes()).hexdigest()[:16]
        say(f"pairs: {len(pairs)} hard-negative pairs of {pairs_path} lie in the {test_split} split")
    # everything besides the config that decides a run's result (the captioning model's key stays without it)
    run_extra = {"data": fingerprint, "result": RESULT_FORMAT, "pairs": pairs_key}
    cfg.save(out / "base_config.yaml")
    train_ref, val_ref, test_ref = (ray.put(splits[k]) for k in (cfg.run.train_split, cfg.run.val_split,
                                                                  test_split))
    all_rows_ref = ray.put([r for rows in splits.values() for r in rows])

    @ray.remote(num_cpus=1)
    def train_task(cfg_dict: dict, tr, va, te, caps: dict | None, model_dir: str | None) -> dict:
        return train_and_evaluate(Settings.from_dict(cfg_dict), tr, va, te,
                                  captions=(caps or {}).get("captions"), model_dir=model_dir, threads=1,
                                  pairs=pairs)

    @ray.remote(num_cpus=1)
    def caption_task(_trained: dict, model_dir: str, rows: list[dict]) -> dict:
        # _trained: the captioning model's train_task result; passing it orders this task after that one
        return nearest_captions(model_dir, features, rows, bank_split=cfg.run.train_split, threads=1)

    results: dict[tuple[str, int], dict] = {}
    pending: dict[Any, tuple[str, int, Path, dict]] = {}
    computed = 0
    need_captions = any(v.uses_captions for v in chosen)
    for seed in seeds:
        cap_source = None
        caption_ref = None
        if need_captions:
            cv = VARIANTS[caption_variant]
            ccfg = variant_config(cfg, cv, seed)
            model_dir = out / "caption_models" / f"{cv.name}_seed{seed}"
            cap_path = out / "captions" / f"seed{seed}.json"
            cap_source = {"captioner": "nearest", "model_variant": cv.name, "seed": seed,
                          "model_config_key": config_key(ccfg, {"data": fingerprint}),
                          "bank_split": cfg.run.train_split, "model_dir": str(model_dir)}
            cached = _load_done(cap_path, config_key(ccfg, {"data": fingerprint, "captions": cap_source}))
            if resume and cached is not None:
                caption_ref = ray.put(cached)
            else:
                cres = _result_path(out, cv.name, seed)
                key = config_key(ccfg, run_extra)
                done = _load_done(cres, key) if resume else None
                if done is not None and (model_dir / "config.yaml").is_file():
                    trained = ray.put(done)
                else:
                    trained = train_task.remote(ccfg.to_dict(), train_ref, val_ref, test_ref, None, str(model_dir))
                    if cv in chosen:  # its numbers are also the table's row for this variant
                        pending[trained] = (cv.name, seed, cres, {"key": key, "config": ccfg.to_dict()})
                caption_ref = caption_task.remote(trained, str(model_dir), all_rows_ref)
                pending[caption_ref] = ("__captions__", seed, cap_path,
                                        {"key": config_key(ccfg, {"data": fingerprint, "captions": cap_source}),
                                         **cap_source})
        for v in chosen:
            vcfg = variant_config(cfg, v, seed)
            extra = {**run_extra, **({"captions": cap_source} if v.uses_captions else {})}
            key = config_key(vcfg, extra)
            path = _result_path(out, v.name, seed)
            if any(p[0] == v.name and p[1] == seed for p in pending.values()):
                continue  # the captioning model's run, already submitted above
            done = _load_done(path, key) if resume else None
            if done is not None:
                results[(v.name, seed)] = done
                continue
            ref = train_task.remote(vcfg.to_dict(), train_ref, val_ref, test_ref,
                                    caption_ref if v.uses_captions else None, None)
            pending[ref] = (v.name, seed, path, {"key": key, "config": vcfg.to_dict(),
                                                 **({"caption_source": cap_source} if v.uses_captions else {})})
    total = sum(1 for p in pending.values() if p[0] != "__captions__")
    say(f"{len(results)} runs resumed, {total} to train ({len(pending) - total} captioning tasks) "
        f"on {int(ray.available_resources().get('CPU', 0))} free Ray CPUs")
    t_start = time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        name, seed, path, meta = pending.pop(ref)
        res = ray.get(ref)
        if name == "__captions__":
            doc = {**meta, **res, "n_captions": len(res["captions"])}
            atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))
            say(f"[{time.perf_counter() - t_start:6.0f}s] captions seed {seed}: {len(res['captions'])} clips "
                f"({len(res['errors'])} errors) by the {meta['model_variant']} model")
            continue
        doc = {"variant": name, "seed": seed, **meta, **res}
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True, default=float))
        results[(name, seed)] = doc
        computed += 1
        t = res["test"]
        stopped = "stopped early" if res["stopped_early"] else "epoch limit"
        say(f"[{time.perf_counter() - t_start:6.0f}s] {name} seed {seed}: test T2A R@1 {t['t2a_R1']:.2f} "
            f"A2T R@1 {t['a2t_R1']:.2f} (best epoch {res['best_epoch']} of {res['epochs_run']}, {stopped}; "
            f"{res['seconds']:.0f}s)")

    rows = aggregate(results, chosen)
    md = format_markdown(rows, chosen[0].label)
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", format_csv(rows))
    n_seeds = len(seeds)
    plot_ablation(rows, out / "ablation.png",
                  f"test split, mean ± std over {n_seeds} seed(s); {cfg.train.epochs} epochs, "
                  f"batch {cfg.train.batch_size}, {cfg.model.audio_encoder} w{cfg.model.audio_width}")
    summary = {"rows": rows, "seeds": seeds, "variants": [v.name for v in chosen], "data": str(data),
               "features_fingerprint": fingerprint, "caption_variant": caption_variant, "command": command,
               "pairs": str(pairs_path) if pairs_path else None, "pairs_in_test": len(pairs) if pairs else 0,
               "config": cfg.to_dict()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    parent = None
    if log_mlflow:
        parent = log_to_mlflow(out, rows, results, cfg, summary, tracking_uri, experiment)
        say(f"MLflow parent run {parent} (experiment {experiment})")
    return AblationResult(str(out), rows, results, md, parent, computed)


def log_to_mlflow(out: Path, rows: list[dict], results: dict[tuple[str, int], dict], cfg: Settings,
                  summary: dict, tracking_uri: str | None, experiment: str) -> str:
    """One parent run (settings; per variant the mean/std of every metric and pair accuracy and the paired
    differences to the baseline with their 95 % interval bounds; table and plot artifacts) and one child run per
    variant x seed (its switches, seed, per-epoch history, test metrics with the pair accuracies)."""
    from workflows import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(uri, experiment)
    parent = c.create_run(exp, run_name=f"ablation-{time.strftime('%Y%m%d-%H%M%S')}").info.run_id
    tracking.log_params(uri, parent, {**cfg.flat(), "ablation.seeds": summary["seeds"],
                                      "ablation.variants": summary["variants"],
                                      "ablation.caption_variant": summary["caption_variant"],
                                      "ablation.data": summary["data"],
                                      "ablation.features_fingerprint": summary["features_fingerprint"],
                                      "ablation.pairs": summary.get("pairs") or ""})
    tracking.set_tags(uri, parent, {"ablation.command": summary["command"] or "(python API)",
                                    "ablation.out_dir": str(out)})
    agg = {}
    interval = tuple(f"d_{m}_{k}" for m, _label in PAIRED for k in ("diff", "lo", "hi"))
    for r in rows:
        for m in METRICS:
            agg[f"{r['variant']}.{m}_mean"] = r[f"{m}_mean"]
            agg[f"{r['variant']}.{m}_std"] = r[f"{m}_std"]
        for k, v in r.items():
            if k in interval or (k.startswith("pairs_") and k.endswith(("_acc_mean", "_acc_std"))):
                agg[f"{r['variant']}.{k}"] = v
    tracking.log_metrics(uri, parent, agg, step=0)
    for name in ("table.md", "table.csv", "ablation.png", "summary.json"):
        tracking.log_artifact(uri, parent, out / name)
    for (variant, seed), doc in sorted(results.items()):
        child = c.create_run(exp, run_name=f"{variant}-seed{seed}",
                             tags={"mlflow.parentRunId": parent, "ablation.variant": variant}).info.run_id
        params = {"ablation.variant": variant, "train.seed": seed, **VARIANTS[variant].switches}
        if doc.get("caption_source"):
            params["ablation.captions_by"] = f"{doc['caption_source']['model_variant']} seed " \
                                             f"{doc['caption_source']['seed']} (nearest)"
        tracking.log_params(uri, child, params)
        for h in doc.get("history", []):
            tracking.log_metrics(uri, child, {k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
        tracking.log_metrics(uri, child, {**{f"test_{k}": v for k, v in doc["test"].items()},
                                          "best_epoch": doc["best_epoch"], "seconds": doc["seconds"],
                                          "epochs_run": doc.get("epochs_run", len(doc.get("history", []))),
                                          "stopped_early": float(bool(doc.get("stopped_early")))},
                             step=int(doc["best_epoch"]))
        tracking.end_run(uri, child)
    tracking.end_run(uri, parent)
    return parent


def publish_results(out_dir: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy the table (md, csv), plot and summary of an ablation run into ``dest`` (atomically, file by file)."""
    out, dst = Path(out_dir), Path(dest)
    written = []
    for name in ("table.md", "table.csv", "ablation.png", "summary.json"):
        atomic_write_bytes(dst / name, (out / name).read_bytes())
        written.append(dst / name)
    return written
