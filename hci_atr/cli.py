"""The ``hci-atr`` command line: thin. It parses options, calls a library function or a workflow, and maps project
errors to one line on stderr with a non-zero exit (``--verbose`` shows the traceback).

Workflows (Ray) are imported inside the commands, so ``hci-atr --help`` stays fast and needs no Ray start.
"""

from __future__ import annotations

import sys
import traceback

import click

from hci_atr.errors import HciAtrError

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
def make_demo_cmd(out_dir: str, seed: int, size: int, duration: float, sample_rate: int) -> None:
    """Synthesize the procedural demo dataset (sound scenes + Clotho-format caption CSVs)."""
    from hci_atr.data.demo import make_demo

    summary = make_demo(out_dir, seed=seed, size=size, duration=duration, sample_rate=sample_rate, progress=True)
    click.echo(summary)


def _pipeline_config(config, num_workers, batch_size, gpus_per_worker):
    from hci_atr.config import load_config

    return load_config(config, {"pipeline.num_workers": num_workers, "pipeline.batch_size": batch_size,
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
    import yaml

    from workflows.caption import caption_all

    kv = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        kv[key.strip()] = yaml.safe_load(value)
    if features:
        kv["features"] = features
    cfg = _pipeline_config(config, num_workers, batch_size, gpus_per_worker)
    m = caption_all(data, out, captioner=captioner, model=model, params=kv, cfg=cfg, fmt=fmt,
                    splits=_split_list(splits), seed=seed)
    click.echo(f"captions: {m['rows']} rows, {m['failed']} failed, {m['shards']} shards "
               f"({m['computed_shards']} computed) -> {out}")


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
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except HciAtrError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted; re-run the same command to resume", err=True)
        sys.exit(130)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    main()
