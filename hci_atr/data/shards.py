"""The parquet contracts between the pipelines and their readers, and the readers.

``extract-features`` writes feature shards (:data:`FEATURE_SCHEMA`), ``caption-all`` writes generated captions
(:data:`CAPTION_SCHEMA`); training, evaluation, indexing and the ``nearest`` captioner read them back through these
functions only. Each output directory holds ``part-*.parquet`` files and, when finished, a ``_SUCCESS`` manifest
(JSON) that records what produced it (e.g. the audio front end). docs/architecture.md spells out the columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hci_atr.errors import DataError, one_line

SUCCESS_FILE = "_SUCCESS"

FEATURE_SCHEMA = pa.schema([
    ("audio_id", pa.string()),
    ("split", pa.string()),
    ("audio_path", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("duration", pa.float32()),
    ("n_frames", pa.int32()),
    ("n_mels", pa.int32()),
    ("mel", pa.list_(pa.float32())),  # row-major [n_frames, n_mels], flattened
])
FEATURE_COLUMNS = ("audio_id", "split", "captions", "n_frames", "n_mels", "mel")  # what a reader needs
BANK_COLUMNS = ["audio_id", "split", "audio_path", "captions", "n_frames", "n_mels", "mel"]  # the nearest bank's

CAPTION_SCHEMA = pa.schema([
    ("audio_id", pa.string()),
    ("generated_caption", pa.string()),
    ("captioner", pa.string()),
    ("model", pa.string()),
    ("params", pa.string()),  # JSON
    ("seconds", pa.float32()),
    ("confidence", pa.float32()),  # the captioner's own trust in the caption; NaN: none (hci_atr.captioners.base)
])


# -- manifests ----------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The ``_SUCCESS`` manifest of a finished output directory, or None (unfinished, foreign or unreadable)."""
    try:
        doc = json.loads((Path(path) / SUCCESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def audio_config_dict(audio_cfg) -> dict:
    """An audio config as the plain dict a feature manifest stores (``dataclasses.asdict`` through JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(audio_cfg)))


def features_audio_config(path: str | os.PathLike) -> dict | None:
    """The audio front end a feature directory was written with (its manifest's ``audio``), or None when the
    directory has no readable manifest."""
    audio = (read_manifest(path) or {}).get("audio")
    return audio if isinstance(audio, dict) else None


# -- feature shards -----------------------------------------------------------------------------------------------


def feature_files(features_dir: str | os.PathLike) -> list[str]:
    """The feature shard files (``part-*.parquet``, sorted) of an ``extract-features`` output directory, each checked
    (footer and columns) so a wrong or broken directory fails here in one line, not deep inside a reader."""
    import pyarrow.parquet as pq

    root = Path(features_dir)
    if not root.is_dir():
        raise DataError(f"{root}: features directory not found; run `hci-atr extract-features --out {root}` first")
    files = sorted(str(p.resolve()) for p in root.glob("part-*.parquet"))
    if not files:
        raise DataError(f"{root}: no part-*.parquet feature shards; run `hci-atr extract-features --out {root}`")
    for f in files:
        try:
            names = set(pq.read_schema(f).names)
        except Exception as e:  # ArrowInvalid / OSError for a truncated or non-parquet file
            raise DataError(f"{f}: not a readable parquet file ({one_line(e)[:120]}); re-run "
                            f"`hci-atr extract-features --out {root}`") from None
        missing = [c for c in FEATURE_COLUMNS if c not in names]
        if missing:
            raise DataError(f"{f}: missing column(s) {', '.join(missing)}; this is not an extract-features output "
                            f"directory (pass the --out of `hci-atr extract-features`)")
    return files


def table_to_rows(table) -> list[dict[str, Any]]:
    """A feature table (pyarrow) -> rows for ``make_batch``: plain dicts, ``mel`` as float32 ``[n_frames * n_mels]``
    numpy views (no per-float Python objects), ``generated_caption`` str or None."""
    cols = table.column_names
    n = table.num_rows
    mel = table.column("mel").combine_chunks() if n else pa.array([], pa.list_(pa.float32()))
    values = mel.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = mel.offsets.to_numpy()
    plain = {c: table.column(c).to_pylist() for c in cols if c != "mel"}
    rows = []
    for i in range(n):
        row = {c: plain[c][i] for c in plain}
        row["mel"] = values[offsets[i]:offsets[i + 1]]
        row.setdefault("generated_caption", None)
        rows.append(row)
    return rows


def read_split_rows(features_dir: str | os.PathLike, split: str,
                    captions: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All rows of one split (validation / test sets: small enough for one process), sorted by audio_id, with
    ``generated_caption`` joined from ``captions``."""
    import pyarrow.parquet as pq

    table = pq.read_table(feature_files(features_dir), filters=[("split", "==", split)])
    rows = table_to_rows(table)
    for r in rows:
        r["generated_caption"] = (captions or {}).get(r["audio_id"])
    rows.sort(key=lambda r: r["audio_id"])
    return rows


def split_counts(features_dir: str | os.PathLike) -> dict[str, int]:
    """Rows per split of a feature directory."""
    import pyarrow.parquet as pq

    t = pq.read_table(feature_files(features_dir), columns=["split"])
    vals, counts = np.unique(np.asarray(t.column("split").to_pylist(), dtype=object).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(vals, counts)}


def row_mel(row: dict) -> np.ndarray:
    """A feature row's ``mel`` as ``[n_frames, n_mels]`` float32; a row whose size does not match is a DataError."""
    t, m = int(row["n_frames"]), int(row["n_mels"])
    mel = np.asarray(row["mel"], dtype=np.float32)
    if mel.size != t * m or t < 1:
        raise DataError(f"audio_id {row.get('audio_id')}: mel has {mel.size} values, expected n_frames*n_mels = "
                        f"{t}*{m}; re-run `hci-atr extract-features`")
    return mel.reshape(t, m)


def bank_rows(cols: dict[str, list], split: str) -> tuple[list[str], list[str], list[list[str]], list[np.ndarray]]:
    """The ``split`` rows of feature-shard columns that have a caption: (audio_ids, audio_paths, captions,
    mel [T, M] each). A training clip without captions cannot lend one, so it is left out."""
    ids, paths, caps, mels = [], [], [], []
    for r in range(len(cols["audio_id"])):
        if str(cols["split"][r]) != split:
            continue
        c = [str(x) for x in (cols["captions"][r] or []) if x and str(x).strip()]
        if not c:
            continue
        row = {k: cols[k][r] for k in ("audio_id", "n_frames", "n_mels", "mel")}
        mels.append(row_mel(row))
        ids.append(str(cols["audio_id"][r]))
        paths.append(str(cols["audio_path"][r] or ""))
        caps.append(c)
    return ids, paths, caps, mels


def read_bank(path: str | os.PathLike, split: str) -> tuple[list[str], list[str], list[list[str]], list[np.ndarray]]:
    """The captioned ``split`` rows of a feature directory (see :func:`bank_rows`)."""
    import pyarrow.dataset as pds

    path = Path(path)
    if not path.exists():
        raise DataError(f"features directory {path} not found; run `hci-atr extract-features` first or pass "
                        f"features=<dir>")
    try:
        ds = pds.dataset(str(path), format="parquet")
        missing = [c for c in BANK_COLUMNS if c not in ds.schema.names]
        if missing:
            raise DataError(f"features in {path} lack column(s) {', '.join(missing)}; re-run `hci-atr extract-features`")
        table = ds.to_table(columns=BANK_COLUMNS, filter=pds.field("split") == split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"cannot read features in {path} ({one_line(e)})") from None
    if table.num_rows == 0:
        raise DataError(f"features in {path} have no rows with split '{split}'; extract features for the training "
                        f"split or set split=<name>")
    try:
        ids, paths, caps, mels = bank_rows(table.to_pydict(), split)
    except DataError as e:
        raise DataError(f"features in {path}, {e}") from None
    if not ids:
        raise DataError(f"no '{split}' row in {path} has a caption")
    return ids, paths, caps, mels


# -- generated captions -------------------------------------------------------------------------------------------


def read_captions(captions_dir: str | os.PathLike | None, min_confidence: float | None = None) -> dict[str, str]:
    """audio_id -> generated caption from a ``caption-all`` output directory (or one parquet file of it);
    {} when ``captions_dir`` is None. Empty captions are left out (the clip then has AC masked out), and so are
    captions whose captioner ``confidence`` is below ``min_confidence`` (``model.ac_min_confidence``): a poor
    caption is ignored rather than trusted. A caption without a confidence (NaN, or shards written before the
    column) is kept."""
    if not captions_dir:
        return {}
    import pyarrow.parquet as pq

    root = Path(captions_dir)
    if not root.exists():
        raise DataError(f"{root}: captions folder not found; run `hci-atr caption-all --out {root}` first or leave "
                        f"out --captions")
    files = sorted(root.glob("part-*.parquet")) if root.is_dir() else [root]
    if not files:
        raise DataError(f"{root}: no part-*.parquet caption shards; run `hci-atr caption-all --out {root}` first")
    out: dict[str, str] = {}
    for f in files:
        try:
            names = pq.read_schema(f).names
            cols = ["audio_id", "generated_caption"] + (["confidence"] if "confidence" in names else [])
            t = pq.read_table(f, columns=cols)
        except (KeyError, ValueError, pa.ArrowInvalid) as e:
            if "generated_caption" in str(e) or "audio_id" in str(e) or isinstance(e, KeyError):
                raise DataError(f"{f}: missing column 'audio_id' or 'generated_caption' (expected the caption-all "
                                f"schema)") from None
            raise DataError(f"{f}: not a readable parquet file ({one_line(e)[:120]})") from None
        except OSError as e:
            raise DataError(f"{f}: not a readable parquet file ({one_line(e)[:120]})") from None
        conf = t.column("confidence").to_pylist() if "confidence" in t.column_names else [None] * t.num_rows
        for aid, cap, c in zip(t.column("audio_id").to_pylist(), t.column("generated_caption").to_pylist(), conf):
            if aid is not None and cap and trusted(c, min_confidence):
                out[aid] = cap
    return out


def trusted(confidence: float | None, min_confidence: float | None) -> bool:
    """Whether a generated caption with ``confidence`` passes ``model.ac_min_confidence`` (None: every caption
    does; an unknown confidence, None or NaN, always does)."""
    if min_confidence is None or confidence is None or math.isnan(confidence):
        return True
    return confidence >= min_confidence


# -- front end agreement ------------------------------------------------------------------------------------------


def check_features_match(features_dir: str | os.PathLike, audio_cfg, who: str = "the model") -> None:
    """Refuse features written with another audio front end than ``audio_cfg`` (a model trained on PANNs-exact
    log-mels must never be fed HTK ones, or be trained on features of another sample rate). A directory without a
    manifest recording its front end (written before front ends were recorded) passes."""
    from hci_atr.errors import ConfigError

    have = features_audio_config(features_dir)
    if have is None:
        return
    want = audio_config_dict(audio_cfg)
    have = {"frontend": "htk", **have}  # manifests written before the front end was a named choice: htk
    changed = sorted(k for k in want if k != "duration" and have.get(k) != want[k])
    if changed:
        diff = ", ".join(f"{k} {have.get(k)!r} vs {want[k]!r}" for k in changed[:4])
        raise ConfigError(f"{features_dir}: features were extracted with another audio front end than {who} uses "
                          f"({diff}); re-run `hci-atr extract-features` with the same audio settings (e.g. the same "
                          f"--config) into a new --out")
