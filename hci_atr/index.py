"""The search index: an embedded audio collection on disk, in the layout the retriever and the Serve app read.

Layout of an index directory (written atomically: everything goes to a temporary sibling directory that is renamed
into place only when complete, so a reader never sees a half-written index)::

    index/
      manifest.json        format name + version, N, D, model config, the structure of the stored audio embeddings
      clip.npy             float32 [N, D]   clip-level embeddings, L2-normalised (the first, exact-scan stage)
      audio/<field>.npy    every tensor of the model's AudioEmbeddings for all N clips, stacked on axis 0
                           (e.g. segments [N, S, D] + segment mask [N, S], frames [N, T', D] + frame mask [N, T'],
                           generated-caption embeddings when AC is on); what reranking with the full score needs.
                           Unit-level tensors (3 or more axes: segments, frames) are stored in ``unit_dtype``
                           (manifest; float16 by default, float32 on request), everything else as computed
                           (per-clip vectors float32, masks bool); reading casts them back to float32
      metadata.parquet     one row per clip: id, path, duration, split, captions (list<string>), generated_caption
      captions.parquet     one row per caption text: caption_idx, audio_id, text, source ("reference"|"generated")
      caption_emb.npy      float32 [C, D]   sentence embeddings of captions.parquet's texts, L2-normalised
                           (the first stage of audio -> text search)

Row i of clip.npy, of every audio/*.npy and of metadata.parquet describe the same clip. Every array is a plain ``.npy``
file opened memory-mapped, so a loaded index costs RAM only for the clip matrix, the metadata and the rows a query
touches: at 100k clips of the default 5 s setup (S = 15 segments, T' = 62 frames, D = 256) the segment + frame
tensors are 3.9 GB in float16 (7.9 GB in float32), on disk and in the page cache, not in the process's own memory.
:class:`IndexWriter` writes an index batch by batch in bounded memory (one batch, the clip matrix and the caption
texts).

Versions: 2 (this one) added ``unit_dtype``; version-1 indexes (all float32) load unchanged. Code that reads only
version 1 refuses a version-2 index with a one-line "rebuild" error instead of scoring float16 tensors.

The stored AudioEmbeddings are rebuilt for any subset of rows with :meth:`Index.audio_embeddings`, so the model's own
``score`` runs on them unchanged. The structure is recorded generically (class name + field -> array file), so the
index does not hard-code the model's field names; classes are only ever re-imported from inside the ``hci_atr`` package.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hci_atr.files import replace_dir
from hci_atr.errors import DataError

INDEX_FORMAT = "hci-atr-index"
INDEX_VERSION = 2
READABLE_VERSIONS = (1, 2)
UNIT_DTYPES = ("float16", "float32")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a")


# ---------------------------------------------------------------------------------------------------------------
# what goes into an index
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexItem:
    """One clip of the collection to index."""

    audio_id: str
    audio_path: str
    split: str = ""
    captions: tuple[str, ...] = ()
    generated_caption: str | None = None


def items_from_records(records: Iterable[Any], generated: dict[str, str] | None = None) -> list[IndexItem]:
    """Dataset records (``hci_atr.data.formats.Record``) -> index items, joined with generated captions by audio_id."""
    generated = generated or {}
    return [
        IndexItem(r.audio_id, str(r.audio_path), r.split, tuple(r.captions), generated.get(r.audio_id))
        for r in records
    ]


def items_from_audio_dir(audio_dir: str | os.PathLike, generated: dict[str, str] | None = None) -> list[IndexItem]:
    """Every audio file under ``audio_dir`` (recursive, sorted) -> index items; the id is the path relative to the
    folder with '/' separators (e.g. ``birds/a.wav``), which is what ``caption-all`` on a manifest of the folder uses."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise DataError(f"{root}: audio folder not found; pass an existing folder to --audio-dir")
    generated = generated or {}
    items = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
            rel = p.relative_to(root).as_posix()
            gen = generated.get(rel, generated.get(p.stem))
            items.append(IndexItem(rel, str(p.resolve()), "", (), gen))
    if not items:
        raise DataError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found; check the folder")
    return items


