"""Stage-1 scans of the retriever: the top rows of a fixed matrix of L2-normalised embeddings for query vectors.

Exact: ``numpy`` (one float32 matmul and an ``argpartition``) or ``faiss`` (FAISS's flat inner-product index, the same
rows; ``pip install 'hci-atr[faiss]'``). Opt-in for large collections: ``faiss-fp16`` (every row, held in float16:
scores within ~1e-3) and ``ivf`` (inverted lists; APPROXIMATE: a true top row can be missed). ``auto`` is ``faiss``
when FAISS is installed, else ``numpy``. :func:`set_threads` sets the intra-op threads of everything a scan uses.
"""

from __future__ import annotations

import math

import numpy as np

from hci_atr.errors import ConfigError, ModelLoadError

SCAN_BACKENDS = ("auto", "numpy", "faiss", "faiss-fp16", "ivf")
GEMM_FROM = 4  # the exact FAISS backend hands batches of this many queries or more to one BLAS product


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


class Scanner:
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


def found(rows: np.ndarray, scores: np.ndarray, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Query ``i``'s rows and scores from a scan, without the ``-1`` slots an approximate (IVF) scan leaves when it
    finds fewer rows than asked."""
    keep = rows[i] >= 0
    return rows[i][keep], scores[i][keep]
