"""Configuration: frozen dataclasses with defaults that run the demo, YAML load/save and dotted overrides.

One :class:`Config` holds every section. The resolved config is saved next to every checkpoint and logged to MLflow
(flattened with dotted keys). Unknown keys are an error, so a typo in a YAML file never passes silently.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from hci_atr.errors import ConfigError


@dataclass(frozen=True)
class AudioConfig:
    """Audio front end. Defaults follow the DCASE task 6 baseline (32 kHz, 64 log-mels, hop 10 ms)."""

    sample_rate: int = 32000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 320
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    duration: float = 5.0  # seconds every clip is cropped/padded to (demo: 5; AudioCaps: 10; Clotho: 30)


@dataclass(frozen=True)
class ModelConfig:
    """Encoders, the three HCI levels and the three AC uses. Every level and use is a switch for ablations."""

    # audio encoder
    audio_encoder: str = "cnn-small"  # "cnn-small" (trains in minutes on CPU) | "cnn14" (PANNs size)
    audio_width: int = 32  # channels of the first conv block of cnn-small (doubles per block)
    audio_checkpoint: str | None = None  # path to a PANNs Cnn14 .pth ({"model": state_dict}); cnn14 only
    # text encoder
    text_encoder: str = "minilm"  # "minilm" = the packaged all-MiniLM-L6-v2; else an HF id or local path
    freeze_text: bool = True
    max_words: int = 32
    # joint space
    embed_dim: int = 256
    # HCI levels
    use_clip: bool = True
    use_segment: bool = True
    use_frame: bool = True
    segment_size: int = 8  # encoder frames per audio segment
    segment_stride: int = 4
    phrase_mode: str = "chunk"  # "chunk" (split at function words / punctuation) | "ngram"
    phrase_n: int = 3  # words per phrase in ngram mode (and max chunk length in chunk mode)
    level_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # clip, segment, frame in the fused score
    learn_level_weights: bool = False
    init_temperature: float = 0.07
    # AC uses
    ac_fusion: bool = False  # audio frames attend to the generated caption (gated residual cross-attention)
    ac_branch: bool = False  # query text vs generated caption, fused with the main score
    ac_augment: bool = False  # (audio, generated caption) pairs join training
    ac_branch_weight: float = 0.5
    ac_augment_weight: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, Ray Train and MLflow settings."""

    epochs: int = 8
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    early_stopping_patience: int = 0  # 0 = off; else stop after this many epochs without a better val R-sum
    max_failures: int = 2
    features_dir: str = "hci_atr_runs/features"
    train_split: str = "train"
    val_split: str = "val"
    storage_path: str = "hci_atr_runs/ray_results"
    run_name: str = "hci-atr"
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "hci-atr"
    registered_model: str = "hci-atr"
    random_crop: bool = True
    all_gather: bool = True  # contrastive negatives from all workers


@dataclass(frozen=True)
class PipelineConfig:
    """Ray Data pipelines (caption-all, extract-features, index)."""

    num_workers: int = 2
    batch_size: int = 16
    gpus_per_worker: float = 0.0
    max_failure_rate: float = 0.1  # stop when more than this fraction of rows failed
    rows_per_shard: int = 64


@dataclass(frozen=True)
class ServeConfig:
    """Ray Serve app: limits, retrieval and autoscaling."""

    model_dir: str = "hci_atr_runs/models/hci_ac"
    index_dir: str = "hci_atr_runs/index"
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    retrieve_k: int = 50  # clip-level candidates reranked by the full score
    # stage-1 scan over all clip embeddings: "auto" (FAISS exact if installed, else numpy) | "numpy" | "faiss"
    # (exact, float32) | "faiss-fp16" (every clip, vectors held in float16: scores within ~1e-3 of exact) |
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
    max_audio_seconds: float = 60.0
    max_query_chars: int = 1000
    batch_max_size: int = 16
    # requests each Serve proxy/handle holds waiting for a replica slot (beyond max_ongoing_requests per replica);
    # past that, new requests get HTTP 503 at once instead of queueing without bound (-1: no limit)
    max_queued_requests: int = 64
    batch_wait_timeout_s: float = 0.0  # no wait: ~7 ms faster p50 at one client than 5 ms; queued queries still batch
    cors_origins: tuple[str, ...] = ()
    replica_cpus: float = 0.5  # Ray CPUs reserved per Serve replica (fractional, so 2 replicas fit on 2 cores)
    replica_gpus: float = 0.0  # Ray GPUs per Serve replica; > 0 runs the model on CUDA


class _Null:
    """Type of :data:`NULL`."""

    def __repr__(self) -> str:
        return "NULL"


# An override value meaning "set this field to None". Plain None in :meth:`Config.override` means "not given" (a CLI
# flag left at its default), so ``--set model.audio_checkpoint=null`` passes NULL to clear a field a YAML file set.
NULL = _Null()


@dataclass(frozen=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    # -- conversion -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. ``{"model.use_clip": True}`` (what MLflow logs as params)."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> "Config":
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections (audio, model, train, pipeline, serve)")
        kwargs = {}
        known = {f.name: f for f in fields(cls)}
        for section, values in data.items():
            if section not in known:
                raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(known)})")
            section_cls = _section_type(known[section])
            kwargs[section] = _build_section(section_cls, values, f"{source}: {section}")
        return cls(**kwargs)

    def override(self, updates: dict[str, Any], source: str = "override") -> "Config":
        """Return a copy with dotted-key updates applied: ``cfg.override({"model.use_frame": False})``.

        A None value is skipped (not given); :data:`NULL` sets the field to None, which only optional fields accept.
        """
        data = self.to_dict()
        for key, value in updates.items():
            if value is None:
                continue
            if value is NULL:
                value = None
            section, _, name = key.partition(".")
            if section not in data or not name:
                raise ConfigError(f"{source}: unknown key '{key}' (use section.field, e.g. model.use_frame)")
            if name not in data[section]:
                raise ConfigError(f"{source}: unknown key '{key}' (known in {section}: {', '.join(data[section])})")
            data[section][name] = value
        return Config.from_dict(data, source)


def _section_type(f: dataclasses.Field) -> type:
    return typing.get_type_hints(Config)[f.name]


def _build_section(section_cls: type, values: Any, where: str):
    if values is None:
        return section_cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of field: value")
    hints = typing.get_type_hints(section_cls)
    names = {f.name for f in fields(section_cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"{where}: unknown field '{k}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}")
    return section_cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0] if args else str
        return tuple(_coerce(v, elem, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides (CLI flags)."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{p}: not valid YAML ({first}); fix the file or start from configs/demo.yaml") from None
        cfg = Config.from_dict(data, str(p))
    if overrides:
        cfg = cfg.override(overrides, "command line")
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write_text(p, text)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it into place (readers never see a partial file)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(tmp: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Swap the finished directory ``tmp`` into place at ``dst`` (readers never see a half-written ``dst``).

    ``os.replace`` cannot overwrite a non-empty directory, so an existing ``dst`` is renamed aside first and removed
    after the swap. ``tmp`` must be on the same filesystem as ``dst`` (make it beside ``dst``).
    """
    tmp, dst = Path(tmp), Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst
