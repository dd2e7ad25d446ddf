"""What one Ray task of ``hci-atr ablate`` runs (plain PyTorch, no Ray here): train and evaluate one variant x seed
with the library's fit loop in-process, and caption rows with the ``nearest`` backend (leave-one-out, optionally
from a bank without a cross-fitting fold). :mod:`workflows.ablation` builds the tasks and the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from hci_atr.errors import ConfigError
from workflows.settings import Settings


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


def epoch_line(label: str, end, epochs: int, patience: int = 0) -> str:
    """One progress line for a finished epoch (an :class:`hci_atr.training.EpochEnd`; epochs counted from 1): loss,
    validation R-sum, the best so far, and how close early stopping is."""
    m, st = end.metrics, end.state
    wait = f", {st.bad_epochs}/{patience} without a better one" if patience > 0 and st.bad_epochs else ""
    return (f"{label}: epoch {end.epoch + 1}/{epochs} loss {m.get('loss_total', float('nan')):.3f}, val R-sum "
            f"{m['val_rsum']:.1f} (best {st.best_rsum:.1f} at epoch {st.best_epoch + 1}{wait}), "
            f"{m.get('epoch_seconds', 0.0):.0f} s" + (" - stopping early" if end.stop else ""))


def train_and_evaluate(cfg: Settings, train_rows: list[dict], val_rows: list[dict], test_rows: list[dict], *,
                       captions: dict[str, str] | None = None, model_dir: str | os.PathLike | None = None,
                       threads: int = 1, pairs: Sequence | None = None, label: str | None = None) -> dict[str, Any]:
    """Train ``HciAtrModel(cfg)`` with the library's fit loop (:func:`hci_atr.training.fit`, in-process hooks: the
    same seeding, warm-up, best epoch and early stopping as each ``hci-atr train`` worker), put back the epoch with
    the best validation R-sum, evaluate it on ``test_rows``. Returns ``{"test": metrics, "val": metrics,
    "per_query", "best_epoch", "epochs_run", "stopped_early", "history", "seconds", "threads"}`` (metrics as
    :func:`hci_atr.training.evaluate` gives them, in percent; ``test`` also has the pair accuracies of ``pairs``
    (:func:`hci_atr.data.pairs.read_pairs` of ``test_rows``); ``per_query`` as :func:`split_outcomes`).
    ``model_dir``: save the best model there. ``label``: print a progress line per epoch (:func:`epoch_line`).

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
    def progress(end) -> None:
        print(epoch_line(label, end, tc.epochs, tc.early_stopping_patience), flush=True)

    hooks = InProcess(cfg, train_rows, val_rows, batch_size=min(tc.batch_size, len(train_rows)),
                      progress=None if label is None else progress)
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
                     bank_split: str = "train", threads: int = 1, batch_size: int = 32,
                     min_confidence: float | None = None, bank_exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Caption every row with the ``nearest`` backend on the model in ``model_dir`` (caption bank: the
    ``bank_split`` rows of ``features_dir``). Returns ``{"captions": {audio_id: caption}, "errors": {...},
    "ignored": n}``: captions below ``min_confidence`` (``model.ac_min_confidence``) are left out, as
    :func:`hci_atr.data.shards.read_captions` leaves them out of a caption-all output. ``bank_exclude``: clips left
    out of the bank (cross-fitting: a fold is captioned from the other folds' clips only).

    Rows need ``audio_id``, ``audio_path`` and ``captions`` (the own captions, only used to exclude them).
    """
    import torch

    from hci_atr.captioners.nearest import NearestCaptioner
    from hci_atr.data.shards import trusted

    torch.set_num_threads(max(1, int(threads)))
    cap = NearestCaptioner(str(model_dir), features=str(features_dir), split=bank_split)
    if bank_exclude:
        cap.use_bank(cap.bank.without(bank_exclude))
    out: dict[str, str] = {}
    errors: dict[str, str] = {}
    ignored = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {"audio_id": np.array([r["audio_id"] for r in chunk], dtype=object),
                 "audio_path": np.array([r["audio_path"] for r in chunk], dtype=object),
                 "captions": np.empty(len(chunk), dtype=object)}
        for j, r in enumerate(chunk):  # one list per cell (np.array of lists would make a 2-D array)
            batch["captions"][j] = list(r["captions"])
        res = cap(batch)
        for aid, text, err, conf in zip(res["audio_id"], res["generated_caption"], res["error"],
                                        res["confidence"]):
            if err:
                errors[str(aid)] = str(err)
            elif text and trusted(float(conf), min_confidence):
                out[str(aid)] = str(text)
            elif text:
                ignored += 1
    return {"captions": out, "errors": errors, "ignored": ignored}


def caption_folds(audio_ids: Sequence[str], k: int, seed: int) -> dict[str, int]:
    """Cross-fitting folds of the training clips: audio_id -> fold in ``range(k)``, a seeded permutation of the
    sorted ids dealt round-robin (equal sizes within one; the same ids, k and seed give the same folds)."""
    ids = sorted(audio_ids)
    order = np.random.default_rng(int(seed)).permutation(len(ids))
    return {ids[int(j)]: pos % int(k) for pos, j in enumerate(order)}


def merge_captions(parts: Sequence[dict]) -> dict[str, Any]:
    """Caption results (:func:`nearest_captions`) of disjoint row sets -> one: captions, errors, ignored."""
    out: dict[str, Any] = {"captions": {}, "errors": {}, "ignored": 0}
    for p in parts:
        out["captions"].update(p["captions"])
        out["errors"].update(p["errors"])
        out["ignored"] += int(p.get("ignored", 0))
    return out
