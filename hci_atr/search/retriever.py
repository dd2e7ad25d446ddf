"""Retrieve, then rerank: search an index with a trained HciAtrModel (plain library code, no Ray).

Stage 1 (retrieve): the query's sentence embedding against every clip-level embedding (:mod:`hci_atr.search.scan`:
exact by default; ``faiss-fp16`` and the approximate ``ivf`` on request), keeping the top ``retrieve_k``. Stage 2
(rerank): the model's full fused score (clip + segment + frame levels, plus the AC branch when on) on those K
candidates only, from the segment/frame/generated-caption embeddings stored in the index. Why two stages: the full
score needs token-level interaction and costs O(K) model work, while the clip level is one matrix product over the
whole collection.

The retriever refuses an index that another model built (the manifest's weights hash), and a long-running server
calls :meth:`Retriever.reload_if_changed` to switch to a new index version written into the same folder.

Usage::

    r = Retriever.from_pretrained("hci_atr_runs/models/hci_ac", "hci_atr_runs/index")
    hits = r.search_text("a dog barks while birds sing", top_k=10)
    hits.timings  # {"encode_ms": ..., "retrieve_ms": ..., "rerank_ms": ..., "hits_ms": ..., "total_ms": ...}
    many = r.search_text_batch(["rain on a roof", "a car passes"], top_k=10)  # one encode + one scan for both
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hci_atr.data.text import check_query
from hci_atr.errors import AudioError, HciAtrError, ModelLoadError, NotFoundError, QueryError
from hci_atr.search.embed import embed_audio_batch, l2_normalize, model_config, to_device
from hci_atr.search.index import Index, current_version, weights_hash
from hci_atr.search.scan import Scanner, found

log = logging.getLogger(__name__)

DEFAULT_RETRIEVE_K = 50  # clip-level candidates reranked by the full score


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


@dataclass
class SearchResult(SequenceABC):
    """The ranked hits of one query (a sequence of :class:`Hit`, best first), the stage timings in milliseconds and
    whether the candidates were reranked by the full score."""

    hits: list[Hit] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    reranked: bool = False

    def __getitem__(self, i):
        return self.hits[i]

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)


@dataclass(frozen=True)
class SelfCheck:
    """What :meth:`Retriever.self_check` measured: clips in the index, its version, the tiny forward pass's score."""

    n_clips: int
    version: str
    score: float


@dataclass(frozen=True)
class _Loaded:
    """An index with its scanners: swapped as one object, so a search never mixes two versions."""

    index: Index
    clip_scanner: Scanner
    caption_scanner: Scanner | None


