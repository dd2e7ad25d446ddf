"""The run directory of ``hci-atr train`` and its checkpoints: checkpoints written checksummed and fsync'd, checked
before a resume trusts one, and the choice of the one to resume from; the run file that a re-run resumes the MLflow
run from, and the settings a resume may change (:data:`RESUMABLE_KEYS`).

Run directory ``<storage_path>/<run_name>/`` (``run_dir``):
  config.yaml            the resolved config of the run
  hci_atr_run.json       {"mlflow_run_id", "tracking_uri", "data_fingerprint"}: what a re-run resumes
  checkpoint_*/          Ray Train checkpoints (best ``num_to_keep`` by val_rsum + the latest), each holding
                           model/ (HciAtrModel.save_pretrained), train_state.pt (FitState: epoch, history, best and
                           early-stopping state; optimizer state; loads with ``torch.load(weights_only=True)``),
                           meta.json (epoch, val_rsum, mlflow_run_id, sha256 of every other file; written last)
                         copied in under a temporary name, fsync'd and renamed (a crash leaves whole ones only)
  best_model/            the best checkpoint's model/ directory, exported after fit (load with from_pretrained)

Resume: running the same command again (same storage path and run name) makes Ray Train V2 restore its checkpoint
manager from the run directory; the loop starts after the checkpoint's epoch and the driver keeps logging into the
MLflow run named in ``hci_atr_run.json``. A worker that dies mid-epoch is restarted (``FailureConfig.max_failures``)
from the latest checkpoint the same way. A checkpoint that does not check out (checksum, truncated or foreign
train_state.pt) is passed over for the newest older one that does, with one line saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable

from hci_atr.errors import ConfigError, ModelLoadError, one_line
from hci_atr.files import atomic_write_bytes, atomic_write_text, copy_dir_atomic, fsync_tree
from workflows.settings import Settings

RUN_FILE = "hci_atr_run.json"
BEST_MODEL = "best_model"
# Settings keys a resumed run may change (they do not change what is learnt from the data, or only extend it).
RESUMABLE_KEYS = {"train.epochs", "run.max_failures", "run.num_workers", "run.use_gpu", "run.tracking_uri",
                  "run.storage_path", "train.early_stopping_patience", "run.features_dir", "run.data_mode",
                  "run.object_store_share", "run.shuffle", "run.shuffle_buffer_rows"}
CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"
CHECKPOINT_META = "meta.json"


# checkpoints: write (checksummed, fsync'd), check, pick the one to resume from


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(d: str | os.PathLike, model, optimizer, state, meta: dict) -> Path:
    """Fill the folder ``d``: model/ (save_pretrained), train_state.pt (:class:`hci_atr.training.FitState` +
    optimizer state: tensors, numbers, lists and dicts only, so it loads with ``weights_only=True``), and last
    meta.json (``meta`` + the sha256 of every other file); everything fsync'd."""
    import torch

    d = Path(d)
    model.save_pretrained(d / CHECKPOINT_MODEL)
    buf = io.BytesIO()
    torch.save({**state.to_dict(), "optimizer": optimizer.state_dict()}, buf)
    atomic_write_bytes(d / CHECKPOINT_STATE, buf.getvalue())
    files = {p.relative_to(d).as_posix(): _sha256(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_META}
    atomic_write_text(d / CHECKPOINT_META, json.dumps({**meta, "files": files}, indent=1))
    fsync_tree(d)
    return d


def _read_meta(d: Path) -> dict:
    doc = json.loads((d / CHECKPOINT_META).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{CHECKPOINT_META} is not a JSON object")
    return doc


def _load_state(d: Path) -> dict:
    import torch

    # weights_only: a checkpoint is data; unpickling arbitrary objects from it would run their code
    state = torch.load(d / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{CHECKPOINT_STATE} holds a {type(state).__name__}, not a dict")
    return state


def checkpoint_problem(d: str | os.PathLike) -> str | None:
    """Why the checkpoint folder ``d`` cannot be resumed from (one line), or None when it can.

    Checked against the checksums in its meta.json; a checkpoint written before they were recorded must at least
    have a train_state.pt that loads."""
    d = Path(d)
    try:
        meta = _read_meta(d)
    except (OSError, ValueError) as e:
        return f"{CHECKPOINT_META}: {one_line(e)}"
    files = meta.get("files")
    if isinstance(files, dict) and files:
        for rel, digest in sorted(files.items()):
            p = d / rel
            if not p.is_file():
                return f"{rel} is missing"
            if _sha256(p) != digest:
                return f"{rel} does not match its checksum"
        return None
    try:
        _load_state(d)
    except Exception as e:  # noqa: BLE001 - truncated file, foreign pickle, ...
        return f"{CHECKPOINT_STATE}: {one_line(e)}"
    return None


def checkpoint_epoch(d: str | os.PathLike) -> int | None:
    try:
        return int(_read_meta(Path(d))["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_checkpoint(d: str | os.PathLike):
    """``(model state_dict, hci_atr.training.Resume)`` of a checkpoint folder; a ModelLoadError when it does not
    load (checksum, truncated file, a pickle that is not plain data)."""
    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import FitState, Resume

    d = Path(d)
    why = checkpoint_problem(d)
    if why is None:
        try:
            state = _load_state(d)
            weights = HciAtrModel.from_pretrained(d / CHECKPOINT_MODEL).state_dict()
            fit_state = FitState.from_dict(state)
        except Exception as e:  # noqa: BLE001
            why = one_line(e)
    if why is not None:
        raise ModelLoadError(f"{d}: {why}")
    return weights, Resume(fit_state, state.get("optimizer"))


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's Ray Train checkpoint folders, oldest first (Ray names them by time)."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def resume_checkpoint(latest: str | os.PathLike | None,
                      run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from: ``latest`` (what Ray Train hands the workers) when it checks out, else the
    newest older one of the run that does (Ray keeps ``num_to_keep`` of them). Returns it (None: none checks out)
    and the (folder, why) of each newer one passed over."""
    if latest is None:
        return None, []
    latest = Path(latest)
    candidates = [latest] + [p for p in reversed(checkpoint_dirs(run_dir)) if p.name < latest.name]
    skipped: list[tuple[Path, str]] = []
    for p in candidates:
        why = checkpoint_problem(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def resume_note(chosen: Path, skipped: list[tuple[Path, str]]) -> str:
    """The one line that says a resume passes over unreadable checkpoints."""
    bad = ", ".join(p.name for p, _ in skipped)
    e = checkpoint_epoch(chosen)
    return (f"resume: checkpoint {bad} is unreadable ({skipped[0][1]}); resuming from the previous one, "
            f"{chosen.name} (epoch {e}); the epochs after it are trained again")


def no_checkpoint_loads(run_dir: Path, skipped: list[tuple[Path, str]]) -> ModelLoadError:
    return ModelLoadError(f"{run_dir}: no checkpoint of this run loads ({skipped[0][0].name}: {skipped[0][1]}); "
                           f"pass a new --run-name to train afresh")


def upload_fsynced(run_dir: Path):
    """A ``ray.train.report`` upload: the checkpoint folder is copied into the run directory under a temporary name,
    fsync'd and renamed into place, so a crash leaves a whole checkpoint or none."""
    def upload(checkpoint, dir_name: str):
        import ray.train

        return ray.train.Checkpoint.from_directory(str(copy_dir_atomic(checkpoint.path, run_dir / dir_name)))
    return upload


def run_dir_for(cfg: Settings) -> Path:
    return Path(cfg.run.storage_path).resolve() / cfg.run.run_name


def read_run_file(run_dir: Path) -> dict:
    p = run_dir / RUN_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e}); delete it to start the run's MLflow tracking afresh") from None


def check_resume_config(run_dir: Path, cfg: Settings) -> None:
    """A re-run with the same name must train the same thing: only RESUMABLE_KEYS may differ from config.yaml."""
    p = run_dir / "config.yaml"
    if not p.is_file():
        return
    from workflows.settings import load_settings

    old = load_settings(p).flat()
    new = cfg.flat()
    changed = [k for k in new if k not in RESUMABLE_KEYS and old.get(k) != new[k]]
    if changed:
        raise ConfigError(
            f"{run_dir}: a run named '{cfg.run.run_name}' exists with other settings for "
            f"{', '.join(changed[:6])}; re-run with the same settings to resume, or pass a new --run-name"
        )


def export_model_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a model directory to ``dst`` atomically: copy to a temp sibling, then swap it into place."""
    return copy_dir_atomic(src, dst)


def precheck_resume(run_dir: Path, say: Callable[[str], None]) -> list[str]:
    """Before the workers start: when the run's newest checkpoint does not check out, say (one line) which older one
    the resume falls back to, and refuse when none does. Returns the names passed over (the workers do not repeat
    the line)."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return []
    chosen, skipped = resume_checkpoint(dirs[-1], run_dir)
    if chosen is None:
        raise no_checkpoint_loads(run_dir, skipped)
    if skipped:
        say(resume_note(chosen, skipped))
    return [p.name for p, _ in skipped]


def best_checkpoint(result) -> tuple[Path | None, dict]:
    """The reported checkpoint with the best val_rsum that checks out, and its metrics."""
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: float(cm[1].get("val_rsum", float("-inf"))),
                    reverse=True)
    for c, m in ranked:
        if checkpoint_problem(c.path) is None:
            return Path(c.path), dict(m)
    if result.checkpoint is not None and checkpoint_problem(result.checkpoint.path) is None:
        return Path(result.checkpoint.path), {}
    return None, {}
