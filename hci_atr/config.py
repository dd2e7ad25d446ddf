"""The library's configuration: the audio front end, the model and what the training core needs.

Frozen dataclasses with defaults that run the demo, YAML load/save and dotted overrides (``model.use_frame``).
:class:`Sections` is the machinery any config made of sections uses (the app's settings too); :class:`Config` is
the library's: ``audio``, ``model``, ``train``. It is saved with every model. Unknown keys are an error, so a typo in
a YAML file never passes silently.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from hci_atr.errors import ConfigError, one_line
from hci_atr.files import atomic_write_text


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
    # log-mel definition (hci_atr.data.audio): "htk" = HTK mel, log(x + 1e-6), zero-padded STFT (the default);
    # "panns" = what PANNs CNN14 was trained on (librosa Slaney mel, reflect-padded STFT, 10 log10, -100 dB floor)
    frontend: str = "htk"

    def __post_init__(self):
        if self.frontend not in ("htk", "panns"):
            raise ConfigError(f"audio.frontend: expected 'htk' or 'panns', got {self.frontend!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Encoders, the three HCI levels and the three AC uses. Every level and use is a switch for ablations."""

    # audio encoder
    audio_encoder: str = "cnn-small"  # "cnn-small" (trains in minutes on CPU) | "cnn14" (PANNs size)
    audio_width: int = 32  # channels of the first conv block of cnn-small (doubles per block)
    audio_checkpoint: str | None = None  # path to a PANNs Cnn14 .pth ({"model": state_dict}); cnn14 only
    audio_clip_pooling: str = "frames"  # "frames": mean + max of the projected frames | "panns": PANNs' own path
    #                                     (max + mean over time of the conv features, then fc1), as CNN14 was trained
    audio_spec_augment: bool = False  # SpecAugment (time / frequency masks after bn0), training only
    audio_time_masks: int = 2
    audio_time_mask_width: int = 64  # frames (10 ms each)
    audio_freq_masks: int = 2
    audio_freq_mask_width: int = 8  # mel bins
    audio_dropout: float = 0.0  # after each conv block (PANNs: 0.2)
    audio_fc_dropout: float = 0.0  # on fc1's input (PANNs: 0.5)
    # text encoder
    text_encoder: str = "minilm"  # "minilm" = the packaged all-MiniLM-L6-v2; else an HF id or local path
    # False: the tower trains at train.text_lr (only its top train.text_train_layers layers, the default 2); measured
    # on the compositional benchmark (BENCHMARKS.md) against a frozen tower
    freeze_text: bool = False
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
    # the audio a generated caption is an extra positive of (ac_augment with ac_fusion): "unfused", the clip encoded
    # without its caption (else the pair rewards copying the fused caption through); "fused", the fused audio
    ac_augment_audio: str = "unfused"
    # generated captions whose captioner confidence is below this are ignored (no fusion, branch or extra pair);
    # None: every caption is used. nearest's confidence is the cosine of the clip and its neighbour
    ac_min_confidence: float | None = None
    # order and attributes (hci_atr.models.temporal / order / weighting, hci_atr.data.negatives); all off by default
    temporal_context: str = "none"  # none | gru | transformer: a sequence model over the frames before any pooling
    temporal_positions: str = "sinusoidal"  # sinusoidal | learned | none: frame positions added to its input
    temporal_layers: int = 1
    segment_order: str = "none"  # none | position_bias | event_bias | soft_dtw: the segment-phrase score hears order
    fusion: str = "sum"  # sum | calibrated: levels divided by their learnt temperatures before the weighted sum
    unit_weights: bool = False  # learnt per-unit weights instead of plain means in the segment/frame set scores
    hard_negatives: str = "none"  # none | order | attribute | both: hard-negative captions of each clip
    hard_negative_weight: float = 0.0  # L = L_contrastive + w * L_hard (needs w > 0 when hard_negatives is set)

    def __post_init__(self):
        for name, allowed in (("temporal_context", ("none", "gru", "transformer")),
                              ("temporal_positions", ("sinusoidal", "learned", "none")),
                              ("segment_order", ("none", "position_bias", "event_bias", "soft_dtw")),
                              ("fusion", ("sum", "calibrated")),
                              ("ac_augment_audio", ("unfused", "fused")),
                              ("audio_clip_pooling", ("frames", "panns")),
                              ("hard_negatives", ("none", "order", "attribute", "both"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.temporal_layers < 1:
            raise ConfigError(f"model.temporal_layers: expected >= 1, got {self.temporal_layers}")
        if self.hard_negatives != "none" and self.hard_negative_weight <= 0:
            raise ConfigError(f"model.hard_negatives={self.hard_negatives!r} needs model.hard_negative_weight > 0 "
                              "(T-CLAP uses 0.5); set hard_negatives=none to train without them")


@dataclass(frozen=True)
class TrainConfig:
    """What the training core (:mod:`hci_atr.training`) needs: optimisation, batching, seeding, stopping."""

    epochs: int = 8
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    early_stopping_patience: int = 0  # 0 = off; else stop after this many epochs without a better val R-sum
    random_crop: bool = True
    all_gather: bool = True  # contrastive negatives from all workers
    # pretrained parts train at their own rates (the warm-up applies to every rate): the heads' 1e-3 collapses a
    # pretrained tower; 2e-5 is the usual BERT / sentence-transformers fine-tuning rate, 1e-4 what audio-text
    # retrieval fine-tunes a PANNs CNN14 with
    text_lr: float = 2e-5  # the text transformer's parameters (with model.freeze_text false)
    audio_pretrained_lr: float = 1e-4  # the audio encoder's parameters model.audio_checkpoint (PANNs) filled
    text_train_layers: int = 2  # with model.freeze_text false: -1 trains every layer, k only the top k (rest frozen)
    text_cache_mb: float = 1024.0  # the frozen text layers' outputs kept per caption for the run (MiB; 0: off)
    # none | text: each training batch built from groups of clips whose captions read alike (hci_atr.training.mining),
    # so a clip meets its order-swapped or attribute-flipped twin as a negative; batch_mining_group clips a group
    batch_mining: str = "none"
    batch_mining_group: int = 2

    def __post_init__(self):
        for name in ("text_lr", "audio_pretrained_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}: expected a learning rate > 0, got {getattr(self, name)!r}")
        if self.text_train_layers < -1:
            raise ConfigError(f"train.text_train_layers: expected -1 (all layers) or a number of top layers >= 0, "
                              f"got {self.text_train_layers}")
        if self.text_cache_mb < 0:
            raise ConfigError(f"train.text_cache_mb: expected >= 0 (0: off), got {self.text_cache_mb}")
        if self.batch_mining not in ("none", "text"):
            raise ConfigError(f"train.batch_mining: expected one of none, text, got {self.batch_mining!r}")
        if self.batch_mining_group < 2:
            raise ConfigError(f"train.batch_mining_group: expected >= 2 clips a group, got {self.batch_mining_group}")


class _Null:
    """Type of :data:`NULL`."""

    def __repr__(self) -> str:
        return "NULL"


# An override value meaning "set this field to None". Plain None in :meth:`Config.override` means "not given" (a CLI
# flag left at its default), so ``--set model.audio_checkpoint=null`` passes NULL to clear a field a YAML file set.
NULL = _Null()


class Sections:
    """Mixin for a frozen dataclass whose fields are section dataclasses: dict/YAML conversion and overrides."""

    # legacy key -> section it moved to (from_dict moves such keys, so older YAML files and checkpoints still load)
    MOVED_KEYS: typing.ClassVar[dict[str, str]] = {}

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
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config", strict: bool = True):
        """Build from ``{section: {field: value}}``. ``strict=False`` drops sections and fields this class does not
        know (how a model reads the config a run saved with the app's sections in it)."""
        data = data or {}
        known = {f.name: f for f in fields(cls)}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(known)})")
        data = _move_keys({k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}, cls.MOVED_KEYS)
        kwargs = {}
        for section, values in data.items():
            if section not in known:
                if not strict:
                    continue
                raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(known)})")
            section_cls = _section_type(cls, known[section])
            if not strict and isinstance(values, dict):
                names = {f.name for f in fields(section_cls)}
                values = {k: v for k, v in values.items() if k in names}
            kwargs[section] = _build_section(section_cls, values, f"{source}: {section}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None):
        """Defaults, then the YAML file (if any), then dotted overrides (CLI flags)."""
        cfg = cls()
        if path is not None:
            cfg = cls.from_dict(read_yaml(path), str(path))
        if overrides:
            cfg = cfg.override(overrides, "command line")
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, updates: dict[str, Any], source: str = "override"):
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
        return type(self).from_dict(data, source)



@dataclass(frozen=True)
class Config(Sections):
    """The library's config: what a model is (audio front end + model) and how the training core trains it."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _move_keys(data: dict[str, Any], moved: dict[str, str]) -> dict[str, Any]:
    """Move legacy ``section.key`` entries to the section that now holds them (``{"train.num_workers": "run"}``)."""
    for old, new_section in moved.items():
        section, _, key = old.partition(".")
        values = data.get(section)
        if isinstance(values, dict) and key in values:
            target = data.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(key, values[key])
            del values[key]
    return data


def _section_type(cls: type, f: dataclasses.Field) -> type:
    return typing.get_type_hints(cls)[f.name]


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


def read_yaml(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML ({one_line(e)}); fix the file or start from configs/demo.yaml") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The library config: defaults, then the YAML file (if any), then dotted overrides."""
    return Config.load(path, overrides)


def save_config(cfg: Sections, path: str | os.PathLike) -> None:
    cfg.save(path)
