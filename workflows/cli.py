"""The ``hci-atr`` command line: thin. It parses options, calls a library function or a workflow, and maps project
errors to one line on stderr with a non-zero exit (``--verbose`` shows the traceback).

Workflows (Ray) are imported inside the commands, so ``hci-atr --help`` stays fast and needs no Ray start.
"""

from __future__ import annotations

import sys
import traceback

import click

from hci_atr.errors import ConfigError, HciAtrError, one_line

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--verbose", "-v", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="hci-atr")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """hci-atr: audio-text retrieval with hierarchical cross-modal interaction and auxiliary captions, on Ray."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


@cli.command("make-demo")
@click.option("--out", "out_dir", default="demo_data", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write the demo dataset into (Clotho layout).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--size", default=240, show_default=True, type=click.IntRange(min=6),
              help="Number of clips over all splits.")
@click.option("--duration", default=5.0, show_default=True, type=click.FloatRange(min=1.0, max=30.0),
              help="Seconds per clip.")
@click.option("--sample-rate", default=32000, show_default=True, type=click.IntRange(min=8000))
@click.option("--pairs-in-split", is_flag=True,
              help="Put each variation in the split of the clip it varies (a compositional benchmark: every split "
                   "holds order/attribute/count pairs for `hci-atr evaluate --pairs`).")
def make_demo_cmd(out_dir: str, seed: int, size: int, duration: float, sample_rate: int, pairs_in_split: bool) -> None:
    """Synthesize the procedural demo dataset (sound scenes + Clotho-format caption CSVs)."""
    from hci_atr.data.demo import make_demo

    summary = make_demo(out_dir, seed=seed, size=size, duration=duration, sample_rate=sample_rate, progress=True,
                        pairs_in_split=pairs_in_split)
    click.echo(summary)


def _pipeline_config(config, num_workers, batch_size, gpus_per_worker):
    from workflows.settings import load_settings

    return load_settings(config, {"pipeline.num_workers": num_workers, "pipeline.batch_size": batch_size,
                                "pipeline.gpus_per_worker": gpus_per_worker})


