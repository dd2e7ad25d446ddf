"""The app's settings: the library's config (audio, model, train) plus how jobs run (Ray Train, MLflow), the Ray Data
pipelines and the Serve app.

One YAML file holds every section (``configs/demo.yaml`` spells out the defaults); CLI flags override it with dotted
keys. The library only ever sees ``settings.library`` (a :class:`hci_atr.config.Config`); a run saves the whole
resolved settings beside its checkpoints and logs them to MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hci_atr.config import AudioConfig, Config, ModelConfig, Sections, TrainConfig


@dataclass(frozen=True)
class RunSettings:
    """Where and how `hci-atr train` runs: Ray Train workers, fault tolerance, storage, MLflow."""

    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 2
    features_dir: str = "hci_atr_runs/features"
    train_split: str = "train"
    val_split: str = "val"
    storage_path: str = "hci_atr_runs/ray_results"
    run_name: str = "hci-atr"
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "hci-atr"
    registered_model: str = "hci-atr"
    # how the training rows reach the workers: "materialize" (the split held in the object store), "stream" (each
    # worker reads its share of the parquet shards every epoch, memory flat in the data size), "auto" (stream when
    # the split would take more than object_store_share of the object store)
    data_mode: str = "auto"
    object_store_share: float = 0.3
    # "global": every epoch a seeded permutation of the whole split cut into equal worker shares; "split": each
    # worker keeps one fixed share for the whole run (the behaviour before whole-set shuffling)
    shuffle: str = "global"
    shuffle_buffer_rows: int = 512  # stream: rows each worker draws its batches from at random


@dataclass(frozen=True)
class PipelineSettings:
    """Ray Data pipelines (caption-all, extract-features, index)."""

    num_workers: int = 2
    batch_size: int = 16
    gpus_per_worker: float = 0.0
    max_failure_rate: float = 0.1  # stop when more than this fraction of rows failed
    rows_per_shard: int = 64


@dataclass(frozen=True)
class ServeSettings:
    """Ray Serve app: limits, retrieval and autoscaling."""

    model_dir: str = "hci_atr_runs/models/hci_ac"
    index_dir: str = "hci_atr_runs/index"
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    retrieve_k: int = 50  # clip-level candidates reranked by the full score
    # stage-1 scan over all clip embeddings: "auto" (FAISS exact if installed, else numpy) | "numpy" | "faiss"
    # (exact, float32) | "faiss-fp16" (every clip, vectors held in float16) |
    # "ivf" (FAISS inverted lists: APPROXIMATE, visits ivf_nprobe of ivf_nlist lists; a true top hit can be missed)
    scan: str = "auto"
    ivf_nlist: int = 0  # lists of the "ivf" scan; 0 = 4 * sqrt(N) (at most N / 39, at least 1)
    ivf_nprobe: int = 32  # lists visited per query by the "ivf" scan
    threads: int = 1  # intra-op threads (torch + FAISS) of each replica; 0 leaves the libraries' defaults
    batch_search: bool = True  # a @serve.batch of text queries shares one encode and one scan (else: the encode)
    index_unit_dtype: str = "float16"  # how `hci-atr index` stores segment/frame embeddings: float16 | float32
    warm_index: bool = True  # replicas ask the OS to page the index files in at start (rerank rows then come from RAM)
    max_top_k: int = 100
    max_upload_bytes: int = 10 * 1024 * 1024
    max_json_bytes: int = 64 * 1024  # JSON request bodies (queries, texts to embed); 413 past it, even chunked
    # Serve's end-to-end HTTP timeout (its proxy answers 408 past it); applied where this project starts Serve
    # (serve.app.http_options) or by a Serve config file's http_options.request_timeout_s
    request_timeout_s: float = 30.0
    compute_threads: int = 2  # threads of a replica that decode uploads and run the model, off its event loop
    max_audio_seconds: float = 60.0
    max_query_chars: int = 1000
    batch_max_size: int = 16
    # requests each Serve proxy/handle holds waiting for a replica slot (beyond max_ongoing_requests per replica);
    # past that, new requests get HTTP 503 at once instead of queueing without bound (-1: no limit)
    max_queued_requests: int = 64
    batch_wait_timeout_s: float = 0.0  # no wait; queries already queued still batch
    cors_origins: tuple[str, ...] = ()
    replica_cpus: float = 0.5  # Ray CPUs reserved per Serve replica (fractional, so 2 replicas fit on 2 cores)
    replica_gpus: float = 0.0  # Ray GPUs per Serve replica; > 0 runs the model on CUDA


_RUN_KEYS = ("num_workers", "use_gpu", "max_failures", "features_dir", "train_split", "val_split", "storage_path",
             "run_name", "tracking_uri", "experiment", "registered_model")


@dataclass(frozen=True)
class Settings(Sections):
    """Every section of a YAML config file. ``settings.library`` is what the library gets."""

    # before the library/app split these lived in `train:`; older files and checkpoints still load
    MOVED_KEYS: ClassVar[dict[str, str]] = {f"train.{k}": "run" for k in _RUN_KEYS}

    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSettings = field(default_factory=RunSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)

    @property
    def library(self) -> Config:
        return Config(audio=self.audio, model=self.model, train=self.train)

    @classmethod
    def of(cls, cfg: Config | "Settings" | None) -> "Settings":
        """Settings for a library config (app sections at their defaults), or the settings themselves."""
        if cfg is None:
            return cls()
        if isinstance(cfg, Settings):
            return cfg
        return cls(audio=cfg.audio, model=cfg.model, train=cfg.train)


def load_settings(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then the YAML file (if any), then dotted overrides (CLI flags)."""
    return Settings.load(path, overrides)
