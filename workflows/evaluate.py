"""hci-atr evaluate: retrieval metrics of a saved model on one split of the feature shards, as a plain-text table.

The model is a ``save_pretrained`` directory or ``models:/name@alias`` (``models:/name/version``) resolved through the
MLflow registry. The split is small enough for one process (no Ray needed): every clip and caption is embedded once
(:func:`hci_atr.training.embed_split`) and scored all-against-all with the full fused HCI(+AC) score.

``rerank_k`` gives the two-stage search the serving app uses, measured offline: rank by the clip level alone (a dot
product of pooled embeddings), then rescore only the top K candidates with the full score. It is an *approximation*
of full scoring: a relevant item outside the clip-level top K keeps its clip-level position (below all K candidates),
so recall at ranks <= K can only be lost, never gained, relative to what the clip level finds.

``pairs_file`` (``--pairs``) adds the compositional benchmark: a hard-negative pair file (:mod:`hci_atr.data.pairs`,
e.g. make-demo's ``demo_pairs.json``); its pairs whose two clips are in the split are scored with the full fused score
(:func:`hci_atr.metrics.pair_accuracy`: ``pairs_acc``, ``pairs_<type>_acc`` / ``_n``, chance 0.5).

:func:`retrieval_examples` is the qualitative side, logged with every training run: a few text queries and the clips
they rank first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from hci_atr.errors import ConfigError
from workflows.settings import Settings

# Rows of the printed table: (label, metric suffix, format)
TABLE_ROWS = [("R@1", "R1", "{:.2f}"), ("R@5", "R5", "{:.2f}"), ("R@10", "R10", "{:.2f}"),
              ("mAP@10", "mAP10", "{:.2f}"), ("median rank", "medr", "{:.1f}"), ("mean rank", "meanr", "{:.2f}")]


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: ``metrics`` (``t2a_R1 .. a2t_meanr``, ``rsum``, per-level ``<level>_rsum``,
    ``n_audio``, ``n_text``; ``rerank_k`` when reranked; ``pairs_*`` with a pair file), what was evaluated, and the
    MLflow run it was logged to."""

    metrics: dict[str, float]
    model_ref: str
    split: str
    rerank_k: int | None = None
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics, plus ``mlflow_run_id`` when logged (what ``hci-atr evaluate --json`` prints)."""
        return {**self.metrics, **({"mlflow_run_id": self.mlflow_run_id} if self.mlflow_run_id else {})}


def _rerank_matrix(clip: torch.Tensor, full_of, k: int, dim: int) -> torch.Tensor:
    """Two-stage scores. clip [n_a, n_t]; ``full_of(a_idx, t_idx) -> [len(a_idx), len(t_idx)]`` full scores.

    dim=0: per text column (t2a), the top-k clips get their full score, the rest their clip score minus an offset
    that puts them below every candidate. dim=1: per audio row (a2t), likewise over texts.
    """
    clip = clip.float()
    offset = float(clip.abs().max()) * 2 + 1e4  # any full score of a candidate sorts above any non-candidate
    out = clip - offset
    if dim == 0:
        k = min(k, clip.shape[0])
        top = clip.topk(k, dim=0).indices  # [k, n_t]
        for j in range(clip.shape[1]):
            idx = top[:, j]
            out[idx, j] = full_of(idx, torch.tensor([j]))[:, 0].float()
    else:
        k = min(k, clip.shape[1])
        top = clip.topk(k, dim=1).indices  # [n_a, k]
        for i in range(clip.shape[0]):
            idx = top[i]
            out[i, idx] = full_of(torch.tensor([i]), idx)[0].float()
    return out


def score_metrics(scores, text_to_audio: torch.Tensor, pairs: Sequence | None = None) -> dict[str, float]:
    """Metrics of one all-against-all score (:class:`hci_atr.models.model.Scores`): retrieval metrics of the fused
    score, ``<level>_rsum`` per level, and with ``pairs`` (:func:`hci_atr.data.pairs.read_pairs` of the same rows)
    the pair accuracies. What ``hci-atr evaluate`` and each ablation run report."""
    from hci_atr.metrics import pair_accuracy, retrieval_metrics

    out = retrieval_metrics(scores.fused, text_to_audio)
    for name, s in scores.levels.items():
        out[f"{name}_rsum"] = retrieval_metrics(s, text_to_audio)["rsum"]
    if pairs is not None:
        out.update(pair_accuracy(scores.fused, text_to_audio, pairs))
    return out


def evaluate(model_ref: str | os.PathLike, features_dir: str | os.PathLike, split: str = "test",
             cfg: Settings | None = None, *, captions_dir: str | os.PathLike | None = None, rerank_k: int | None = None,
             log_mlflow: bool = False, tracking_uri: str | None = None, batch_size: int | None = None,
             experiment: str = "hci-atr-eval", device: str = "cpu",
             pairs_file: str | os.PathLike | None = None) -> EvaluationResult:
    """An :class:`EvaluationResult` of ``model_ref`` on the ``split`` rows of ``features_dir``.

    ``cfg``: only ``train.batch_size`` is used from it (the model brings its own config). ``device``: "cpu" or
    "cuda" (embedding and scoring run there; metrics are computed on the CPU). With ``log_mlflow`` a new
    run in ``experiment`` gets the metrics (prefixed ``<split>_``) and the model reference as params.
    ``pairs_file``: a hard-negative pair file; its pairs whose two clips are both in the split add ``pairs_acc``,
    ``pairs_<type>_acc`` / ``_n`` (and per attribute), scored with the full fused score also when reranking.
    """
    from hci_atr.data.pairs import read_pairs
    from hci_atr.metrics import pair_accuracy, retrieval_metrics
    from hci_atr.training import embed_split
    from hci_atr.models.model import HciAtrModel
    from workflows import tracking
    from hci_atr.data.shards import check_features_match, read_captions, read_split_rows

    model_dir = tracking.resolve_model_ref(str(model_ref), tracking_uri)
    model = HciAtrModel.from_pretrained(model_dir).eval().to(device)
    mcfg = model.cfg
    if (mcfg.model.ac_fusion or mcfg.model.ac_branch) and not captions_dir:
        raise ConfigError(f"{model_ref}: the model uses auxiliary captions (ac_fusion/ac_branch); pass --captions DIR "
                          "with the generated captions of this split")
    check_features_match(features_dir, mcfg.audio, who=f"the model {model_ref}")
    rows = read_split_rows(features_dir, split, read_captions(captions_dir, mcfg.model.ac_min_confidence))
    if not rows:
        raise ConfigError(f"{features_dir}: no rows with split '{split}'; pick one of the extracted splits")
    pairs = read_pairs(pairs_file, [str(r["audio_id"]) for r in rows]) if pairs_file else None  # fail before embedding
    bs = batch_size or (cfg.train.batch_size if cfg else mcfg.train.batch_size)
    with torch.no_grad():
        emb = embed_split(model, rows, mcfg, batch_size=bs)
        scores = model.score(emb.audio, emb.text)
        if rerank_k:
            from hci_atr.models.hci import clip_similarity

            clip = clip_similarity(emb.audio.clip, emb.text.sentence)  # [n_a, n_t]

            def full_of(a_idx, t_idx):
                return model.score(emb.audio.select(a_idx), emb.text.select(t_idx)).fused

            t2a = retrieval_metrics(_rerank_matrix(clip, full_of, rerank_k, 0), emb.text_to_audio)
            a2t = retrieval_metrics(_rerank_matrix(clip, full_of, rerank_k, 1), emb.text_to_audio)
            out = {k: v for k, v in t2a.items() if k.startswith("t2a_")}
            out.update({k: v for k, v in a2t.items() if k.startswith("a2t_")})
            out["rsum"] = t2a["rsum"]
            out["rerank_k"] = float(rerank_k)
            if pairs is not None:  # a pair compares two clips' full scores for one caption: no rerank stage applies
                out.update(pair_accuracy(scores.fused, emb.text_to_audio, pairs))
        else:
            out = score_metrics(scores, emb.text_to_audio, pairs)
    out["n_audio"] = float(len(emb.audio_ids))
    out["n_text"] = float(len(emb.captions))
    out = {k: float(v) for k, v in out.items()}
    run_id = None
    if log_mlflow:
        uri = tracking.resolve_tracking_uri(tracking_uri)
        run_id = tracking.start_or_resume_run(uri, experiment, f"eval-{Path(str(model_ref)).name or 'model'}-{split}")
        tracking.log_params(uri, run_id, {"model": str(model_ref), "features": str(Path(features_dir).resolve()),
                                          "split": split, "rerank_k": rerank_k or 0,
                                          "pairs": str(Path(pairs_file).resolve()) if pairs_file else "",
                                          "data.fingerprint": tracking.data_fingerprint(features_dir)})
        tracking.log_metrics(uri, run_id, {f"{split}_{k}": v for k, v in out.items()}, step=0)
        tracking.end_run(uri, run_id)
    return EvaluationResult(out, str(model_ref), split, rerank_k, run_id)


def format_table(m: dict[str, Any] | EvaluationResult, title: str | None = None) -> str:
    """Plain-text table: rows R@1/5/10, mAP@10, median/mean rank; columns text->audio and audio->text."""
    if isinstance(m, EvaluationResult):
        m = m.metrics
    w0, w = 13, 14
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'metric':<{w0}}{'text->audio':>{w}}{'audio->text':>{w}}")
    lines.append("-" * (w0 + 2 * w))
    for label, key, fmt in TABLE_ROWS:
        cells = []
        for d in ("t2a", "a2t"):
            v = m.get(f"{d}_{key}")
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        lines.append(f"{label:<{w0}}{cells[0]:>{w}}{cells[1]:>{w}}")
    lines.append("-" * (w0 + 2 * w))
    extra = f"R-sum (t2a R@1+5+10): {m.get('rsum', float('nan')):.2f}"
    if "n_audio" in m:
        extra += f"   clips: {int(m['n_audio'])}   captions: {int(m['n_text'])}"
    if m.get("rerank_k"):
        extra += f"   (approximate: clip-level top {int(m['rerank_k'])} reranked)"
    lines.append(extra)
    levels = [k for k in ("clip_rsum", "segment_rsum", "frame_rsum", "ac_branch_rsum") if k in m]
    if levels:
        lines.append("per level R-sum: " + ", ".join(f"{k[:-5]} {m[k]:.2f}" for k in levels))
    if "pairs_n" in m:
        lines.append(format_pairs(m))
    return "\n".join(lines)


def format_pairs(m: dict[str, Any]) -> str:
    """One line of pair accuracy per type (and per attribute), with the number of pairs behind each."""
    from hci_atr.data.pairs import PAIR_TYPES

    def cell(key: str, label: str) -> str:
        acc, n = m.get(f"{key}_acc"), int(m[f"{key}_n"])
        return f"{label} {acc:.2f} (n={n})" if acc is not None else f"{label} - (n={n})"

    cells = [cell("pairs", "all")] + [cell(f"pairs_{t}", t) for t in PAIR_TYPES if f"pairs_{t}_n" in m]
    attrs = sorted(k[len("pairs_attribute_"):-2] for k in m
                   if k.startswith("pairs_attribute_") and k.endswith("_n") and k != "pairs_attribute_n")
    line = "pair accuracy (chance 0.50): " + ", ".join(cells)
    if attrs:
        line += "; attribute: " + ", ".join(cell(f"pairs_attribute_{a}", a) for a in attrs)
    return line


def retrieval_examples(model_dir: str | os.PathLike, features_dir: str | os.PathLike, split: str,
                       captions: dict[str, str] | None = None, n_queries: int = 5, top_k: int = 5,
                       rows: list[dict] | None = None) -> str:
    """Text query -> top clips for the first ``n_queries`` clips' first captions (fused HCI score)."""
    import torch

    from hci_atr.data.shards import read_split_rows
    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import embed_split
    from workflows import tracking

    model = HciAtrModel.from_pretrained(model_dir).eval()
    rows = rows if rows is not None else read_split_rows(features_dir, split, captions)
    with torch.no_grad():
        emb = embed_split(model, rows, model.cfg)
        sim = model.score(emb.audio, emb.text).fused.float()  # [n_audio, n_text]
    text_to_audio, texts, ids = emb.text_to_audio, emb.captions, emb.audio_ids
    # one query per clip (its first caption), the first n_queries clips
    firsts: dict[int, int] = {}
    for j, a in enumerate(text_to_audio.tolist()):
        firsts.setdefault(int(a), j)
    out = []
    for a, j in list(sorted(firsts.items()))[:n_queries]:
        col = sim[:, j]
        top = torch.topk(col, k=min(top_k, col.numel()))
        out.append((texts[j], ids[a], [(ids[int(i)], float(v)) for v, i in zip(top.values, top.indices)]))
    return tracking.format_retrieval_examples(out)
