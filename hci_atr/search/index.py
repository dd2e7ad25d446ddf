"""The search index: an embedded audio collection on disk, bound to the model that embedded it.

Layout of an index folder ``DIR`` (what ``hci-atr index --out DIR`` writes and ``Index.load(DIR)`` reads)::

    DIR/
      CURRENT              the name of the version folder in use (one line), replaced atomically
      v-<time>-<random>/   one complete index version (below); the current one and the one before it are kept, so
                           a server still reading the previous version keeps working until it reloads
      .lock                held while a writer works in DIR (a second writer is refused)

    DIR/v-.../
      manifest.json        format + version, N, D, C, array shapes, the model's config and weights hash, unit_dtype
      clip.npy             float32 [N, D]   clip-level embeddings, L2-normalised (the first, exact-scan stage)
      audio/<field>.npy    the model's AudioEmbeddings for all N clips, one file per field (clip, segments [N, S, D],
                           segment_mask [N, S], frames [N, T', D], frame_mask [N, T'], and aux_sentence [N, D] +
                           aux_mask [N] when AC is on); unit-level tensors (segments, frames) in ``unit_dtype``
                           (float16 by default), per-clip vectors float32, masks bool; read back as float32
      metadata.parquet     one row per clip: id, path, duration, split, captions (list<string>), generated_caption
      captions.parquet     one row per caption text: caption_idx, audio_id, text, source ("reference"|"generated")
      caption_emb.npy      float32 [C, D]   sentence embeddings of captions.parquet's texts, L2-normalised

A version folder is a complete index by itself, and so is an index folder of the older unversioned layout (the same
files directly in ``DIR``, no ``CURRENT``): :meth:`Index.load` reads both. A new version is written into a temporary
folder inside ``DIR``, renamed to its ``v-...`` name when complete, and only then named in ``CURRENT`` (so a reader
never sees a half-written index and there is no moment without one); older versions are removed after that.
:func:`current_version` reads ``CURRENT`` alone, the cheap test a long-running server uses to see a new version.

Every array is a plain ``.npy`` file opened memory-mapped: a loaded index costs RAM for the clip matrix, the metadata
and the rows a query touches. Loading checks the arrays against the manifest's shapes, the caption embeddings against
captions.parquet, and the clip matrix for NaN/Inf. The manifest records :func:`weights_hash` of the model, so a
retriever can refuse an index that another model built. Format versions: 2 (this one) added ``unit_dtype``;
version-1 indexes (all float32) load unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hci_atr.errors import ConfigError, DataError
from hci_atr.files import atomic_write_text, check_replaceable, fsync_path, replace_dir
from hci_atr.search.embed import (AUDIO_FIELDS, REQUIRED_FIELDS, audio_arrays, audio_embeddings, embed_texts,
                                  l2_normalize, model_config)
from hci_atr.search.items import IndexItem

INDEX_FORMAT = "hci-atr-index"
INDEX_VERSION = 2
READABLE_VERSIONS = (1, 2)
UNIT_DTYPES = ("float16", "float32")
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
KEEP_VERSIONS = 2  # the current version and the one before it (a server may still be reading it)
_VERSION_RE = re.compile(r"^v-[0-9A-Za-z_-]+$")
# the files of an index version, which an unversioned (older) index folder holds directly
_VERSION_ENTRIES = (MANIFEST_FILE, "clip.npy", "caption_emb.npy", "metadata.parquet", "captions.parquet", "audio")
_FINITE_CHUNK = 1 << 16  # rows per NaN/Inf check (bounded memory on a large clip matrix)


def weights_hash(model: Any) -> str:
    """``"sha256:<hex>"`` over the model's ``state_dict`` (names, dtypes, shapes and bytes, keys sorted): which
    weights embedded an index. Equal for a model and the same model saved and loaded back."""
    import torch

    h = hashlib.sha256()
    state = model.state_dict()
    for k in sorted(state):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            h.update(f"{k}\0{v!r}\0".encode())
            continue
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}\0{t.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return f"sha256:{h.hexdigest()}"


# ---------------------------------------------------------------------------------------------------------------
# the index folder: pointer, versions, ownership
# ---------------------------------------------------------------------------------------------------------------


def _read_current(root: Path) -> str | None:
    """The version ``root/CURRENT`` names, or None when there is no CURRENT."""
    try:
        name = (root / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{root / CURRENT_FILE}: unreadable ({e}); rebuild the index with `hci-atr index --out "
                        f"{root}`") from None
    if not _VERSION_RE.match(name):
        raise DataError(f"{root / CURRENT_FILE}: does not name an index version ({name[:60]!r}); rebuild the index "
                        f"with `hci-atr index --out {root}`")
    return name


def current_version(path: str | os.PathLike) -> str | None:
    """The index version ``path`` serves now: the name in its ``CURRENT`` file, ``""`` for an index folder of the
    unversioned layout, ``None`` when ``path`` holds no index. Reads one small file: cheap enough to poll."""
    p = Path(path)
    try:
        name = _read_current(p)
    except DataError:
        return None
    if name is not None:
        return name
    return "" if (p / MANIFEST_FILE).is_file() else None


def _resolve(path: Path) -> tuple[Path, str]:
    """(folder holding the current version's files, version name) of an index folder."""
    name = None
    for _ in range(3):  # a writer may have moved CURRENT on and pruned the version between our reads
        name = _read_current(path)
        if name is None:
            if (path / MANIFEST_FILE).is_file():
                return path, ""
            raise DataError(f"{path}: not an index (no {CURRENT_FILE} or {MANIFEST_FILE}); build one with "
                            f"`hci-atr index --out {path}`")
        if (path / name / MANIFEST_FILE).is_file():
            return path / name, name
    raise DataError(f"{path / CURRENT_FILE}: names version {name}, which is missing; rebuild the index with "
                    f"`hci-atr index --out {path}`")


def is_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an index folder whose current version is on disk (the serving health check)."""
    try:
        _resolve(Path(path))
    except DataError:
        return False
    return True


def _is_internal(name: str) -> bool:
    """A writer's own entry in an index folder: the lock, or a killed run's temporary version folder."""
    return name == LOCK_FILE or (name.startswith(".v-") and name.endswith(".tmp"))


def _owns(path: Path) -> bool:
    """Whether ``path`` is an index folder (so a writer may add a version to it and prune old ones)."""
    if (path / CURRENT_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return True
    return all(_is_internal(e.name) for e in path.iterdir())


def check_index_out(out: str | os.PathLike) -> None:
    """Refuse an output folder that exists, is not empty and is not an index (one line naming it; nothing is
    touched), so ``--out`` pointed at the wrong folder fails before any work."""
    check_replaceable(out, _owns, "an hci-atr index")


def _new_version() -> str:
    return f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------


def _stored(arr: np.ndarray, unit_dtype: str) -> np.ndarray:
    """How an AudioEmbeddings array is stored: unit-level float tensors (3+ axes) in ``unit_dtype``, other float
    arrays float32, everything else (masks) as it is."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        return np.ascontiguousarray(arr, dtype=unit_dtype if arr.ndim >= 3 else np.float32)
    return np.ascontiguousarray(arr)


def _check_unit_dtype(unit_dtype: str) -> str:
    if unit_dtype not in UNIT_DTYPES:
        raise ConfigError(f"index unit dtype {unit_dtype!r} is not one of {', '.join(UNIT_DTYPES)}; set "
                          "serve.index_unit_dtype to float16 or float32")
    return unit_dtype


def _wave_duration(path: str) -> float:
    try:
        import soundfile as sf

        info = sf.info(path)
        return float(info.frames) / float(info.samplerate)
    except Exception:  # noqa: BLE001 - an unreadable header only loses the duration column's value
        return float("nan")


def _durations(items: Sequence[IndexItem]) -> list[float]:
    """Seconds of each item's file (NaN when unreadable); a path shared by several items is read once."""
    seen: dict[str, float] = {}
    for it in items:
        if it.audio_path not in seen:
            seen[it.audio_path] = _wave_duration(it.audio_path)
    return [seen[it.audio_path] for it in items]


def _lock(root: Path):
    """Take ``root/.lock`` without waiting; a second writer gets a one-line error."""
    from filelock import FileLock, Timeout

    for _ in range(3):
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
            return lock
        except Timeout:
            raise DataError(f"{root}: another run is writing this index; wait for it or use another --out") from None
        except FileNotFoundError:  # the folder was removed under us by a writer that gave up: make it again
            continue
    raise DataError(f"{root}: could not lock the index folder; is it being removed?")


class IndexWriter:
    """Write a new version of an index folder batch by batch, in bounded memory, then switch to it atomically.

    Each :meth:`add` stores one batch of embedded clips as chunk files in a temporary folder inside ``out``;
    :meth:`close` joins the chunks into the final memory-mappable ``.npy`` files (zero-padding unit axes to the
    largest batch, as :func:`~hci_atr.search.embed.stack_padded` does), embeds the caption texts (each distinct text
    once), renames the folder to its version name, points ``CURRENT`` at it and removes versions older than the
    previous one. Memory: one batch, the clip matrix [N, D], the items and caption texts. The folder is locked from
    construction to close (a second writer is refused), and a non-empty ``out`` that is not an index is refused at
    construction. Used as a context manager, an exception discards the partial version (nothing at ``out``
    changes)::

        with IndexWriter(out, model) as w:
            for arrays, items in batches:
                w.add(arrays, items)      # arrays: audio_arrays(model.encode_audio(...)), or the AudioEmbeddings
        # closed on a clean exit; w.version is the new version's name
    """

    def __init__(self, out_dir: str | os.PathLike, model: Any, model_dir: str | None = None,
                 extra: dict | None = None, device: str = "cpu", unit_dtype: str = "float16"):
        self.unit_dtype = _check_unit_dtype(unit_dtype)
        self.out = Path(out_dir)
        check_index_out(self.out)
        self.model = model
        self.cfg = model_config(model)
        self.model_dir = model_dir
        self.extra = dict(extra or {})
        self.device = device
        self.weights_hash = weights_hash(model)
        self.fields: list[str] | None = None
        self.items: list[IndexItem] = []
        self._clip: list[np.ndarray] = []
        self._chunks: dict[str, list[Path]] = {}
        self.path: Path | None = None
        self.version = _new_version()
        self._created = not self.out.exists()
        self._lock = _lock(self.out)
        try:
            for e in self.out.iterdir():  # a killed run's temporary folders (we hold the lock: nobody writes them)
                if e.name != LOCK_FILE and _is_internal(e.name):
                    shutil.rmtree(e, ignore_errors=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.version}.", suffix=".tmp", dir=self.out))
            (self.tmp / "chunks").mkdir()
        except BaseException:
            self._release()
            raise

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

    def add(self, arrays: Mapping[str, np.ndarray] | Any, items: Sequence[IndexItem]) -> None:
        """One batch: the AudioEmbeddings of ``items`` (same order), as :func:`~hci_atr.search.embed.audio_arrays`
        or the dataclass itself."""
        if not isinstance(arrays, Mapping):
            arrays = audio_arrays(arrays)
        b = len(items)
        if b == 0:
            return
        names = sorted(arrays)
        unknown = [k for k in names if k not in AUDIO_FIELDS]
        missing = [k for k in REQUIRED_FIELDS if k not in arrays]
        if unknown or missing:
            raise DataError(f"{self.out}: a batch's embeddings are not AudioEmbeddings fields (unknown {unknown}, "
                            f"missing {missing})")
        if self.fields is None:
            self.fields = names
        elif names != self.fields:
            raise DataError(f"{self.out}: a batch's embeddings have a different structure (fields {names}) than the "
                            f"first batch's ({self.fields}); embed the whole collection with one model")
        bad = [k for k, v in arrays.items() if np.shape(v)[0] != b]
        if bad:
            raise DataError(f"{self.out}: embeddings {bad} do not have one row per clip of the batch ({b})")
        self._clip.append(l2_normalize(arrays["clip"]))
        for name in names:
            path = self.tmp / "chunks" / f"{name}.{len(self._chunks.get(name, [])):07d}.npy"
            np.save(path, _stored(arrays[name], self.unit_dtype))
            self._chunks.setdefault(name, []).append(path)
        self.items.extend(items)

    def _join(self, chunks: list[Path], dest: Path) -> None:
        if len(chunks) == 1:
            os.replace(chunks[0], dest)
            return
        parts = [np.load(c, mmap_mode="r") for c in chunks]
        target = tuple(max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim))
        # a new file reads as zeros, so the padding of a smaller chunk is zeros (= masked out, as stack_padded)
        out = np.lib.format.open_memmap(dest, mode="w+", dtype=parts[0].dtype, shape=(len(self.items), *target))
        r = 0
        for p in parts:
            out[(slice(r, r + p.shape[0]),) + tuple(slice(0, s) for s in p.shape[1:])] = p
            r += p.shape[0]
        out.flush()
        del out, parts

    def _caption_table(self) -> dict[str, list]:
        rows: dict[str, list] = {"audio_id": [], "text": [], "source": []}
        for it in self.items:
            for c in it.captions:
                rows["audio_id"].append(it.audio_id), rows["text"].append(c), rows["source"].append("reference")
            if it.generated_caption:
                rows["audio_id"].append(it.audio_id), rows["text"].append(it.generated_caption)
                rows["source"].append("generated")
        rows["caption_idx"] = list(range(len(rows["text"])))
        return rows

    def close(self) -> Path:
        """Finish the new version, switch ``CURRENT`` to it and prune old versions; returns the index folder."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            n = len(self.items)
            if n == 0 or self.fields is None:
                raise DataError(f"{self.out}: nothing to index (no clip was added)")
            clip = np.concatenate(self._clip, axis=0).astype(np.float32)
            self._clip = []
            items = self.items
            cap_rows = self._caption_table()
            if cap_rows["text"]:  # each distinct text once (references and generated captions repeat)
                distinct, inverse = np.unique(np.asarray(cap_rows["text"], dtype=object), return_inverse=True)
                cap_emb = embed_texts(self.model, [str(t) for t in distinct], device=self.device)[inverse]
            else:
                cap_emb = np.zeros((0, clip.shape[1]), dtype=np.float32)
            tmp = self.tmp
            np.save(tmp / "clip.npy", clip)
            np.save(tmp / "caption_emb.npy", cap_emb.astype(np.float32))
            (tmp / "audio").mkdir()
            files = {}
            for name in self.fields:
                files[name] = f"audio/{name}.npy"
                self._join(self._chunks[name], tmp / files[name])
            shutil.rmtree(tmp / "chunks", ignore_errors=True)
            pq.write_table(pa.table({
                "id": pa.array([it.audio_id for it in items], pa.string()),
                "path": pa.array([it.audio_path for it in items], pa.string()),
                "duration": pa.array(_durations(items), pa.float32()),
                "split": pa.array([it.split for it in items], pa.string()),
                "captions": pa.array([list(it.captions) for it in items], pa.list_(pa.string())),
                "generated_caption": pa.array([it.generated_caption for it in items], pa.string()),
            }), tmp / "metadata.parquet")
            pq.write_table(pa.table({
                "caption_idx": pa.array(cap_rows["caption_idx"], pa.int64()),
                "audio_id": pa.array(cap_rows["audio_id"], pa.string()),
                "text": pa.array(cap_rows["text"], pa.string()),
                "source": pa.array(cap_rows["source"], pa.string()),
            }), tmp / "captions.parquet")
            shapes = {f: list(np.load(tmp / f, mmap_mode="r").shape)
                      for f in ("clip.npy", "caption_emb.npy", *files.values())}
            manifest = {
                "format": INDEX_FORMAT, "version": INDEX_VERSION, "n_clips": n, "embed_dim": int(clip.shape[1]),
                "n_captions": len(cap_rows["text"]), "files": files, "shapes": shapes, "unit_dtype": self.unit_dtype,
                "weights_hash": self.weights_hash, "model_dir": str(self.model_dir) if self.model_dir else None,
                "config": self.cfg.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "index_version": self.version, **self.extra,
            }
            atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1))
            replace_dir(tmp, self.out / self.version)
            self._publish()
            self.path = self.out
            return self.out
        except BaseException:
            self.abort()
            raise
        finally:
            self._release()

    def _publish(self) -> None:
        """Point CURRENT at the new version, then remove all but it and the version it replaces."""
        previous = current_version(self.out)
        atomic_write_text(self.out / CURRENT_FILE, self.version + "\n")
        keep = {self.version, previous}
        for e in self.out.iterdir():
            if e.is_dir() and _VERSION_RE.match(e.name) and e.name not in keep:
                shutil.rmtree(e, ignore_errors=True)
        if "" not in keep:  # an unversioned index's files, replaced two versions ago
            for name in _VERSION_ENTRIES:
                e = self.out / name
                if e.is_dir():
                    shutil.rmtree(e, ignore_errors=True)
                elif e.exists():
                    e.unlink()
        fsync_path(self.out)

    def abort(self) -> None:
        """Discard the partial version (nothing at ``out`` changes; an ``out`` this writer created is removed)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None and self._created:
            try:
                if all(e.name == LOCK_FILE for e in self.out.iterdir()):
                    (self.out / LOCK_FILE).unlink(missing_ok=True)
                    self.out.rmdir()
            except OSError:
                pass
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def write_index(out_dir: str | os.PathLike, model: Any, arrays: Mapping[str, np.ndarray],
                items: Sequence[IndexItem], model_dir: str | None = None, extra: dict | None = None,
                device: str = "cpu", unit_dtype: str = "float16") -> Path:
    """Write a new version of the index at ``out_dir`` in one batch (see :class:`IndexWriter`); returns ``out_dir``.

    ``arrays``: the AudioEmbeddings arrays of ``items`` in the same row order (:func:`~hci_atr.search.embed.
    embed_items`). Caption sentence embeddings (references + generated) are computed here with ``model``.
    """
    out = Path(out_dir)
    n = len(items)
    if n == 0 or "clip" not in arrays or np.shape(arrays["clip"])[0] != n:
        raise DataError(f"{out}: nothing to index (or embeddings do not match the {n} clips)")
    with IndexWriter(out, model, model_dir=model_dir, extra=extra, device=device, unit_dtype=unit_dtype) as w:
        w.add(arrays, items)
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------