# ---------------------------------------------------------------------------------------------------------------
# model outputs <-> arrays (generic over the model's output dataclasses)
# ---------------------------------------------------------------------------------------------------------------


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "shape")


def flatten_outputs(obj: Any, batch_size: int, prefix: str = "") -> tuple[dict, dict[str, np.ndarray]]:
    """A model output (dataclass of tensors, possibly nested) -> (structure spec, {name: array [B, ...]}).

    Tensors whose first axis is the batch become per-row arrays; anything else (None, numbers, strings) is kept in
    the spec as a JSON value. Why generic: the index must not break when the model adds or renames a field.
    """
    if dataclasses.is_dataclass(obj):
        spec = {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}", "fields": {}}
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(obj):
            sub_spec, sub_arrays = flatten_outputs(getattr(obj, f.name), batch_size, f"{prefix}{f.name}.")
            spec["fields"][f.name] = sub_spec
            arrays.update(sub_arrays)
        return spec, arrays
    if isinstance(obj, dict):
        spec = {"__dict__": {}}
        arrays = {}
        for k, v in obj.items():
            sub_spec, sub_arrays = flatten_outputs(v, batch_size, f"{prefix}{k}.")
            spec["__dict__"][str(k)] = sub_spec
            arrays.update(sub_arrays)
        return spec, arrays
    if _is_tensor(obj):
        arr = obj.detach().float().cpu().numpy() if obj.is_floating_point() else obj.detach().cpu().numpy()
        name = prefix.rstrip(".")
        if arr.ndim >= 1 and arr.shape[0] == batch_size:
            return {"__array__": name}, {name: arr}
        return {"__const__": arr.tolist(), "dtype": str(arr.dtype)}, {}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"__value__": obj}, {}
    if isinstance(obj, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) or v is None for v in obj):
        return {"__value__": list(obj)}, {}
    raise DataError(f"index: cannot store model output field '{prefix.rstrip('.')}' of type {type(obj).__name__}")


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    # only rebuild our own classes: a manifest is data, and data must not choose what gets imported
    if not (module == "hci_atr" or module.startswith("hci_atr.")):
        raise DataError(f"index manifest names class '{path}' outside hci_atr; the index is corrupt or foreign")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise DataError(f"index manifest names class '{path}' which does not exist ({e}); rebuild the index "
                        "with `hci-atr index`") from None
    return obj


def unflatten_outputs(spec: dict, arrays: dict[str, Any], device: str = "cpu") -> Any:
    """Inverse of :func:`flatten_outputs` for the given arrays (already row-selected)."""
    import torch

    if "__class__" in spec:
        cls = _import_class(spec["__class__"])
        kwargs = {k: unflatten_outputs(v, arrays, device) for k, v in spec["fields"].items()}
        init_names = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: v for k, v in kwargs.items() if k in init_names})
        return obj
    if "__dict__" in spec:
        return {k: unflatten_outputs(v, arrays, device) for k, v in spec["__dict__"].items()}
    if "__array__" in spec:
        return torch.from_numpy(np.ascontiguousarray(arrays[spec["__array__"]])).to(device)
    if "__const__" in spec:
        return torch.tensor(np.asarray(spec["__const__"], dtype=spec["dtype"]), device=device)
    return spec.get("__value__")