def _final_order(full: np.ndarray | None, stage1: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the stage-1 candidates) and scores of the final ``top_k``: by the full score when the
    candidates were reranked (stable, so ties keep the stage-1 order), else the stage-1 order as it is."""
    if full is None:
        order = np.arange(min(top_k, len(stage1)))
        return order, stage1[order]
    order = np.argsort(-full, kind="stable")[:top_k]
    return order, full[order]


def _clip_hit(rank: int, m, score: float, clip_score: float, levels: dict[str, float] | None = None) -> Hit:
    return Hit(rank=rank, id=m.id, score=score, clip_score=clip_score, captions=m.captions,
               generated_caption=m.generated_caption, duration=m.duration, levels=levels or {})


class Retriever:
    """Text -> audio and audio -> audio/text search over an :class:`~hci_atr.search.index.Index` with the model that
    built it (``retrieve_k``: how many clip-level candidates the full score reranks)."""

    def __init__(self, model: Any, index: Index, device: str = "cpu", retrieve_k: int = DEFAULT_RETRIEVE_K,
                 scan_backend: str = "auto", ivf_nlist: int = 0, ivf_nprobe: int = 32,
                 model_dir: str | os.PathLike | None = None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.device = device
        self.cfg = model_config(model)
        self.retrieve_k = int(retrieve_k)
        self.scan_backend, self.ivf_nlist, self.ivf_nprobe = scan_backend, ivf_nlist, ivf_nprobe
        self.model_dir = model_dir
        self._weights_hash: str | None = None
        self._failed: tuple[str, HciAtrError] | None = None  # (version, its error) of a reload that failed
        self._loaded = self._prepare(index)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, index_dir: str | os.PathLike, device: str = "cpu",
                        retrieve_k: int = DEFAULT_RETRIEVE_K, scan_backend: str = "auto", ivf_nlist: int = 0,
                        ivf_nprobe: int = 32) -> "Retriever":
        from hci_atr.models.model import HciAtrModel

        if not Path(model_dir).exists():
            raise ModelLoadError(f"{model_dir}: model folder not found; train one (`hci-atr demo` writes "
                                 "hci_atr_runs/models/hci_ac) or set HCI_ATR_MODEL")
        model = HciAtrModel.from_pretrained(str(model_dir))
        if hasattr(model, "to"):
            model = model.to(device)
        return cls(model, Index.load(index_dir), device=device, retrieve_k=retrieve_k, scan_backend=scan_backend,
                   ivf_nlist=ivf_nlist, ivf_nprobe=ivf_nprobe, model_dir=model_dir)

    # -- the index in use ----------------------------------------------------------------------------------------
    @property
    def index(self) -> Index:
        return self._loaded.index

    @property
    def clip_scanner(self) -> Scanner:
        return self._loaded.clip_scanner

    @property
    def caption_scanner(self) -> Scanner | None:
        return self._loaded.caption_scanner

    def _check_index(self, index: Index) -> None:
        """Refuse an index this model cannot have built: another embedding width, or other weights."""
        rebuild = f"rebuild it with `hci-atr index --model {self.model_dir or '<dir>'} --out {index.root}`"
        d_model = int(self.cfg.model.embed_dim)
        d_index = int(index.manifest["embed_dim"])
        if d_model != d_index:
            raise ModelLoadError(f"{index.path}: index embeddings have D={d_index} but the model's embed_dim is "
                                 f"{d_model}; {rebuild}")
        built_by = index.weights_hash
        if built_by is None:
            log.warning("%s: the index records no model weights hash (written by an older hci-atr), so it cannot be "
                        "checked against this model; %s", index.path, rebuild)
            return
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.model)
        if built_by != self._weights_hash:
            raise ModelLoadError(f"{index.path}: the index was built by another model (weights {built_by[7:19]}, "
                                 f"this model {self._weights_hash[7:19]}); {rebuild}")

    def _prepare(self, index: Index) -> _Loaded:
        self._check_index(index)
        clip = Scanner(index.clip, self.scan_backend, self.ivf_nlist, self.ivf_nprobe)
        caps = Scanner(index.caption_emb, self.scan_backend, 0, self.ivf_nprobe) if len(index.caption_emb) else None
        return _Loaded(index, clip, caps)

    def reload_if_changed(self) -> bool:
        """Switch to the index folder's current version when it is not the one in use; returns whether it switched.

        Cheap when nothing changed (reads the folder's ``CURRENT`` file). The new version is loaded and checked
        (shapes, NaN/Inf, same model) and its scanners built before the switch, which is one assignment: a search
        running meanwhile finishes on the version it started with. When the new version cannot be used, the one in
        use stays and the error is raised (again on later calls, without reloading, until the version changes).
        """
        root = self.index.root
        version = current_version(root)
        if version is None or version == self.index.version:
            return False
        if self._failed is not None and self._failed[0] == version:
            raise self._failed[1]
        try:
            index = Index.load(root)
            if index.version == self.index.version:
                return False
            loaded = self._prepare(index)
        except HciAtrError as e:
            self._failed = (version, e)
            raise
        self._failed = None
        self._loaded = loaded
        return True

    # -- encoders ------------------------------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str]) -> Any:
        """texts -> the model's TextEmbeddings (sentence [B, D], phrases, words + masks)."""
        import torch

        batch = to_device(self.model.tokenize(list(texts)), self.device)
        with torch.inference_mode():  # lighter than no_grad (no version counters); outputs are only ever scored
            return self.model.encode_text(batch)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> L2-normalised sentence embeddings, float32 [B, D]."""
        texts = [self._check_query(t) for t in texts]
        return l2_normalize(self.encode_queries(texts).sentence.float().cpu().numpy())

    def _wave(self, audio: Any, where: str = "audio") -> np.ndarray:
        from hci_atr.data.audio import decode_audio

        sr = self.cfg.audio.sample_rate
        if isinstance(audio, (bytes, bytearray, memoryview, str, os.PathLike)):
            source = bytes(audio) if isinstance(audio, (bytearray, memoryview)) else audio
            # only the model's clip length is used: decode no more than that (plus decode_audio's margin)
            return decode_audio(source, sr, max_seconds=self.cfg.audio.duration,
                                where=where if isinstance(source, bytes) else None)
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
        from hci_atr.data.audio import wave_features

        mel, mask = wave_features(self._wave(audio), self.cfg.audio)
        return embed_audio_batch(self.model, mel[None], mask[None], [generated_caption], self.device)

    def embed_audio(self, audio: Any) -> np.ndarray:
        """One clip -> its L2-normalised clip-level embedding, float32 [D]."""
        return l2_normalize(self.encode_audio(audio).clip.float().cpu().numpy())[0]

    # -- checks --------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_query(query: Any, max_chars: int | None = None) -> str:
        return check_query(query, max_chars)

    @staticmethod
    def _check_k(top_k: Any) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise QueryError(f"top_k: expected an integer >= 1, got {top_k!r}")
        return int(top_k)

    @staticmethod
    def _per_query(value: Any, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise QueryError(f"{name}: {len(value)} values for {n} queries")
            return list(value)
        return [value] * n

    # -- search --------------------------------------------------------------------------------------------------
    def search_text(self, query: str, top_k: int = 10, rerank: bool = True,
                    retrieve_k: int | None = None) -> SearchResult:
        """Text -> clips. Returns ``top_k`` hits, best first, with ``.timings``."""
        t0 = time.perf_counter()
        q = self._check_query(query)
        self._check_k(top_k)
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
        for k in self._per_query(top_k, len(qs), "top_k"):  # fail before encoding
            self._check_k(k)
        self._per_query(rerank, len(qs), "rerank")
        text = self.encode_queries(qs)
        t1 = time.perf_counter()
        return self.search_text_embedded_batch(text, top_k, rerank, retrieve_k, encode_ms=(t1 - t0) * 1e3)

    def search_text_embedded(self, text: Any, top_k: int = 10, rerank: bool = True, retrieve_k: int | None = None,
                             encode_ms: float = 0.0) -> SearchResult:
        """Like :meth:`search_text` for a query already encoded (TextEmbeddings with batch 1), so that a server can
        batch the encoder across requests."""
        return self.search_text_embedded_batch(text, top_k, rerank, retrieve_k, encode_ms)[0]

    def search_text_embedded_batch(self, text: Any, top_k: int | Sequence[int] = 10,
                                   rerank: bool | Sequence[bool] = True, retrieve_k: int | None = None,
                                   encode_ms: float = 0.0) -> list[SearchResult]:
        """:meth:`search_text_batch` for queries already encoded (TextEmbeddings with batch Q)."""
        import torch

        st = self._loaded
        n = len(text)
        ks = [self._check_k(k) for k in self._per_query(top_k, n, "top_k")]
        reranks = [bool(r) for r in self._per_query(rerank, n, "rerank")]
        t1 = time.perf_counter()
        qv = l2_normalize(text.sentence.float().cpu().numpy())  # [Q, D]
        rk = int(retrieve_k or self.retrieve_k)
        k1s = [max(k, rk) if r else k for k, r in zip(ks, reranks)]
        all_rows, all_scores = st.clip_scanner.search(qv, max(k1s))
        t2 = time.perf_counter()
        retrieve_ms = (t2 - t1) * 1e3
        out = []
        for i in range(n):
            t3 = time.perf_counter()
            rows, clip_scores = found(all_rows, all_scores, i)
            rows, clip_scores = rows[:k1s[i]], clip_scores[:k1s[i]]
            levels: dict[str, np.ndarray] = {}
            full = None
            if reranks[i] and len(rows):
                audio = st.index.audio_embeddings(rows, self.device)
                t = text if n == 1 else text.select(slice(i, i + 1))
                with torch.inference_mode():
                    s = self.model.score(audio, t)
                full = s.fused[:, 0].float().cpu().numpy()  # [K]
                levels = {name: v[:, 0].float().cpu().numpy() for name, v in (s.levels or {}).items()
                          if v is not None}
            order, final = _final_order(full, clip_scores, ks[i])
            t4 = time.perf_counter()
            hits = [_clip_hit(rank, st.index.meta(rows[j]), float(sc), float(clip_scores[j]),
                              {k: float(v[j]) for k, v in levels.items()})
                    for rank, (j, sc) in enumerate(zip(order, final), start=1)]
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

        st = self._loaded
        top_k = self._check_k(top_k)
        if target not in ("clips", "captions"):
            raise QueryError(f"target: expected 'clips' or 'captions', got {target!r}")
        t0 = time.perf_counter()
        emb = self.encode_audio(audio)
        qv = l2_normalize(emb.clip.float().cpu().numpy())[0]
        t1 = time.perf_counter()
        if target == "clips":
            rows, scores = found(*st.clip_scanner.search(qv, top_k))
            t2 = time.perf_counter()
            hits = [_clip_hit(rank, st.index.meta(r), float(sc), float(sc))
                    for rank, (r, sc) in enumerate(zip(rows, scores), start=1)]
            return SearchResult(hits, {"encode_ms": (t1 - t0) * 1e3, "retrieve_ms": (t2 - t1) * 1e3,
                                       "rerank_ms": 0.0, "total_ms": (t2 - t0) * 1e3}, reranked=False)
        if st.caption_scanner is None:
            return SearchResult([], {"encode_ms": (t1 - t0) * 1e3, "retrieve_ms": 0.0, "rerank_ms": 0.0,
                                     "total_ms": (t1 - t0) * 1e3})
        k1 = max(top_k, int(retrieve_k or self.retrieve_k)) if rerank else top_k
        rows, cap_scores = found(*st.caption_scanner.search(qv, k1))
        t2 = time.perf_counter()
        caps = st.index.captions
        if rerank and len(rows):
            t = self.encode_queries([str(caps["text"].iloc[int(r)]) for r in rows])
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
        index = self.index
        row = index.row_of.get(clip_id)
        if row is None:
            raise NotFoundError(f"clip id {clip_id!r} is not in the index")
        return Path(str(index.metadata["path"].iloc[row]))

    def self_check(self) -> SelfCheck:
        """A tiny end-to-end forward pass (encode a word, score it against one indexed clip); raises on failure."""
        import torch

        index = self.index
        text = self.encode_queries(["test"])
        audio = index.audio_embeddings([0], self.device)
        with torch.no_grad():
            s = self.model.score(audio, text).fused
        if tuple(s.shape) != (1, 1) or not bool(torch.isfinite(s).all()):
            raise ModelLoadError(f"self-check: score shape {tuple(s.shape)} / non-finite values")
        return SelfCheck(n_clips=len(index), version=index.version, score=float(s[0, 0]))
