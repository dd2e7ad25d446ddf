"""MLflow glue for training and evaluation: tracking URI, run create/resume, run metadata, plots, registry.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to an *absolute* tracking URI, never through
MLflow's process-global "active run". Why: the driver creates the run, the rank-0 Ray Train worker (another process,
maybe another working directory) logs the per-epoch metrics into the same run, and the driver logs the final model.
A relative ``sqlite:///mlflow.db`` would point each process at a different file; an absolute one points all of them at
the same database.

Layout of what a training run logs:

- params: the flattened resolved config (``Settings.flat()``), plus ``data.fingerprint`` and ``git.commit`` (if any);
- metrics (step = epoch): ``loss``, ``loss_<level>`` per HCI level, ``val_<metric>`` (``val_rsum``, ``val_t2a_R1`` ...);
- artifacts: ``config.yaml``, ``training_curve.png``, ``retrieval_examples.txt``, ``model/`` (the
  ``HciAtrModel.save_pretrained`` directory of the best checkpoint);
- registry: a new version of ``cfg.run.registered_model`` per finished run; the alias ``champion`` moves to it when
  its validation R-sum beats the current champion's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

from hci_atr.errors import ConfigError, ModelLoadError, one_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION_ALIAS = "champion"


# ---------------------------------------------------------------------------------------------------------------
# tracking URI
# ---------------------------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None = None, base_dir: str | os.PathLike | None = None) -> str:
    """Return an absolute tracking URI: ``uri`` or ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.

    Relative SQLite and file paths are made absolute against ``base_dir`` (default: the current directory), so Ray
    worker processes, whose working directory differs, write into the same store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    base = Path(base_dir or os.getcwd()).resolve()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):  # sqlite:////abs/path has a 4th slash; sqlite:///rel/path does not
            return f"sqlite:///{(base / path).resolve()}"
        return uri
    if uri.startswith("file:"):
        if uri.startswith("file:///"):
            return uri
        return (base / uri[len("file:"):]).resolve().as_uri()
    if "://" not in uri:  # a bare path is a file store
        return Path(base / uri).resolve().as_uri()
    return uri


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local SQLite database (``<db dir>/mlartifacts``) instead of the process's cwd."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def client(tracking_uri: str):
    """An MlflowClient for tracking and registry on the same (absolute) URI."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_root(tracking_uri))
    except Exception:  # another process created it in between
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_or_resume_run(tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None) -> str:
    """Return the id of run ``run_id`` if it exists (resume: status set back to RUNNING), else of a new run."""
    c = client(tracking_uri)
    if run_id:
        try:
            run = c.get_run(run_id)
        except Exception:
            run = None
        if run is not None:
            if run.info.status != "RUNNING":
                c.update_run(run_id, status="RUNNING")
            return run_id
    exp_id = get_or_create_experiment(tracking_uri, experiment)
    return c.create_run(exp_id, run_name=run_name).info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------------------------
# run metadata
# ---------------------------------------------------------------------------------------------------------------


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The HEAD commit of the git repository containing ``path`` (default: this package), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def data_fingerprint(features_dir: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) of the feature shards' file names, sizes and row counts.

    Cheap (reads parquet footers only) and changes whenever a shard is added, removed, rewritten with other rows or
    resized; two runs with the same fingerprint trained on the same feature files.
    """
    import pyarrow.parquet as pq

    root = Path(features_dir)
    files = sorted(p for p in root.rglob("*.parquet") if p.name != "errors.parquet" and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"{root}: no feature shards (*.parquet) found; run `hci-atr extract-features` first")
    h = hashlib.sha256()
    for p in files:
        rows = pq.ParquetFile(p).metadata.num_rows
        h.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\t{rows}\n".encode())
    return h.hexdigest()[:16]


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's limit); values that already exist with the same value are skipped.

    MLflow refuses to change a logged param, which is what we want on resume: the same run keeps the same config.
    """
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    items = [(k, _param_str(v)) for k, v in params.items()]
    changed = [k for k, v in items if k in existing and existing[k] != v]
    if changed:
        raise ConfigError(
            f"MLflow run {run_id} was started with other values for {', '.join(changed[:5])}; resume with the same "
            "config, or use a new --run-name"
        )
    todo = [Param(k, v) for k, v in items if k not in existing]
    for i in range(0, len(todo), 100):
        c.log_batch(run_id, params=todo[i:i + 100])


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s[:6000]


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    if ms:
        client(tracking_uri).log_batch(run_id, metrics=ms)


def logged_steps(tracking_uri: str, run_id: str, key: str) -> set[int]:
    """Steps at which ``key`` is already in the run's metric history (empty for a new run or an unknown key)."""
    return {int(m.step) for m in client(tracking_uri).get_metric_history(run_id, key)}


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def log_artifact(tracking_uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    p = Path(path)
    c = client(tracking_uri)
    if p.is_dir():
        c.log_artifacts(run_id, str(p), artifact_path)
    else:
        c.log_artifact(run_id, str(p), artifact_path)


# ---------------------------------------------------------------------------------------------------------------
# plots and examples
# ---------------------------------------------------------------------------------------------------------------


def plot_training_curve(history: list[dict[str, float]], path: str | os.PathLike) -> Path:
    """Write a PNG: training losses (left) and validation R-sum (right) per epoch. Matplotlib's Agg backend only."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) for h in history]
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_keys = sorted({k for h in history for k in h if k == "loss" or k.startswith("loss_")})
    for k in loss_keys:
        ax_l.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=k)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss")
    ax_l.legend(fontsize=7)
    ax_r.plot(epochs, [h.get("val_rsum", float("nan")) for h in history], marker="o", color="C3")
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("validation R-sum (t2a R@1+5+10, %)")
    fig.tight_layout()
    from workflows.report import save_figure

    return save_figure(fig, path, dpi=90)


def format_retrieval_examples(queries: Iterable[tuple[str, str, list[tuple[str, float]]]]) -> str:
    """Plain text: for each (query, true audio id, [(audio id, score), ...]) the ranked clips, true one marked."""
    lines = []
    for query, truth, ranked in queries:
        lines.append(f"query: {query!r}  (true clip: {truth})")
        for i, (aid, s) in enumerate(ranked, 1):
            mark = "  <== true clip" if aid == truth else ""
            lines.append(f"  {i}. {aid}  score={s:.4f}{mark}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


def register_model(tracking_uri: str, run_id: str, name: str, val_rsum: float | None,
                   artifact_path: str = "model", alias: str = CHAMPION_ALIAS) -> tuple[str, bool]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``; move ``alias`` to it if it beats
    the current holder's validation R-sum (or nobody holds it). Returns (version, became_alias_holder).

    The model is the project's own save format (not an MLflow flavour), so the version is created from the run's
    artifact location with ``create_model_version(source, run_id)``, which keeps the run link that
    ``mlflow.register_model`` would only keep for MLflow-flavoured models.
    """
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description="hci-atr audio-text retrieval models (HciAtrModel format)")
        except Exception:
            c.get_registered_model(name)  # created concurrently; re-raise if it still does not exist
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {"val_rsum": f"{val_rsum:.6f}"} if val_rsum is not None else {}
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags)
    current = None
    try:
        current = c.get_model_version_by_alias(name, alias)
    except Exception:
        current = None
    best_so_far = None
    if current is not None and "val_rsum" in (current.tags or {}):
        best_so_far = float(current.tags["val_rsum"])
    wins = current is None or (val_rsum is not None and (best_so_far is None or val_rsum > best_so_far))
    if wins:
        c.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version), wins


def resolve_model_ref(ref: str, tracking_uri: str | None = None, dst_dir: str | os.PathLike | None = None) -> Path:
    """A model directory for ``ref``: a local ``save_pretrained`` directory, or ``models:/name@alias`` /
    ``models:/name/version`` resolved through the MLflow registry and downloaded (to ``dst_dir`` or a temp dir)."""
    if not ref.startswith("models:/") and not ref.startswith("runs:/"):
        p = Path(ref)
        if not p.is_dir():
            raise ModelLoadError(f"{ref}: not a model directory (expected config.yaml + model.safetensors from "
                                 "`hci-atr train`) and not a models:/name@alias reference")
        return p
    import tempfile

    import mlflow.artifacts

    uri = resolve_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # artifact download resolves models:/ through the global registry URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="hci_atr_model_"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst))
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; the user needs the reference and the store
        raise ModelLoadError(f"{ref}: cannot resolve through the MLflow registry at {uri} ({one_line(e)}); "
                             "check the name/alias with `mlflow ui` or pass --tracking-uri") from None
    return Path(local)