def _stack_padded(chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate [b_i, ...] chunks on axis 0, zero-padding the other axes to the largest size (zeros are also
    'masked out' for boolean masks, so a padded frame never counts)."""
    if len({c.shape[1:] for c in chunks}) == 1:
        return np.concatenate(chunks, axis=0)
    ndim = chunks[0].ndim
    target = [max(c.shape[d] for c in chunks) for d in range(1, ndim)]
    out = []
    for c in chunks:
        pad = [(0, 0)] + [(0, t - s) for t, s in zip(target, c.shape[1:])]
        out.append(np.pad(c, pad))
    return np.concatenate(out, axis=0)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# embedding a batch of clips (plain PyTorch; the Ray workflow calls this from its actors)
# ---------------------------------------------------------------------------------------------------------------


def model_config(model: Any):
    """The hci_atr Config a model carries (``model.cfg``)."""
    for name in ("cfg", "config"):
        cfg = getattr(model, name, None)
        if cfg is not None and hasattr(cfg, "audio"):
            return cfg
    raise DataError("model carries no hci_atr Config (expected attribute 'cfg'); load it with "
                    "HciAtrModel.from_pretrained")


def uses_aux(cfg) -> bool:
    """Whether the model consumes generated captions at encode time (AC fusion or AC branch)."""
    return bool(getattr(cfg.model, "ac_fusion", False) or getattr(cfg.model, "ac_branch", False))


def mel_from_wave(wave: np.ndarray, audio_cfg) -> tuple[np.ndarray, np.ndarray]:
    """Mono wave at ``audio_cfg.sample_rate`` -> (mel [T, M] float32, mask [T] bool), exactly as the feature
    extraction front end does it (wave cut at / zero-padded to the configured duration, then log-mel; the mask is
    True on frames that cover real audio), so a served query clip matches what the model was trained on."""
    from hci_atr.data.audio import log_mel, n_frames, n_samples, valid_frames

    wave = np.asarray(wave, dtype=np.float32)[: n_samples(audio_cfg)]
    seconds = wave.shape[0] / audio_cfg.sample_rate
    if wave.shape[0] < n_samples(audio_cfg):
        wave = np.pad(wave, (0, n_samples(audio_cfg) - wave.shape[0]))
    mel = log_mel(wave, audio_cfg).numpy().astype(np.float32)
    mask = np.arange(n_frames(audio_cfg)) < valid_frames(seconds, audio_cfg)
    return mel, mask


def decode_audio_bytes(data: bytes, sample_rate: int, where: str = "upload",
                       max_seconds: float | None = None) -> np.ndarray:
    """Audio file contents (wav/flac/ogg...) -> mono float32 wave at ``sample_rate``; raises AudioError.

    ``max_seconds``: decode at most this many seconds plus one sample, so a caller that rejects longer audio can tell
    (the result is then longer than ``max_seconds``) without ever holding the whole file decoded. A compressed upload
    can be tiny and still hold an hour of audio.
    """
    import soundfile as sf

    from hci_atr.errors import AudioError

    try:
        with sf.SoundFile(io.BytesIO(data)) as fh:
            sr = fh.samplerate
            frames = -1 if max_seconds is None else int(math.ceil(max_seconds * sr)) + 1
            wave = fh.read(frames=frames, dtype="float32", always_2d=True)  # [N, C]
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on junk
        reason = str(e).split(": ")[-1][:120] or type(e).__name__  # drop "Error opening <BytesIO at 0x..>"
        raise AudioError(f"{where}: cannot decode audio ({reason}); send WAV, FLAC or OGG") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{where}: audio file has no samples")
    if not np.isfinite(wave).all():
        raise AudioError(f"{where}: audio is not finite (contains NaN or Inf samples)")
    wave = wave.mean(axis=1)
    if sr != sample_rate:
        import torch
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), sr, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


def embed_audio_batch(model: Any, mels: np.ndarray, masks: np.ndarray, generated: Sequence[str | None],
                      device: str = "cpu") -> Any:
    """mels [B, T, M], masks [B, T], generated captions (None = none) -> the model's AudioEmbeddings."""
    import torch

    cfg = model_config(model)
    aux = aux_mask = None
    if uses_aux(cfg):
        aux = model.tokenize([g or "" for g in generated])
        aux = _to_device(aux, device)
        aux_mask = torch.tensor([bool(g) for g in generated], device=device)
    with torch.no_grad():
        return model.encode_audio(torch.from_numpy(mels).to(device), torch.from_numpy(masks).to(device),
                                  aux=aux, aux_mask=aux_mask)


def _to_device(obj: Any, device: str) -> Any:
    if device == "cpu":
        return obj
    if hasattr(obj, "to"):
        return obj.to(device)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """texts -> L2-normalised sentence embeddings, float32 [len(texts), D]."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        batch = _to_device(model.tokenize(list(texts[i:i + batch_size])), device)
        with torch.no_grad():
            out.append(model.encode_text(batch).sentence.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return l2_normalize(np.concatenate(out, axis=0))


def embed_items(model: Any, items: Sequence[IndexItem], batch_size: int = 16, device: str = "cpu",
                on_error: str = "raise") -> tuple[dict, dict[str, np.ndarray], list[IndexItem], list[dict]]:
    """Embed clips without Ray (tests, small collections; the Ray workflow does the same per actor).

    Returns (structure spec, {field: array [N, ...]}, kept items, errors [{audio_id, reason}]).
    """
    from hci_atr.data.audio import load_audio
    from hci_atr.errors import AudioError

    cfg = model_config(model)
    spec: dict | None = None
    chunks: dict[str, list[np.ndarray]] = {}
    kept: list[IndexItem] = []
    errors: list[dict] = []
    for i in range(0, len(items), batch_size):
        mels, masks, gens, ok = [], [], [], []
        for it in items[i:i + batch_size]:
            try:
                wave = load_audio(it.audio_path, cfg.audio.sample_rate)
            except AudioError as e:
                if on_error == "raise":
                    raise
                errors.append({"audio_id": it.audio_id, "reason": str(e)})
                continue
            m, k = mel_from_wave(wave, cfg.audio)
            mels.append(m), masks.append(k), gens.append(it.generated_caption), ok.append(it)
        if not ok:
            continue
        emb = embed_audio_batch(model, np.stack(mels), np.stack(masks), gens, device)
        spec, arrays = flatten_outputs(emb, len(ok))
        for k, v in arrays.items():
            chunks.setdefault(k, []).append(v)
        kept.extend(ok)
    if spec is None:
        raise DataError("index: no clip could be embedded; check the audio files")
    return spec, {k: _stack_padded(v) for k, v in chunks.items()}, kept, errors


# ---------------------------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------------------------


def _wave_duration(path: str) -> float:
    try:
        import soundfile as sf

        info = sf.info(path)
        return float(info.frames) / float(info.samplerate)
    except Exception:
        return float("nan")


def _stored(arr: np.ndarray, unit_dtype: str) -> np.ndarray:
    """How an AudioEmbeddings array is stored: unit-level float tensors (3+ axes) in ``unit_dtype``, other float
    arrays float32, everything else (masks) as it is."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        return np.ascontiguousarray(arr, dtype=unit_dtype if arr.ndim >= 3 else np.float32)
    return np.ascontiguousarray(arr)


def _check_unit_dtype(unit_dtype: str) -> str:
    if unit_dtype not in UNIT_DTYPES:
        from hci_atr.errors import ConfigError

        raise ConfigError(f"index unit dtype {unit_dtype!r} is not one of {', '.join(UNIT_DTYPES)}; set "
                          "serve.index_unit_dtype to float16 or float32")
    return unit_dtype


class IndexWriter:
    """Write an index directory batch by batch, in bounded memory, atomically.

    Each :meth:`add` stores one batch of embedded clips as chunk files inside a temporary sibling directory;
    :meth:`close` joins the chunks into the final memory-mappable ``.npy`` files (zero-padding unit axes to the
    largest batch, as :func:`_stack_padded` does), embeds the caption texts (each distinct text once) and renames the
    directory into place (an existing index is replaced). Memory: one batch, the clip matrix [N, D], the items and
    caption texts. Used as a context manager, an exception discards the partial directory::

        with IndexWriter(out, model) as w:
            for spec, arrays, items in batches:
                w.add(spec, arrays, items)
        # closed on a clean exit; w.path is the index
    """

    def __init__(self, out_dir: str | os.PathLike, model: Any, model_dir: str | None = None,
                 extra: dict | None = None, device: str = "cpu", unit_dtype: str = "float16"):
        self.out = Path(out_dir)
        self.model = model
        self.cfg = model_config(model)
        self.model_dir = model_dir
        self.extra = dict(extra or {})
        self.device = device
        self.unit_dtype = _check_unit_dtype(unit_dtype)
        self.spec: dict | None = None
        self.items: list[IndexItem] = []
        self._clip: list[np.ndarray] = []
        self._chunks: dict[str, list[Path]] = {}
        self.path: Path | None = None
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        (self.tmp / "chunks").mkdir()

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.path is None:
                self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, spec: dict, arrays: dict[str, np.ndarray], items: Sequence[IndexItem]) -> None:
        """One batch: the stored AudioEmbeddings (``flatten_outputs`` of the model output) of ``items``, same order."""
        b = len(items)
        if b == 0:
            return
        if self.spec is None:
            self.spec = spec
            _clip_field(spec)
        elif spec != self.spec:
            raise DataError(f"{self.out}: a batch's embeddings have a different structure than the first batch's; "
                            "embed the whole collection with one model")
        if set(arrays) != set(self._chunks or arrays):
            raise DataError(f"{self.out}: a batch has fields {sorted(arrays)}, the first had {sorted(self._chunks)}")
        bad = [k for k, v in arrays.items() if np.shape(v)[0] != b]
        if bad:
            raise DataError(f"{self.out}: embeddings {bad} do not have one row per clip of the batch ({b})")
        self._clip.append(l2_normalize(arrays[_clip_field(spec)]))
        for i, name in enumerate(sorted(arrays)):
            path = self.tmp / "chunks" / f"{i:02d}.{len(self._chunks.get(name, [])):07d}.npy"
            np.save(path, _stored(arrays[name], self.unit_dtype))
            self._chunks.setdefault(name, []).append(path)
        self.items.extend(items)

    def _join(self, chunks: list[Path], dest: Path) -> None:
        if len(chunks) == 1:
            os.replace(chunks[0], dest)
            return
        parts = [np.load(c, mmap_mode="r") for c in chunks]
        ndim = parts[0].ndim
        target = tuple(max(p.shape[d] for p in parts) for d in range(1, ndim))
        # a new file reads as zeros, so the padding of a smaller chunk is zeros (= masked out, as _stack_padded)
        out = np.lib.format.open_memmap(dest, mode="w+", dtype=parts[0].dtype, shape=(len(self.items), *target))
        r = 0
        for p in parts:
            out[(slice(r, r + p.shape[0]),) + tuple(slice(0, s) for s in p.shape[1:])] = p
            r += p.shape[0]
        out.flush()
        del out, parts

    def close(self) -> Path:
        """Finish the index and rename it into place; returns its path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            n = len(self.items)
            if n == 0 or self.spec is None:
                raise DataError(f"{self.out}: nothing to index (no clip was added)")
            clip = np.concatenate(self._clip, axis=0)
            self._clip = []
            items = self.items
            cap_rows = {"caption_idx": [], "audio_id": [], "text": [], "source": []}
            for it in items:
                for c in it.captions:
                    cap_rows["audio_id"].append(it.audio_id), cap_rows["text"].append(c)
                    cap_rows["source"].append("reference")
                if it.generated_caption:
                    cap_rows["audio_id"].append(it.audio_id), cap_rows["text"].append(it.generated_caption)
                    cap_rows["source"].append("generated")
            cap_rows["caption_idx"] = list(range(len(cap_rows["text"])))
            if cap_rows["text"]:  # each distinct text once (references and generated captions repeat)
                distinct, inverse = np.unique(np.asarray(cap_rows["text"], dtype=object), return_inverse=True)
                cap_emb = embed_texts(self.model, [str(t) for t in distinct], device=self.device)[inverse]
            else:
                cap_emb = np.zeros((0, clip.shape[1]), dtype=np.float32)

            tmp = self.tmp
            np.save(tmp / "clip.npy", clip.astype(np.float32))
            (tmp / "audio").mkdir()
            files = {}
            for i, name in enumerate(sorted(self._chunks)):
                fname = f"audio/{i:02d}_{name.replace('/', '_')}.npy"
                self._join(self._chunks[name], tmp / fname)
                files[name] = fname
            shutil.rmtree(tmp / "chunks", ignore_errors=True)
            meta = pa.table({
                "id": pa.array([it.audio_id for it in items], pa.string()),
                "path": pa.array([it.audio_path for it in items], pa.string()),
                "duration": pa.array(_durations(items), pa.float32()),
                "split": pa.array([it.split for it in items], pa.string()),
                "captions": pa.array([list(it.captions) for it in items], pa.list_(pa.string())),
                "generated_caption": pa.array([it.generated_caption for it in items], pa.string()),
            })
            pq.write_table(meta, tmp / "metadata.parquet")
            pq.write_table(pa.table({
                "caption_idx": pa.array(cap_rows["caption_idx"], pa.int64()),
                "audio_id": pa.array(cap_rows["audio_id"], pa.string()),
                "text": pa.array(cap_rows["text"], pa.string()),
                "source": pa.array(cap_rows["source"], pa.string()),
            }), tmp / "captions.parquet")
            np.save(tmp / "caption_emb.npy", cap_emb.astype(np.float32))
            manifest = {
                "format": INDEX_FORMAT, "version": INDEX_VERSION, "n_clips": n, "embed_dim": int(clip.shape[1]),
                "n_captions": len(cap_rows["text"]), "clip_field": _clip_field(self.spec), "structure": self.spec,
                "files": files, "unit_dtype": self.unit_dtype,
                "model_dir": str(self.model_dir) if self.model_dir else None, "config": self.cfg.to_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.extra,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            self.path = replace_dir(tmp, self.out)
            return self.path
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the partial directory (nothing at ``out`` changes)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _durations(items: Sequence[IndexItem]) -> list[float]:
    """Seconds of each item's file (NaN when unreadable); a path shared by several items is read once."""
    seen: dict[str, float] = {}
    for it in items:
        if it.audio_path not in seen:
            seen[it.audio_path] = _wave_duration(it.audio_path)
    return [seen[it.audio_path] for it in items]


