"""hci-atr demo: the whole life cycle on the embedded default, end to end.

    make-demo -> extract-features -> train clip-only baseline -> train HCI
              -> caption-all (nearest, from the HCI model) -> train HCI+AC
              -> evaluate all three on the test split (retrieval metrics, and pair accuracy per type on the
                 hard-negative pairs of demo_pairs.json that fall in the test split)
              -> side-by-side table (+ MLflow test metrics)
              -> index the collection with HCI+AC, so `serve run serve.app:deployment` works right after

Everything lands under ``--workdir`` (default ``hci_atr_runs/``)::

    demo_data/            the procedural dataset (Clotho layout)
    features/             feature shards           captions/   generated captions (nearest)
    ray_results/<run>/    Ray Train runs           models/{clip,hci,hci_ac}/   the best model of each run
    index/                the serving index        demo_results.{md,csv}       the table
    stages/<stage>.json   what each finished stage produced

Resume: each stage writes its marker last, and every stage resumes internally too (shards, Ray Train checkpoints),
so re-running the same command after an interruption continues where it stopped. A marker written for other
settings (seed, size, epochs...) is not reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hci_atr.files import atomic_write_text
from hci_atr.errors import ConfigError
from workflows.settings import Settings
from workflows.report import variants_table
from workflows.variants import VARIANTS

# the three trained variants (workflows.variants: the same switches and labels as the ablation's rows), table order
DEMO_VARIANTS = ("clip", "hci", "hci_ac")


# What the demo changes on top of the settings (defaults: configs/demo.yaml): a longer schedule and smaller batches
# suit its 168 training clips. --quick: a tiny dataset of short clips and 2 epochs, a first look in a few minutes.
DEMO_OVERRIDES = {"train.epochs": 12, "train.batch_size": 24}
QUICK_OVERRIDES = {"audio.duration": 2.0, "audio.sample_rate": 16000, "train.epochs": 2, "train.batch_size": 8}
QUICK_SIZE = 48


@dataclass(frozen=True)
class DemoSettings:
    """What only the demo decides; everything else comes from the settings. ``overrides``: dotted settings keys
    (CLI flags such as --epochs), applied last."""

    workdir: str = "hci_atr_runs"
    seed: int = 0
    size: int = 240
    quick: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()


def demo_config(s: DemoSettings, base: Settings | None = None) -> Settings:
    """The settings every demo stage shares: the demo's budget, seed, and where runs go."""
    work = Path(s.workdir).absolute()
    cfg = (base or Settings()).override(QUICK_OVERRIDES if s.quick else DEMO_OVERRIDES, "demo")
    cfg = cfg.override(dict(s.overrides), "demo")
    return cfg.override({
        "train.seed": s.seed, "run.storage_path": str(work / "ray_results"),
        "run.features_dir": str(work / "features"), "run.registered_model": "hci-atr-demo",
        "run.experiment": "hci-atr-demo", "pipeline.num_workers": cfg.run.num_workers,
        "serve.model_dir": str(work / "models" / "hci_ac"), "serve.index_dir": str(work / "index"),
    }, "demo")


class _Stages:
    """Markers under ``stages/``: a stage whose marker exists with the same key is skipped on a re-run."""

    def __init__(self, root: Path, key: dict):
        self.root = root / "stages"
        self.key = json.loads(json.dumps(key))  # as a marker reads it back (tuples become lists)

    def done(self, name: str) -> dict | None:
        p = self.root / f"{name}.json"
        if not p.is_file():
            return None
        data = json.loads(p.read_text())
        return data["result"] if data.get("key") == self.key else None

    def mark(self, name: str, result: dict) -> dict:
        atomic_write_text(self.root / f"{name}.json", json.dumps({"key": self.key, "result": result}, indent=1))
        return result