def _computed(arr: np.ndarray) -> np.ndarray:
    """Stored rows -> what the model computes with (float16 unit tensors back to float32)."""
    arr = np.asarray(arr)
    return arr.astype(np.float32) if arr.dtype == np.float16 else arr


def _rebuild(p: Path, why: str) -> DataError:
    return DataError(f"{p}: {why}; rebuild the index (`hci-atr index --model <dir> --out ...`)")


def _check_finite(path: Path, arr: np.ndarray) -> None:
    for s in range(0, arr.shape[0], _FINITE_CHUNK):
        if not np.isfinite(arr[s:s + _FINITE_CHUNK]).all():
            raise _rebuild(path, f"contains NaN or Inf values (in rows {s}..{min(s + _FINITE_CHUNK, arr.shape[0])})")


@dataclass(frozen=True)
class ClipMeta:
    """One indexed clip's metadata row."""

    id: str
    path: str
    duration: float | None
    split: str
    captions: list[str] = field(default_factory=list)
    generated_caption: str | None = None


class Index:
    """A loaded index version (arrays memory-mapped, so opening a large index is cheap).

    ``path``: the folder holding this version's files; ``root``: the index folder it was loaded from; ``version``:
    the version name (``""`` for an unversioned index folder), to compare with :func:`current_version` of ``root``.
    """

    def __init__(self, path: Path, manifest: dict, clip: np.ndarray, audio: dict[str, np.ndarray], metadata,
                 captions, caption_emb: np.ndarray, root: Path | None = None, version: str = ""):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path
        self.version = version
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

    @property
    def weights_hash(self) -> str | None:
        """:func:`weights_hash` of the model that built the index (None for an index written before it was kept)."""
        return self.manifest.get("weights_hash")

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> "Index":
        """Load the current version of an index folder (or a version folder, or an unversioned index folder)."""
        root = Path(path)
        vdir, version = _resolve(root)
        return cls._load_version(vdir, root, version, mmap)

    @classmethod
    def _load_version(cls, p: Path, root: Path, version: str, mmap: bool) -> "Index":
        import pandas as pd

        mf = p / MANIFEST_FILE
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mf}: not valid JSON ({e}); rebuild the index") from None
        if manifest.get("format") != INDEX_FORMAT or manifest.get("version") not in READABLE_VERSIONS:
            readable = ", ".join(f"v{v}" for v in READABLE_VERSIONS)
            raise DataError(f"{mf}: format {manifest.get('format')} v{manifest.get('version')} is not "
                            f"{INDEX_FORMAT} {readable}; rebuild the index with this version (`hci-atr index`)")
        files = manifest.get("files") or {}
        unknown = [k for k in files if k not in AUDIO_FIELDS]
        missing = [k for k in REQUIRED_FIELDS if k not in files]
        if unknown or missing:
            raise _rebuild(mf, f"stores audio fields {sorted(files)}, not this version's AudioEmbeddings (unknown "
                               f"{unknown}, missing {missing})")
        bad = [f for f in files.values() if not isinstance(f, str) or os.path.isabs(f) or ".." in Path(f).parts]
        if bad:
            raise _rebuild(mf, f"names files outside the index ({bad[0]!r})")
        mode = "r" if mmap else None
        try:
            clip = np.load(p / "clip.npy", mmap_mode=mode)
            audio = {k: np.load(p / f, mmap_mode=mode) for k, f in files.items()}
            caption_emb = np.load(p / "caption_emb.npy", mmap_mode=mode)
            metadata = pd.read_parquet(p / "metadata.parquet")
            captions = pd.read_parquet(p / "captions.parquet")
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: index files unreadable ({e}); rebuild the index") from None
        arrays = {"clip.npy": clip, "caption_emb.npy": caption_emb, **{files[k]: a for k, a in audio.items()}}
        for f, shape in (manifest.get("shapes") or {}).items():
            if f in arrays and tuple(arrays[f].shape) != tuple(shape):
                raise _rebuild(p / f, f"has shape {tuple(arrays[f].shape)}, the manifest says {tuple(shape)}")
        n = manifest["n_clips"]
        if clip.shape[0] != n or len(metadata) != n or any(a.shape[0] != n for a in audio.values()):
            raise DataError(f"{p}: index files disagree on the number of clips (manifest says {n}); rebuild it")
        if clip.ndim != 2 or clip.shape[1] != manifest["embed_dim"]:
            raise _rebuild(p / "clip.npy", f"has shape {clip.shape}, not [{n}, {manifest['embed_dim']}]")
        if caption_emb.shape[0] != len(captions) or (len(captions) and caption_emb.shape[1] != clip.shape[1]):
            raise _rebuild(p / "caption_emb.npy", f"has {caption_emb.shape[0]} rows of {caption_emb.shape[1:]} for "
                                                  f"{len(captions)} captions in captions.parquet")
        _check_finite(p / "clip.npy", clip)
        _check_finite(p / "caption_emb.npy", caption_emb)
        return cls(p, manifest, clip, audio, metadata, captions, caption_emb, root=root, version=version)

    def files(self) -> list[Path]:
        """The index's array files (clip matrix, caption embeddings, every stored AudioEmbeddings field)."""
        return [self.path / "clip.npy", self.path / "caption_emb.npy",
                *(self.path / f for f in self.manifest["files"].values())]

    def warm(self) -> int:
        """Ask the OS to read every array file into the page cache now (``posix_fadvise(WILLNEED)``, which returns
        without waiting for the reads), so that early queries do not wait on the disk for reranked rows. The cached
        pages are shared by every process mapping the files (all replicas on a node). Returns the bytes advised; 0
        where the OS lacks the call.
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
        return audio_embeddings({k: _computed(a[rows]) for k, a in self.audio.items()}, device)

    def meta(self, row: int) -> ClipMeta:
        r = self.metadata.iloc[int(row)]
        gen = r["generated_caption"]
        dur = float(r["duration"])
        return ClipMeta(
            id=str(r["id"]), path=str(r["path"]), duration=None if np.isnan(dur) else dur, split=str(r["split"]),
            captions=[str(c) for c in (r["captions"] if r["captions"] is not None else [])],
            generated_caption=None if gen is None or (isinstance(gen, float) and np.isnan(gen)) else str(gen))