def write_index(out_dir: str | os.PathLike, model: Any, spec: dict, arrays: dict[str, np.ndarray],
                items: Sequence[IndexItem], model_dir: str | None = None, extra: dict | None = None,
                device: str = "cpu", unit_dtype: str = "float16") -> Path:
    """Write an index directory atomically (temporary sibling, then rename; an existing index is replaced).

    ``spec``/``arrays``: the stored AudioEmbeddings for ``items`` in the same row order (see :func:`embed_items`).
    Caption sentence embeddings (references + generated) are computed here with ``model``. For collections that do
    not fit in memory, add batches to an :class:`IndexWriter` instead.
    """
    out = Path(out_dir)
    n = len(items)
    clip_key = _clip_field(spec)
    if n == 0 or clip_key not in arrays or arrays[clip_key].shape[0] != n:
        raise DataError(f"{out}: nothing to index (or embeddings do not match the {n} clips)")
    with IndexWriter(out, model, model_dir=model_dir, extra=extra, device=device, unit_dtype=unit_dtype) as w:
        w.add(spec, arrays, items)
    return w.path


def _clip_field(spec: dict) -> str:
    fields = spec.get("fields", {})
    if "clip" in fields and "__array__" in fields["clip"]:
        return fields["clip"]["__array__"]
    raise DataError("model's AudioEmbeddings has no per-clip 'clip' tensor; cannot build a clip-level index")


