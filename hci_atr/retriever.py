"""Retrieve, then rerank: search an index with a trained HciAtrModel (plain library code, no Ray).

Stage 1 (retrieve): the query's sentence embedding against every clip-level embedding — one exact float32 matmul and
an ``argpartition`` for the top ``retrieve_k`` (FAISS's exact inner-product index is used instead when the library
is installed: ``pip install 'hci-atr[faiss]'``; results are the same). Opt-in scans for large indexes
(``scan_backend``, ``serve.scan``): ``faiss-fp16`` (every clip, vectors held in float16; scores within ~1e-3) and
``ivf`` (inverted lists; APPROXIMATE: a true top clip can be missed). Stage 2 (rerank): the model's full fused score
(clip + segment + frame levels, plus the AC branch when on) on those K candidates only, from the
segment/frame/generated-caption embeddings stored in the index. Why two stages: the full score needs token-level interaction and costs O(K) model work, while
the clip level is one matrix product over the whole collection.

Usage::

    r = Retriever.from_pretrained("hci_atr_runs/models/hci_ac", "hci_atr_runs/index")
    hits = r.search_text("a dog barks while birds sing", top_k=10)
    hits.timings  # {"encode_ms": ..., "retrieve_ms": ..., "rerank_ms": ..., "hits_ms": ..., "total_ms": ...}
    many = r.search_text_batch(["rain on a roof", "a car passes"], top_k=10)  # one encode + one scan for both
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hci_atr.errors import AudioError, ConfigError, ModelLoadError, RequestError
from hci_atr.index import (Index, decode_audio_bytes, embed_audio_batch, l2_normalize, mel_from_wave, model_config,
                           _to_device)


@dataclass
class Hit:
    """One ranked result. ``kind`` is "clip" (an indexed clip) or "caption" (a caption text, audio -> text search)."""

    rank: int
    id: str  # clip id (kind "clip") or the id of the clip a caption belongs to (kind "caption")
    score: float  # the final ranking score (full fused score when reranked, else the clip-level cosine)
    clip_score: float  # stage-1 clip-level cosine similarity
    kind: str = "clip"
    text: str | None = None  # the caption text (kind "caption")
    source: str | None = None  # "reference" | "generated" (kind "caption")
    captions: list[str] = field(default_factory=list)
    generated_caption: str | None = None
    duration: float | None = None
    levels: dict[str, float] = field(default_factory=dict)  # per-level scores of the full model (reranked only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SearchResult(list):
    """A ``list[Hit]`` that also carries the stage timings in milliseconds (``.timings``) and whether it was
    reranked (``.reranked``)."""

    def __init__(self, hits: Sequence[Hit] = (), timings: dict[str, float] | None = None, reranked: bool = False):
        super().__init__(hits)
        self.timings = timings or {}
        self.reranked = reranked


def top_k_exact(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum inner product: matrix [N, D], query [D] or [Q, D] -> (rows [Q, k], scores [Q, k]) best first.

    ``argpartition`` is O(N) per query, then only the k survivors are sorted.
    """
    q = np.atleast_2d(np.asarray(query, dtype=np.float32))
    n = matrix.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
    # (M @ q.T).T, not q @ M.T: BLAS then streams the big matrix once without repacking it, measured ~1.7x faster
    # for 2-8 queries at N = 100k (BENCHMARKS.md); the same for one query
    sims = (np.asarray(matrix, dtype=np.float32) @ q.T).T  # [Q, N]
    if k < n:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (q.shape[0], n))
    part_scores = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    rows = np.take_along_axis(part, order, axis=1)
    return rows.astype(np.int64), np.take_along_axis(part_scores, order, axis=1)


SCAN_BACKENDS = ("auto", "numpy", "faiss", "faiss-fp16", "ivf")
DEFAULT_RETRIEVE_K = 50  # clip-level candidates reranked by the full score
GEMM_FROM = 4  # the exact FAISS backend hands batches of this many queries or more to one BLAS product


def set_threads(n: int) -> None:
    """Intra-op threads of torch, FAISS and the BLAS numpy uses, for this process (``n <= 0``: leave them).

    Why: on a small shared machine, a replica whose libraries each start one thread per core contends with itself and
    with its neighbours; one thread per replica measured several times faster per query here (BENCHMARKS.md).
    """
    if n <= 0:
        return
    import torch

    torch.set_num_threads(int(n))
    try:
        import faiss

        faiss.omp_set_num_threads(int(n))
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(n))
    except ImportError:
        pass