def run_demo(s: DemoSettings, base: Settings | None = None, tracking_uri: str | None = None,
             echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run every stage (skipping finished ones) and return {"table": markdown, "results": {variant: metrics}, ...}."""
    from hci_atr.data.demo import make_demo
    from workflows import tracking
    from workflows.caption import caption_all
    from workflows.evaluate import evaluate
    from workflows.features import extract_features
    from workflows.train import export_model_dir, train

    if s.size < 24:
        raise ConfigError(f"demo size must be at least 24 clips so every split has clips (got {s.size})")
    work = Path(s.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(s, base)
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.run.tracking_uri)
    stages = _Stages(work, {"settings": s.__dict__ | {"workdir": str(work)}, "config": cfg.to_dict()})
    data_dir, feat_dir, cap_dir = work / "demo_data", work / "features", work / "captions"
    t_start = time.perf_counter()

    def step(n: int, text: str) -> None:
        echo(f"[{n}/7] {text}")

    a = cfg.audio
    step(1, f"demo dataset: {s.size} clips of {a.duration:g} s at {a.sample_rate} Hz -> {data_dir}")
    if not stages.done("data"):
        echo("      " + make_demo(data_dir, seed=s.seed, size=s.size, duration=a.duration,
                                  sample_rate=a.sample_rate, progress=progress))
        stages.mark("data", {"dir": str(data_dir)})

    step(2, f"extract-features (Ray Data, {cfg.pipeline.num_workers} workers) -> {feat_dir}")
    if not stages.done("features"):
        m = extract_features(data_dir, feat_dir, cfg=cfg, seed=s.seed, progress=progress)
        stages.mark("features", {"rows": m.get("rows"), "failed": m.get("failed")})

    results: dict[str, dict] = {}
    models: dict[str, str] = {}
    runs: dict[str, str] = {}

    def train_variant(n: int, name: str, captions: Path | None) -> None:
        label, overrides = VARIANTS[name].label, VARIANTS[name].switches
        step(n, f"train {label} (Ray Train, {cfg.run.num_workers} workers, {cfg.train.epochs} epochs) run "
                f"'demo-{name}'")
        done = stages.done(f"train_{name}")
        if done is None:
            vcfg = cfg.override({**overrides, "run.run_name": f"demo-{name}"}, "demo")
            r = train(vcfg, feat_dir, captions, tracking_uri=uri, echo=lambda m: echo("      " + m))
            dst = work / "models" / name
            export_model_dir(r.model_dir, dst)
            done = stages.mark(f"train_{name}", {"model_dir": str(dst), "run_id": r.mlflow_run_id,
                                                  "val_rsum": r.metrics.get("val_rsum")})
        models[name], runs[name] = done["model_dir"], done["run_id"]
        echo(f"      best val R-sum {done['val_rsum']:.1f}; model {done['model_dir']}")

    train_variant(3, "clip", None)
    train_variant(4, "hci", None)

    step(5, f"caption-all with the nearest captioner from the HCI model -> {cap_dir}")
    if not stages.done("captions"):
        m = caption_all(data_dir, cap_dir, captioner="nearest", model=models["hci"],
                        params={"features": str(feat_dir)}, cfg=cfg, seed=s.seed, progress=progress)
        stages.mark("captions", {"rows": m.get("rows"), "failed": m.get("failed")})

    train_variant(6, "hci_ac", cap_dir)

    step(7, "evaluate on the test split; index the collection for serving")
    pairs_file = data_dir / "demo_pairs.json"  # the demo's hard-negative pairs: per-type pair accuracy columns
    pairs_file = pairs_file if pairs_file.is_file() else None
    for name in DEMO_VARIANTS:
        done = stages.done(f"eval_{name}")
        if done is None or (pairs_file is not None and "pairs_n" not in done):  # a marker from before pairs
            metrics = evaluate(models[name], feat_dir, "test", captions_dir=cap_dir if name == "hci_ac" else None,
                               pairs_file=pairs_file).metrics
            tracking.log_metrics(uri, runs[name], {f"test_{k}": v for k, v in metrics.items()}, step=0)
            done = stages.mark(f"eval_{name}", metrics)
        results[name] = done
    if not stages.done("index"):
        from workflows.index import build_index

        build_index(models["hci_ac"], work / "index", data=data_dir, captions=cap_dir, cfg=cfg)
        stages.mark("index", {"dir": str(work / "index")})

    table_md, table_csv = format_table(results)
    atomic_write_text(work / "demo_results.md", table_md + "\n")
    atomic_write_text(work / "demo_results.csv", table_csv)
    return {"table": table_md, "results": results, "models": models, "runs": runs, "tracking_uri": uri,
            "workdir": str(work), "seconds": round(time.perf_counter() - t_start, 1)}


def format_table(results: dict[str, dict]) -> tuple[str, str]:
    """(markdown, csv) side-by-side table of the variants' test metrics, in DEMO_VARIANTS order."""
    return variants_table(results, {name: VARIANTS[name].label for name in DEMO_VARIANTS})