def _computed(arr: np.ndarray) -> np.ndarray:
    """Stored rows -> what the model computes with (float16 unit tensors back to float32)."""
    arr = np.asarray(arr)
    return arr.astype(np.float32) if arr.dtype == np.float16 else arr


class Index:
    """A loaded index directory (arrays memory-mapped, so opening a large index is cheap)."""

    def __init__(self, path: Path, manifest: dict, clip: np.ndarray, audio: dict[str, np.ndarray], metadata,
                 captions, caption_emb: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.clip = clip  # [N, D] float32, L2-normalised
        self.audio = audio  # field -> [N, ...]
        self.metadata = metadata  # pandas DataFrame, N rows
        self.captions = captions  # pandas DataFrame, C rows
        self.caption_emb = caption_emb  # [C, D]
        self.ids: list[str] = [str(i) for i in metadata["id"].tolist()]
        self.row_of: dict[str, int] = {i: r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "Index":
        import pandas as pd

        p = Path(path)
        mf = p / "manifest.json"
        if not mf.is_file():
            raise DataError(f"{p}: not an index (no manifest.json); build one with `hci-atr index --out {p}`")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mf}: not valid JSON ({e}); rebuild the index") from None
        if manifest.get("format") != INDEX_FORMAT or manifest.get("version") not in READABLE_VERSIONS:
            readable = ", ".join(f"v{v}" for v in READABLE_VERSIONS)
            raise DataError(f"{mf}: format {manifest.get('format')} v{manifest.get('version')} is not "
                            f"{INDEX_FORMAT} {readable}; rebuild the index with this version (`hci-atr index`)")
        mode = "r" if mmap else None
        try:
            clip = np.load(p / "clip.npy", mmap_mode=mode)
            audio = {k: np.load(p / f, mmap_mode=mode) for k, f in manifest["files"].items()}
            caption_emb = np.load(p / "caption_emb.npy", mmap_mode=mode)
            metadata = pd.read_parquet(p / "metadata.parquet")
            captions = pd.read_parquet(p / "captions.parquet")
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: index files unreadable ({e}); rebuild the index") from None
        n = manifest["n_clips"]
        if clip.shape[0] != n or len(metadata) != n or any(a.shape[0] != n for a in audio.values()):
            raise DataError(f"{p}: index files disagree on the number of clips (manifest says {n}); rebuild it")
        return cls(p, manifest, clip, audio, metadata, captions, caption_emb)

    def files(self) -> list[Path]:
        """The index's array files (clip matrix, caption embeddings, every stored AudioEmbeddings field)."""
        return [self.path / "clip.npy", self.path / "caption_emb.npy",
                *(self.path / f for f in self.manifest["files"].values())]

    def warm(self) -> int:
        """Ask the OS to read every array file into the page cache now (``posix_fadvise(WILLNEED)``, which returns
        without waiting for the reads), so that early queries do not wait on the disk for reranked rows (50 random
        candidates: 20.8 ms with a tenth of the frames file uncached on the development VM, 2.0 ms fully cached). The
        cached pages are shared by every process mapping the files (all replicas on a node). Returns the bytes
        advised; 0 where the OS lacks the call.
        """
        if not hasattr(os, "posix_fadvise"):
            return 0
        total = 0
        for f in self.files():
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                total += os.fstat(fd).st_size
            except OSError:
                pass
            finally:
                os.close(fd)
        return total

    def audio_embeddings(self, rows: Sequence[int] | np.ndarray, device: str = "cpu") -> Any:
        """The model's AudioEmbeddings for the given rows (batch axis in the given order)."""
        rows = np.asarray(rows, dtype=np.int64)
        selected = {k: _computed(a[rows]) for k, a in self.audio.items()}
        return unflatten_outputs(self.manifest["structure"], selected, device)

    def meta(self, row: int) -> dict:
        r = self.metadata.iloc[int(row)]
        gen = r["generated_caption"]
        dur = float(r["duration"])
        return {
            "id": str(r["id"]), "duration": None if np.isnan(dur) else dur, "split": str(r["split"]),
            "captions": [str(c) for c in (r["captions"] if r["captions"] is not None else [])],
            "generated_caption": None if gen is None or (isinstance(gen, float) and np.isnan(gen)) else str(gen),
        }