class _Scanner:
    """Stage-1 scanner over a fixed matrix [N, D] of L2-normalised rows; ``search(queries [Q, D], k)``.

    Backends: ``numpy`` (exact matmul + argpartition), ``faiss`` (exact flat inner product, same rows as numpy;
    batches of ``GEMM_FROM`` or more queries go to the numpy product instead, one pass over the matrix for all),
    ``faiss-fp16`` (every row, but held in float16: scores within ~1e-3 of exact, so near-ties can swap),
    ``ivf`` (FAISS inverted lists, APPROXIMATE: only ``nprobe`` of ``nlist`` k-means cells are visited, so a true top
    row can be missed, and fewer than k rows can come back: such slots have row -1), ``auto`` (``faiss`` when the
    library is installed, else ``numpy``).
    """

    def __init__(self, matrix: np.ndarray, backend: str = "auto", nlist: int = 0, nprobe: int = 32, seed: int = 0):
        if backend not in SCAN_BACKENDS:
            raise ConfigError(f"scan backend {backend!r} is not one of {', '.join(SCAN_BACKENDS)}; set serve.scan")
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.n, self.dim = int(matrix.shape[0]), int(matrix.shape[1]) if matrix.ndim == 2 else 0
        self.matrix: np.ndarray | None = matrix
        self.faiss_index = None
        self.backend = "numpy"
        self.exact = True
        self.nlist = 0
        if backend == "numpy" or self.n == 0:
            return
        try:
            import faiss
        except ImportError:
            if backend == "auto":
                return
            raise ModelLoadError(f"scan backend {backend!r} needs FAISS, which is not installed; "
                                 "pip install 'hci-atr[faiss]' or set serve.scan to numpy") from None
        d = self.dim
        if backend in ("auto", "faiss"):
            index = faiss.IndexFlatIP(d)
            self.backend = "faiss"
            keep = matrix  # batches of GEMM_FROM+ queries: one BLAS pass beats FAISS's query-by-query scan
        elif backend == "faiss-fp16":
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            self.backend, self.exact = "faiss-fp16", False
            keep = None
        else:
            # default: 4 * sqrt(N) lists, but at least 39 rows per list (less and FAISS's k-means warns)
            auto = max(1, min(int(round(4 * math.sqrt(self.n))), self.n // 39))
            self.nlist = min(self.n, int(nlist) if nlist > 0 else auto)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            # k-means on at most 64 rows per list (FAISS's own rule of thumb; more only costs start-up time)
            sample = matrix
            if self.n > 64 * self.nlist:
                sample = matrix[np.sort(np.random.default_rng(seed).choice(self.n, 64 * self.nlist, replace=False))]
            index.train(np.ascontiguousarray(sample))
            index.nprobe = max(1, min(int(nprobe), self.nlist))
            self.backend, self.exact = "ivf", False
            keep = None
        if not index.is_trained:
            index.train(matrix)
        index.add(matrix)
        self.faiss_index = index
        self.matrix = keep  # FAISS holds its own copy (half of it for fp16); an index's clip.npy stays mapped

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """query [D] or [Q, D] -> (rows [Q, k'], scores [Q, k']) best first, k' = min(k, N)."""
        q = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        if self.faiss_index is not None and not (self.matrix is not None and q.shape[0] >= GEMM_FROM):
            k = max(0, min(int(k), self.n))
            if k == 0:
                return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
            scores, rows = self.faiss_index.search(q, k)
            return rows.astype(np.int64), scores
        return top_k_exact(self.matrix, query, k)


def _slice(obj: Any, sl: slice) -> Any:
    """Batch-slice a model output dataclass (every tensor field with a batch axis)."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _slice(getattr(obj, f.name), sl)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _slice(v, sl) for k, v in obj.items()}
    if hasattr(obj, "shape") and getattr(obj, "ndim", 0) >= 1:
        return obj[sl]
    return obj


def _found(rows: np.ndarray, scores: np.ndarray, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Query ``i``'s rows and scores from a scan, without the ``-1`` slots an approximate (IVF) scan leaves when it
    finds fewer rows than asked."""
    keep = rows[i] >= 0
    return rows[i][keep], scores[i][keep]


def _final_order(full: np.ndarray | None, stage1: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the stage-1 candidates) and scores of the final ``top_k``: by the full score when the
    candidates were reranked (stable, so ties keep the stage-1 order), else the stage-1 order as it is."""
    if full is None:
        order = np.arange(min(top_k, len(stage1)))
        return order, stage1[order]
    order = np.argsort(-full, kind="stable")[:top_k]
    return order, full[order]


class Retriever:
    """Text -> audio and audio -> audio/text search over an :class:`~hci_atr.index.Index` with a trained model."""

    def __init__(self, model: Any, index: Index, device: str = "cpu", retrieve_k: int = 50,
                 scan_backend: str = "auto", ivf_nlist: int = 0, ivf_nprobe: int = 32):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.index = index
        self.device = device
        self.cfg = model_config(model)
        self.retrieve_k = int(retrieve_k)
        d_model = int(self.cfg.model.embed_dim)
        d_index = int(index.manifest["embed_dim"])
        if d_model != d_index:
            raise ModelLoadError(f"{index.path}: index embeddings have D={d_index} but the model's embed_dim is "
                                 f"{d_model}; rebuild the index with this model (`hci-atr index --model ...`)")
        self.clip_scanner = _Scanner(index.clip, scan_backend, ivf_nlist, ivf_nprobe)
        self.caption_scanner = (_Scanner(index.caption_emb, scan_backend, 0, ivf_nprobe) if len(index.caption_emb)
                                else None)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, index_dir: str | os.PathLike, device: str = "cpu",
                        retrieve_k: int | None = None, scan_backend: str = "auto", ivf_nlist: int = 0,
                        ivf_nprobe: int = 32) -> "Retriever":
        from hci_atr.models.model import HciAtrModel

        if not Path(model_dir).exists():
            raise ModelLoadError(f"{model_dir}: model folder not found; train one (`hci-atr demo` writes "
                                 "hci_atr_runs/models/hci_ac) or set HCI_ATR_MODEL")
        model = HciAtrModel.from_pretrained(str(model_dir))
        if hasattr(model, "to"):
            model = model.to(device)
        index = Index.load(index_dir)
        k = retrieve_k if retrieve_k is not None else DEFAULT_RETRIEVE_K
        return cls(model, index, device=device, retrieve_k=k, scan_backend=scan_backend, ivf_nlist=ivf_nlist,
                   ivf_nprobe=ivf_nprobe)

    # -- encoders ------------------------------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str]) -> Any:
        """texts -> the model's TextEmbeddings (sentence [B, D], phrases, words + masks)."""
        import torch

        batch = _to_device(self.model.tokenize(list(texts)), self.device)
        with torch.inference_mode():  # lighter than no_grad (no version counters); outputs are only ever scored
            return self.model.encode_text(batch)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> L2-normalised sentence embeddings, float32 [B, D]."""
        texts = [self._check_query(t) for t in texts]
        return l2_normalize(self.encode_queries(texts).sentence.float().cpu().numpy())

    def _wave(self, audio: Any, where: str = "audio") -> np.ndarray:
        sr = self.cfg.audio.sample_rate
        if isinstance(audio, (bytes, bytearray, memoryview)):
            wave = decode_audio_bytes(bytes(audio), sr, where)
        elif isinstance(audio, (str, os.PathLike)):
            from hci_atr.data.audio import load_audio

            wave = load_audio(str(audio), sr)
        else:
            wave = np.asarray(audio, dtype=np.float32)
            if wave.ndim != 1:
                raise AudioError(f"{where}: expected a mono wave [N] at {sr} Hz, got shape {wave.shape}")
        if wave.size == 0:
            raise AudioError(f"{where}: audio has no samples")
        if not np.all(np.isfinite(wave)):
            raise AudioError(f"{where}: audio contains NaN or infinite samples")
        return wave

    def encode_audio(self, audio: Any, generated_caption: str | None = None) -> Any:
        """One clip (wave [N] at the model's rate, file bytes, or a path) -> AudioEmbeddings with batch 1."""
        wave = self._wave(audio)
        mel, mask = mel_from_wave(wave, self.cfg.audio)
        return embed_audio_batch(self.model, mel[None], mask[None], [generated_caption], self.device)

    def embed_audio(self, audio: Any) -> np.ndarray:
        """One clip -> its L2-normalised clip-level embedding, float32 [D]."""
        return l2_normalize(self.encode_audio(audio).clip.float().cpu().numpy())[0]

    @staticmethod
    def _check_query(query: Any, max_chars: int | None = None) -> str:
        if not isinstance(query, str):
            raise RequestError("query: expected a string")
        q = query.strip()
        if not q:
            raise RequestError("query: empty; type some words describing the sound")
        if max_chars is not None and len(q) > max_chars:
            raise RequestError(f"query: {len(q)} characters is longer than the limit of {max_chars}")
        return q

    def _check_k(self, top_k: int) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise RequestError(f"top_k: expected an integer >= 1, got {top_k!r}")
        return int(top_k)

    # -- search --------------------------------------------------------------------------------------------------
    def search_text(self, query: str, top_k: int = 10, rerank: bool = True,
                    retrieve_k: int | None = None) -> SearchResult:
        """Text -> clips. Returns ``top_k`` hits, best first, with ``.timings``."""
        t0 = time.perf_counter()
        q = self._check_query(query)
        text = self.encode_queries([q])
        t1 = time.perf_counter()
        return self.search_text_embedded(text, top_k, rerank, retrieve_k, encode_ms=(t1 - t0) * 1e3)

    def search_text_batch(self, queries: Sequence[str], top_k: int | Sequence[int] = 10,
                          rerank: bool | Sequence[bool] = True, retrieve_k: int | None = None) -> list[SearchResult]:
        """Many text queries at once: one encoder pass for all of them, one stage-1 scan ([Q, D] against the clip
        matrix), then each query's own rerank. ``top_k`` / ``rerank``: one value for all, or one per query.

        Returns one :class:`SearchResult` per query, in order: the same hits as :meth:`search_text` on each query
        alone (scores equal up to float rounding of the batched products). Timings: ``encode_ms`` and
        ``retrieve_ms`` are the shared batch stages, ``rerank_ms`` the query's own, ``total_ms`` the batch's wall
        time until this query's hits were ready.
        """
        t0 = time.perf_counter()
        qs = [self._check_query(q) for q in queries]
        if not qs:
            return []
        self._per_query(top_k, len(qs), "top_k"), self._per_query(rerank, len(qs), "rerank")  # fail before encoding
        text = self.encode_queries(qs)
        t1 = time.perf_counter()
        return self.search_text_embedded_batch(text, top_k, rerank, retrieve_k, encode_ms=(t1 - t0) * 1e3)

    def search_text_embedded(self, text: Any, top_k: int = 10, rerank: bool = True, retrieve_k: int | None = None,
                             encode_ms: float = 0.0) -> SearchResult:
        """Like :meth:`search_text` for a query already encoded (TextEmbeddings with batch 1), so that a server can
        batch the encoder across requests."""
        return self.search_text_embedded_batch(text, top_k, rerank, retrieve_k, encode_ms)[0]

    @staticmethod
    def _per_query(value: Any, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise RequestError(f"{name}: {len(value)} values for {n} queries")
            return list(value)
        return [value] * n

    def search_text_embedded_batch(self, text: Any, top_k: int | Sequence[int] = 10,
                                   rerank: bool | Sequence[bool] = True, retrieve_k: int | None = None,
                                   encode_ms: float = 0.0) -> list[SearchResult]:
        """:meth:`search_text_batch` for queries already encoded (TextEmbeddings with batch Q)."""
        import torch

        n = len(text)
        ks = [self._check_k(k) for k in self._per_query(top_k, n, "top_k")]
        reranks = [bool(r) for r in self._per_query(rerank, n, "rerank")]
        t1 = time.perf_counter()
        qv = l2_normalize(text.sentence.float().cpu().numpy())  # [Q, D]
        rk = int(retrieve_k or self.retrieve_k)
        k1s = [max(k, rk) if r else k for k, r in zip(ks, reranks)]
        all_rows, all_scores = self.clip_scanner.search(qv, max(k1s))
        t2 = time.perf_counter()
        retrieve_ms = (t2 - t1) * 1e3
        out = []
        for i in range(n):
            t3 = time.perf_counter()
            rows, clip_scores = _found(all_rows, all_scores, i)
            rows, clip_scores = rows[:k1s[i]], clip_scores[:k1s[i]]
            levels: dict[str, np.ndarray] = {}
            full = None
            if reranks[i] and len(rows):
                audio = self.index.audio_embeddings(rows, self.device)
                t = text if n == 1 else _slice(text, slice(i, i + 1))
                with torch.inference_mode():
                    s = self.model.score(audio, t)
                full = s.fused[:, 0].float().cpu().numpy()  # [K]
                levels = {name: v[:, 0].float().cpu().numpy() for name, v in (s.levels or {}).items()
                          if v is not None}
            order, final = _final_order(full, clip_scores, ks[i])
            t4 = time.perf_counter()
            hits = []
            for rank, (j, sc) in enumerate(zip(order, final), start=1):
                m = self.index.meta(rows[j])
                hits.append(Hit(rank=rank, id=m["id"], score=float(sc), clip_score=float(clip_scores[j]),
                                captions=m["captions"], generated_caption=m["generated_caption"],
                                duration=m["duration"], levels={k: float(v[j]) for k, v in levels.items()}))
            t5 = time.perf_counter()
            timings = {"encode_ms": encode_ms, "retrieve_ms": retrieve_ms,
                       "rerank_ms": (t4 - t3) * 1e3 if reranks[i] else 0.0, "hits_ms": (t5 - t4) * 1e3,
                       "total_ms": encode_ms + (t5 - t1) * 1e3}
            out.append(SearchResult(hits, timings, reranked=reranks[i]))
        return out

    def search_audio(self, audio: Any, top_k: int = 10, target: str = "clips", rerank: bool = True,
                     retrieve_k: int | None = None) -> SearchResult:
        """Audio (wave [N], file bytes or path) -> similar indexed clips (``target="clips"``, clip-level cosine) or
        captions (``target="captions"``: caption sentence embeddings, then the full model score on the top K)."""
        import torch

        top_k = self._check_k(top_k)
        if target not in ("clips", "captions"):
            raise RequestError(f"target: expected 'clips' or 'captions', got {target!r}")
        t0 = time.perf_counter()
        emb = self.encode_audio(audio)
        qv = l2_normalize(emb.clip.float().cpu().numpy())[0]
        t1 = time.perf_counter()
        if target == "clips":
            rows, scores = _found(*self.clip_scanner.search(qv, top_k))
            t2 = time.perf_counter()
            hits = []
            for rank, (r, sc) in enumerate(zip(rows, scores), start=1):
                m = self.index.meta(r)
                hits.append(Hit(rank=rank, id=m["id"], score=float(sc), clip_score=float(sc), captions=m["captions"],
                                generated_caption=m["generated_caption"], duration=m["duration"]))
            return SearchResult(hits, {"encode_ms": (t1 - t0) * 1e3, "retrieve_ms": (t2 - t1) * 1e3,
                                       "rerank_ms": 0.0, "total_ms": (t2 - t0) * 1e3}, reranked=False)
        if self.caption_scanner is None:
            return SearchResult([], {"encode_ms": (t1 - t0) * 1e3, "retrieve_ms": 0.0, "rerank_ms": 0.0,
                                     "total_ms": (t1 - t0) * 1e3})
        k1 = max(top_k, int(retrieve_k or self.retrieve_k)) if rerank else top_k
        rows, cap_scores = _found(*self.caption_scanner.search(qv, k1))
        t2 = time.perf_counter()
        caps = self.index.captions
        if rerank and len(rows):
            texts = [str(caps["text"].iloc[int(r)]) for r in rows]
            t = self.encode_queries(texts)
            with torch.no_grad():
                full = self.model.score(emb, t).fused[0].float().cpu().numpy()  # [K]
        else:
            full = None
        order, final = _final_order(full, cap_scores, top_k)
        t3 = time.perf_counter()
        hits = []
        for rank, (j, sc) in enumerate(zip(order, final), start=1):
            c = caps.iloc[int(rows[j])]
            hits.append(Hit(rank=rank, id=str(c["audio_id"]), score=float(sc), clip_score=float(cap_scores[j]),
                            kind="caption", text=str(c["text"]), source=str(c["source"])))
        return SearchResult(hits, {"encode_ms": (t1 - t0) * 1e3, "retrieve_ms": (t2 - t1) * 1e3,
                                   "rerank_ms": (t3 - t2) * 1e3 if rerank else 0.0, "total_ms": (t3 - t0) * 1e3},
                            reranked=rerank)

    # -- serving helpers -------------------------------------------------------------------------------------------
    def clip_path(self, clip_id: str) -> Path:
        """The indexed file of a clip id (ids are looked up in the index metadata; no client path is ever opened)."""
        row = self.index.row_of.get(clip_id)
        if row is None:
            raise RequestError(f"clip id {clip_id!r} is not in the index", status_code=404)
        return Path(str(self.index.metadata["path"].iloc[row]))

    def self_check(self) -> dict:
        """A tiny end-to-end forward pass (encode a word, score it against one indexed clip); raises on failure."""
        import torch

        text = self.encode_queries(["test"])
        audio = self.index.audio_embeddings([0], self.device)
        with torch.no_grad():
            s = self.model.score(audio, text).fused
        if tuple(s.shape) != (1, 1) or not bool(torch.isfinite(s).all()):
            raise ModelLoadError(f"self-check: score shape {tuple(s.shape)} / non-finite values")
        return {"n_clips": len(self.index), "score": float(s[0, 0])}
