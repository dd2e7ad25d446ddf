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


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="hci-atr", standalone_mode=False)
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
