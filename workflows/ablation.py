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
The training clips were seen by that model, though, and the test clips were not: their captions are better than a
test clip's. ``--ac-folds K`` (K > 1) cross-fits them: the training clips are dealt into K seeded folds
(:func:`workflows.ablation_tasks.caption_folds`); for each fold the caption variant is trained on the other folds
alone and captions the fold from a bank of the other folds' clips, so every clip, training or test, is captioned by
a model and a bank that never saw it (validation and test clips keep the model trained on the whole training
split). Cost: K more trainings of the caption variant per seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from hci_atr.errors import ConfigError
from hci_atr.files import atomic_write_bytes, atomic_write_text
from workflows.ablation_tasks import caption_folds, merge_captions, nearest_captions, train_and_evaluate
from workflows.report import METRICS, PAIRED, aggregate, format_csv, format_markdown, plot_ablation
from workflows.settings import Settings
from workflows.variants import VARIANTS, parse_variants, variant_config


# The fit loop's rules (seeding, warm-up; hci_atr/training/loop.py) decide the numbers too: results of older rules are
# recomputed, not resumed.
LOOP_RULES = 2
# What a run's JSON holds (2: per-query outcomes and pair accuracies): a result of an older format is recomputed.
RESULT_FORMAT = 2


# Switches added after results were published, at the value that is the code before them bit for bit: at that value
# they stay out of the key, so those results still resume (any other value enters the key as usual).
KEY_NEUTRAL = {"train": {"batch_mining": "none", "batch_mining_group": 2}}


def config_key(cfg: Settings, extra: dict[str, Any] | None = None) -> str:
    """A short hash of everything that decides a run's numbers (resolved config + data + caption source + the fit
    loop's rules; :data:`KEY_NEUTRAL` fields at their neutral value left out)."""
    conf = cfg.to_dict()
    for section, neutral in KEY_NEUTRAL.items():
        part = conf.get(section, {})
        for name, value in neutral.items():
            if name in part and part[name] == value:
                del part[name]
    blob = json.dumps({"config": conf, "loop": LOOP_RULES, **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
                 pairs_file: str | os.PathLike | None = None, ac_folds: int = 1) -> AblationResult:
    """Run every variant x seed as a Ray task and write the table, plot and MLflow runs. See the module docstring.

    ``data``: a dataset path (any format :func:`hci_atr.data.formats.read_dataset` reads); None makes the demo
    (``demo_size`` clips of ``demo_duration`` s, default ``cfg.audio.duration``; ``demo_pairs_in_split``: its
    hard-negative pairs inside each split, :func:`hci_atr.data.demo.make_demo`). ``cfg``: the base config (budget:
    epochs, batch size, encoders ...). ``resume``: skip variant x seed runs whose JSON exists for the same settings.
    ``pairs_file``: the hard-negative pairs scored on the test split (default: the dataset's ``demo_pairs.json``).
    ``ac_folds`` > 1 cross-fits the training clips' auxiliary captions (see the module docstring).
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
    if int(ac_folds) < 1:
        raise ConfigError(f"ablation: --ac-folds must be >= 1 (1: no cross-fitting), got {ac_folds}")
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
    def train_task(cfg_dict: dict, tr, va, te, caps: dict | None, model_dir: str | None, label: str) -> dict:
        return train_and_evaluate(Settings.from_dict(cfg_dict), tr, va, te,
                                  captions=(caps or {}).get("captions"), model_dir=model_dir, threads=1,
                                  pairs=pairs, label=label)

    @ray.remote(num_cpus=1)
    def caption_task(_trained: dict, model_dir: str, rows: list[dict], bank_exclude: Sequence[str] = ()) -> dict:
        # _trained: the captioning model's train_task result; passing it orders this task after that one
        return nearest_captions(model_dir, features, rows, bank_split=cfg.run.train_split, threads=1,
                                min_confidence=cfg.model.ac_min_confidence, bank_exclude=bank_exclude)

    @ray.remote(num_cpus=0)
    def merge_task(*parts: dict) -> dict:
        return merge_captions(parts)

    train_rows = splits[cfg.run.train_split]
    other_rows_ref = ray.put(splits[cfg.run.val_split] + splits[test_split])

    def _fold_caption_tasks(seed: int, ccfg: Settings) -> list:
        """Cross-fitting: per fold, the caption variant trained on the other folds' training clips captions the
        fold's clips from a bank of the other folds' clips, so no training clip is captioned by a model or bank
        that saw it (as no test clip is)."""
        fold = caption_folds([r["audio_id"] for r in train_rows], ac_folds, seed)
        tasks = []
        for f in range(int(ac_folds)):
            inside = [r for r in train_rows if fold[r["audio_id"]] == f]
            rest = ray.put([r for r in train_rows if fold[r["audio_id"]] != f])
            fold_dir = out / "caption_models" / f"{caption_variant}_seed{seed}_fold{f}of{ac_folds}"
            trained_f = train_task.remote(ccfg.to_dict(), rest, val_ref, test_ref, None, str(fold_dir),
                                          f"{caption_variant} seed {seed} fold {f + 1}/{ac_folds} (captioner)")
            tasks.append(caption_task.remote(trained_f, str(fold_dir), inside, [r["audio_id"] for r in inside]))
        return tasks

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
                          "bank_split": cfg.run.train_split, "model_dir": str(model_dir),
                          **({"folds": int(ac_folds)} if ac_folds > 1 else {})}
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
                    trained = train_task.remote(ccfg.to_dict(), train_ref, val_ref, test_ref, None, str(model_dir),
                                                f"{cv.name} seed {seed} (captioner)")
                    if cv in chosen:  # its numbers are also the table's row for this variant
                        pending[trained] = (cv.name, seed, cres, {"key": key, "config": ccfg.to_dict()})
                if ac_folds > 1:
                    caption_ref = merge_task.remote(caption_task.remote(trained, str(model_dir), other_rows_ref),
                                                    *_fold_caption_tasks(seed, ccfg))
                else:
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
                                    caption_ref if v.uses_captions else None, None, f"{v.name} seed {seed}")
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