def _pipeline_options(fn):
    """Options shared by the Ray Data pipelines (extract-features, caption-all)."""
    opts = [
        click.option("--data", required=True, type=click.Path(),
                     help="Dataset: Clotho/AudioCaps folder or manifest CSV/JSONL."),
        click.option("--format", "fmt", default="auto", show_default=True,
                     type=click.Choice(["auto", "clotho", "audiocaps", "manifest"])),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Output parquet directory (re-run the same command to resume)."),
        click.option("--splits", default=None, help="Comma-separated splits to process (default: all)."),
        click.option("--num-workers", type=click.IntRange(min=1), default=None, help="Actors [pipeline.num_workers]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Rows per batch [pipeline.batch_size]."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                     help="GPUs per actor [pipeline.gpus_per_worker]."),
        click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--cluster", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Run as a Ray job on the cluster of this cluster-launcher YAML (see cluster.yaml)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _submit_if_cluster(ctx: click.Context, cluster: str | None) -> None:
    if cluster:
        from workflows.cluster import submit_self_as_job

        sys.exit(submit_self_as_job(cluster, ctx.find_root().obj.get("argv") or sys.argv[1:]))


def parse_key_values(items, param_hint: str) -> dict:
    """``KEY=VALUE`` items -> {key: YAML value}; a missing ``=`` or key is a one-line usage error."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=param_hint)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _split_list(splits: str | None) -> list[str] | None:
    return [s.strip() for s in splits.split(",") if s.strip()] if splits else None


@cli.command("extract-features")
@_pipeline_options
@click.pass_context
def extract_features_cmd(ctx, data, fmt, out, splits, num_workers, batch_size, gpus_per_worker, config, seed,
                         cluster) -> None:
    """Decode, resample and log-mel every clip into feature shards (Ray Data; resumable)."""
    _submit_if_cluster(ctx, cluster)
    from workflows.features import extract_features

    cfg = _pipeline_config(config, num_workers, batch_size, gpus_per_worker)
    m = extract_features(data, out, cfg=cfg, fmt=fmt, splits=_split_list(splits), seed=seed)
    click.echo(f"features: {m['rows']} rows, {m['failed']} failed, {m['shards']} shards "
               f"({m['computed_shards']} computed) -> {out}")


@cli.command("caption-all")
@_pipeline_options
@click.option("--captioner", required=True, type=click.Choice(["nearest", "blip", "audio"]))
@click.option("--model", default=None, help="HF id (in the local cache) or local directory of the captioner model.")
@click.option("--features", default=None, type=click.Path(file_okay=False),
              help="Training feature shards (nearest captioner).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Backend parameter, repeatable (e.g. --param num_frames=3).")
@click.pass_context
def caption_all_cmd(ctx, data, fmt, out, splits, num_workers, batch_size, gpus_per_worker, config, seed, cluster,
                    captioner, model, features, params) -> None:
    """Write one auxiliary caption per clip with a captioner backend (Ray Data actors; resumable)."""
    _submit_if_cluster(ctx, cluster)
    from workflows.caption import caption_all, format_quality

    kv = parse_key_values(params, "--param")
    if features:
        kv["features"] = features
    cfg = _pipeline_config(config, num_workers, batch_size, gpus_per_worker)
    m = caption_all(data, out, captioner=captioner, model=model, params=kv, cfg=cfg, fmt=fmt,
                    splits=_split_list(splits), seed=seed)
    click.echo(f"captions: {m['rows']} rows, {m['failed']} failed, {m['shards']} shards "
               f"({m['computed_shards']} computed) -> {out}")
    click.echo(format_quality(m.get("quality") or {}))


# ---------------------------------------------------------------------------------------------------------------
# training and evaluation (workflows/train.py, workflows/evaluate.py)
# ---------------------------------------------------------------------------------------------------------------

# CLI flag -> dotted config key, for every model / ablation switch and training setting `train` exposes.
_TRAIN_FLAG_KEYS = {
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "num_workers": "run.num_workers", "use_gpu": "run.use_gpu", "run_name": "run.run_name",
    "storage_path": "run.storage_path", "tracking_uri": "run.tracking_uri",
    "early_stopping": "train.early_stopping_patience", "max_failures": "run.max_failures",
    "experiment": "run.experiment", "registered_model": "run.registered_model", "all_gather": "train.all_gather",
    "data_mode": "run.data_mode",
    "clip": "model.use_clip", "segment": "model.use_segment", "frame": "model.use_frame",
    "ac_fusion": "model.ac_fusion", "ac_branch": "model.ac_branch", "ac_augment": "model.ac_augment",
    "level_weights": "model.level_weights", "learn_level_weights": "model.learn_level_weights",
    "audio_encoder": "model.audio_encoder", "audio_width": "model.audio_width",
    "audio_checkpoint": "model.audio_checkpoint", "text_encoder": "model.text_encoder",
    "freeze_text": "model.freeze_text", "embed_dim": "model.embed_dim", "phrase_mode": "model.phrase_mode",
}


def train_overrides(**flags) -> dict:
    """CLI flags -> dotted config overrides (None = not given, keeps the YAML/default). ``ac`` sets all three AC uses
    unless a specific --ac-fusion/--ac-branch/--ac-augment flag says otherwise."""
    out = {key: flags.get(name) for name, key in _TRAIN_FLAG_KEYS.items() if flags.get(name) is not None}
    if flags.get("ac") is not None:
        for use in ("ac_fusion", "ac_branch", "ac_augment"):
            if flags.get(use) is None:
                out[f"model.{use}"] = flags["ac"]
    return out


def _train_options(fn):
    opts = [
        click.option("--features", required=True, type=click.Path(file_okay=False), help="Feature shards directory."),
        click.option("--captions", default=None, type=click.Path(file_okay=False),
                     help="Generated captions directory (caption-all output); needed for the AC uses."),
        click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file."),
        click.option("--num-workers", type=click.IntRange(min=1), default=None, help="Ray Train workers [train.num_workers]."),
        click.option("--use-gpu/--no-use-gpu", default=None, help="One GPU per worker [train.use_gpu]."),
        click.option("--epochs", type=click.IntRange(min=1), default=None),
        click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Per worker [train.batch_size]."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None),
        click.option("--seed", type=int, default=None, help="Same seed + worker count -> same CPU numbers."),
        click.option("--run-name", default=None, help="Ray Train run name; re-run with the same name to resume."),
        click.option("--storage-path", default=None, type=click.Path(file_okay=False),
                     help="Where runs and checkpoints live [train.storage_path]."),
        click.option("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                     "sqlite:///mlflow.db in the working directory)."),
        click.option("--experiment", default=None, help="MLflow experiment name."),
        click.option("--registered-model", default=None, help="MLflow registered model name."),
        click.option("--early-stopping", type=click.IntRange(min=0), default=None,
                     help="Stop after N epochs without a better validation R-sum (0 = off)."),
        click.option("--max-failures", type=click.IntRange(min=0), default=None,
                     help="Worker-group restarts from the last checkpoint before giving up."),
        click.option("--all-gather/--no-all-gather", default=None,
                     help="Contrastive negatives from all workers (default) or only the local batch."),
        click.option("--data-mode", type=click.Choice(["auto", "materialize", "stream"]), default=None,
                     help="Training rows held in the object store (materialize) or read per epoch from the shards "
                          "(stream); auto streams when the split would take over run.object_store_share of the "
                          "object store [run.data_mode]."),
        click.option("--clip/--no-clip", default=None, help="HCI clip-sentence level."),
        click.option("--segment/--no-segment", default=None, help="HCI segment-phrase level."),
        click.option("--frame/--no-frame", default=None, help="HCI frame-word level."),
        click.option("--ac/--no-ac", default=None, help="All three auxiliary-caption uses at once."),
        click.option("--ac-fusion/--no-ac-fusion", default=None, help="AC use 1: audio attends to the caption."),
        click.option("--ac-branch/--no-ac-branch", default=None, help="AC use 2: query vs caption branch."),
        click.option("--ac-augment/--no-ac-augment", default=None, help="AC use 3: (audio, caption) extra pairs."),
        click.option("--level-weights", default=None, help="clip,segment,frame weights, e.g. 1,0.5,0.5."),
        click.option("--learn-level-weights/--fixed-level-weights", default=None),
        click.option("--audio-encoder", type=click.Choice(["cnn-small", "cnn14"]), default=None),
        click.option("--audio-width", type=click.IntRange(min=1), default=None, help="cnn-small first-block channels."),
        click.option("--audio-checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="PANNs Cnn14 .pth (cnn14)."),
        click.option("--text-encoder", default=None, help="'minilm' (packaged), an HF id in the cache or a local dir."),
        click.option("--freeze-text/--train-text", default=None),
        click.option("--embed-dim", type=click.IntRange(min=2), default=None),
        click.option("--phrase-mode", type=click.Choice(["chunk", "ngram"]), default=None),
        click.option("--cluster", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Run as a Ray job on the cluster of this cluster-launcher YAML (see cluster.yaml)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command("train")
@_train_options
@click.pass_context
def train_cmd(ctx, features, captions, config, cluster, **flags) -> None:
    """Train on N Ray Train workers with MLflow tracking; checkpoints every epoch, re-run to resume."""
    _submit_if_cluster(ctx, cluster)
    from workflows.settings import load_settings
    from workflows.train import train

    cfg = load_settings(config, train_overrides(**flags))
    res = train(cfg, features, captions, echo=click.echo)
    m = res.metrics
    click.echo(f"best epoch {int(m.get('epoch', -1))}: val R-sum {m.get('val_rsum', float('nan')):.2f} "
               f"(t2a R@1 {m.get('val_t2a_R1', float('nan')):.2f}, a2t R@1 {m.get('val_a2t_R1', float('nan')):.2f})")
    click.echo(f"model: {res.model_dir}")
    click.echo(f"MLflow run: {res.mlflow_run_id}" + (f"; registered version {res.model_version}"
                                                      if res.model_version else ""))


@cli.command("evaluate")
@click.option("--model", "model_ref", required=True,
              help="Model directory (save_pretrained layout) or models:/name@alias from the MLflow registry.")
@click.option("--features", required=True, type=click.Path(file_okay=False), help="Feature shards directory.")
@click.option("--split", default="test", show_default=True)
@click.option("--captions", default=None, type=click.Path(file_okay=False), help="Generated captions (AC models).")
@click.option("--rerank-k", type=click.IntRange(min=1), default=None,
              help="Approximate: rank by the clip level, rescore only the top K with the full HCI(+AC) score.")
@click.option("--log-mlflow", is_flag=True, help="Log the metrics to a new MLflow run in the evaluation experiment.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (registry look-ups and --log-mlflow).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
@click.option("--use-gpu", is_flag=True, help="Embed and score on CUDA.")
@click.option("--pairs", "pairs_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Hard-negative pair file (make-demo writes DATA/demo_pairs.json): adds pair accuracy per type "
                   "(order, attribute, count, background; chance 0.5) over the pairs whose two clips are in --split.")
def evaluate_cmd(model_ref, features, split, captions, rerank_k, log_mlflow, tracking_uri, as_json, use_gpu,
                 pairs_file) -> None:
    """Retrieval metrics (both directions, R@1/5/10, mAP@10, median rank) of a model on one split."""
    import json as _json

    from workflows.evaluate import evaluate, format_table

    if use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--use-gpu: no CUDA device is visible here; drop the flag to evaluate on the CPU")
    m = evaluate(model_ref, features, split, captions_dir=captions, rerank_k=rerank_k, log_mlflow=log_mlflow,
                 tracking_uri=tracking_uri, device="cuda" if use_gpu else "cpu", pairs_file=pairs_file)
    click.echo(_json.dumps(m.to_dict(), indent=1, sort_keys=True) if as_json
               else format_table(m.metrics, title=f"{model_ref} on {split}"))


@cli.command("index")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Trained model directory (save_pretrained layout).")
@click.option("--data", default=None, type=click.Path(exists=True), help="Dataset: Clotho/AudioCaps folder or manifest.")
@click.option("--audio-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Or: a folder of audio files (ids = paths relative to it).")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "clotho", "audiocaps", "manifest"]))
@click.option("--splits", default=None, help="Comma-separated splits to index (default: all).")
@click.option("--captions", default=None, type=click.Path(exists=True), help="Generated captions (caption-all output).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index directory (replaced atomically).")
@click.option("--num-workers", type=click.IntRange(min=1), default=None, help="Ray Data actors [pipeline.num_workers].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Clips per batch [pipeline.batch_size].")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
def index_cmd(model_dir, data, audio_dir, fmt, splits, captions, out, num_workers, batch_size, config) -> None:
    """Embed an audio collection with a trained model (Ray Data) into a search index for `serve run`."""
    from workflows.settings import load_settings
    from workflows.index import build_index

    s = build_index(model_dir, out, data=data, audio_dir=audio_dir, captions=captions, fmt=fmt,
                    splits=_split_list(splits), cfg=load_settings(config), num_workers=num_workers,
                    batch_size=batch_size)
    click.echo(f"index: {s.clips} clips ({s.failed} failed) -> {s.out} (version {s.version}) in {s.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# the main job
# ---------------------------------------------------------------------------------------------------------------


@cli.command("demo")
@click.option("--workdir", default="hci_atr_runs", show_default=True, type=click.Path(file_okay=False),
              help="Where the dataset, features, runs, models, index and table go.")
@click.option("--quick", is_flag=True, help="Tiny dataset and 2 epochs: a fast first look (noisy numbers).")
@click.option("--size", type=click.IntRange(min=24), default=None, help="Clips in the demo dataset [240; quick: 48].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per trained model [12; quick: 2].")
@click.option("--num-workers", type=click.IntRange(min=1), default=None, help="Ray Train / Ray Data workers [2].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config applied under the demo settings.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [$MLFLOW_TRACKING_URI or sqlite:///mlflow.db].")
def demo_cmd(workdir, quick, size, epochs, num_workers, seed, config_path, tracking_uri) -> None:
    """Run the whole pipeline on the built-in demo dataset and print a side-by-side table.

    make-demo -> extract-features -> train clip-only and HCI -> caption-all (nearest) -> train HCI+AC -> evaluate
    all three on the test split -> index for serving. Re-run the same command to resume after an interruption.
    """
    from workflows.demo import DemoSettings, run_demo
    from workflows.settings import load_settings

    from workflows.demo import QUICK_SIZE

    flags = {"train.epochs": epochs, "run.num_workers": num_workers}
    s = DemoSettings(workdir=workdir, seed=seed, size=size or (QUICK_SIZE if quick else 240), quick=quick,
                     overrides=tuple((k, v) for k, v in flags.items() if v is not None))
    base = load_settings(config_path) if config_path else None
    out = run_demo(s, base=base, tracking_uri=tracking_uri, echo=click.echo)
    click.echo("")
    click.echo(f"Test split of the demo dataset (percent; {out['seconds']:.0f} s in all):")
    click.echo(out["table"])
    click.echo("")
    click.echo(f"Table saved to {out['workdir']}/demo_results.md and .csv.")
    click.echo(f"MLflow: mlflow ui --backend-store-uri {out['tracking_uri']}   (experiment 'hci-atr-demo')")
    click.echo("Serve:  serve run serve.app:deployment   then open http://127.0.0.1:8000/")


@cli.command("ablate")
@click.option("--preset", default=None, type=click.Choice(["compositional"]),
              help="A named setup; flags given here win over its values. compositional: 2000 demo clips (300 test "
                   "clips) with the hard-negative pairs inside each split, clip-seconds 5, cnn-small width 8, up to 40 "
                   "epochs with early stopping after 4 without a better validation R-sum, variants clip, hci, "
                   "hci_order, hci_order_hard.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Features, per-run JSON results, table, plot (re-run resumes) [hci_atr_runs/ablation; with "
                   "--preset P: hci_atr_runs/ablation-P].")
@click.option("--data", default=None, type=click.Path(), help="Dataset path (any reader format); default: the demo.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "clotho", "audiocaps", "manifest"]))
@click.option("--size", type=click.IntRange(min=12), default=None,
              help="Demo clips (no --data) [240; compositional: 2000].")
@click.option("--pairs-in-split", is_flag=True, default=None,
              help="Demo data with each hard-negative pair inside one split, so the test split holds pairs "
                   "(make-demo --pairs-in-split) [compositional: on].")
@click.option("--pairs", "pairs_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Hard-negative pair file scored on the test split [the dataset's demo_pairs.json if it has one].")
@click.option("--duration", type=click.FloatRange(min=1.0, max=30.0), default=None,
              help="Demo clip seconds and crop length [audio.duration].")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Base YAML config (the budget every variant shares).")
@click.option("--variants", default=None, help="Comma-separated variants, the first the baseline (default: clip, "
              "clip_segment, clip_frame, hci, hci_acfusion, hci_ac, clip_ac; also hci_order, hci_order_hard).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=2), default=None)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--temperature", type=click.FloatRange(min=0.01, max=1.0), default=None,
              help="Initial temperature of every level [model.init_temperature].")
@click.option("--audio-width", type=click.IntRange(min=1), default=None, help="cnn-small first-block channels.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any config override for every variant, repeatable (e.g. --set model.segment_size=4).")
@click.option("--caption-variant", default="clip", show_default=True,
              help="Variant whose model (same seed, trained on the training split) writes the auxiliary captions.")
@click.option("--ac-folds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cross-fit the training clips' auxiliary captions over K folds (K more caption-model trainings "
                   "per seed); 1: one caption model for every clip.")
@click.option("--test-split", default="test", show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [$MLFLOW_TRACKING_URI or sqlite:///mlflow.db].")
@click.option("--experiment", default="hci-atr-ablation", show_default=True)
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@click.option("--no-resume", is_flag=True, help="Retrain every variant x seed even if its result JSON exists.")
@click.option("--publish", default=None, type=click.Path(file_okay=False),
              help="Also copy table.md, table.csv and ablation.png into this folder (e.g. bench/results).")
def ablate_cmd(preset, out_dir, data, fmt, size, pairs_in_split, pairs_file, duration, config_path, variants, seeds,
               epochs, batch_size, lr, temperature, audio_width, sets, caption_variant, ac_folds, test_split,
               tracking_uri, experiment, no_mlflow, no_resume, publish) -> None:
    """Train and evaluate every ablation variant x seed as Ray tasks; table (mean ± std, paired differences to the
    first variant with 95 % bootstrap intervals, pair accuracy per type) + plot + MLflow."""
    import shlex

    from hci_atr.config import NULL
    from workflows.settings import load_settings
    from workflows import ablation
    from workflows.variants import get_preset

    overrides = {"train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
                 "model.init_temperature": temperature, "model.audio_width": audio_width, "audio.duration": duration}
    for key, parsed in parse_key_values(sets, "--set").items():
        overrides[key] = NULL if parsed is None else parsed  # "null" / "~" / "": clear the field
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    p = get_preset(preset) if preset else None
    cfg = load_settings(config_path).override(p.overrides if p else {}, f"preset {preset}")
    cfg = cfg.override(overrides, "command line")  # flags win over the preset
    res = ablation.run_ablation(
        out_dir or ("hci_atr_runs/ablation" + (f"-{preset}" if preset else "")), cfg=cfg, data=data, fmt=fmt,
        demo_size=size or (p.demo_size if p else 240), variants=variants or (p.variants if p else None),
        demo_pairs_in_split=bool(pairs_in_split or (p.pairs_in_split if p else False)), pairs_file=pairs_file,
        seeds=seed_list, caption_variant=caption_variant, ac_folds=ac_folds, test_split=test_split,
        tracking_uri=tracking_uri,
        experiment=experiment, log_mlflow=not no_mlflow, resume=not no_resume,
        command="hci-atr " + shlex.join(click.get_current_context().find_root().obj.get("argv") or ["ablate"]),
        echo=click.echo)
    click.echo("")
    click.echo(res.markdown)
    click.echo(f"{res.computed} runs trained now, {len(res.results) - res.computed} resumed; "
               f"table/plot in {res.out_dir}")
    if publish:
        for path in ablation.publish_results(res.out_dir, publish):
            click.echo(f"published {path}")


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="hci-atr", standalone_mode=False,
                 obj={"argv": list(sys.argv[1:] if argv is None else argv)})  # raw args: --cluster resubmits them
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as e:
        # one line, not the usage block: say what is wrong and where the help is
        cmd = e.ctx.command_path if e.ctx is not None else "hci-atr"
        click.echo(f"error: {one_line(e.format_message())} (see '{cmd} --help')", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.ClickException as e:
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except HciAtrError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {one_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted; re-run the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
