"""Dataset readers: Clotho v2, AudioCaps and a generic manifest, all turned into one :class:`Record` type.

Readers only parse text and check that audio files exist; they never decode audio, so reading a dataset of tens of
thousands of clips takes well under a second of parsing plus one directory listing per audio folder.

Clotho v2 (a folder)
    ``clotho_captions_development.csv``, ``clotho_captions_validation.csv``, ``clotho_captions_evaluation.csv`` with
    the header ``file_name,caption_1,...,caption_5``; audio under ``development/``, ``validation/``, ``evaluation/``
    (``<root>/<folder>/`` or ``<root>/audio/<folder>/``). The folders map to the splits ``train``, ``val``, ``test``.
    ``audio_id`` is the file name. With ``splits=None`` every caption CSV that exists is read (at least one must).

AudioCaps (a folder)
    ``train.csv``, ``val.csv``, ``test.csv`` with the columns ``audiocap_id,youtube_id,start_time,caption``: one
    caption per row, several rows per clip in val/test. Rows are grouped per ``(youtube_id, start_time)``;
    ``audio_id`` is the ``youtube_id`` (two clips with the same ``youtube_id`` but different start times are an error,
    because the audio files are named by ``youtube_id``). Audio is found, in this order:

    * an explicit ``audio_path`` or ``file_name`` column (relative paths resolve against the split's audio folder,
      then the dataset folder);
    * otherwise a file named ``Y<youtube_id>``, ``<youtube_id>`` or ``<youtube_id>_<start>`` (start as an integer,
      e.g. ``abc_30``, or as written in the CSV) with extension ``.wav``, ``.flac`` or ``.ogg``, looked for in
      ``<root>/<split>/``, ``<root>/audio/<split>/``, ``<root>/audio/`` and ``<root>/``.

    Video (optional): a ``video`` column, else ``<youtube_id>.mp4`` / ``Y<youtube_id>.mp4`` under
    ``<root>/videos/<split>/`` or ``<root>/videos/``. ``start_time`` goes to ``Record.start_time``.

Manifest (a ``.csv`` or ``.jsonl`` file, or a folder holding ``manifest.csv`` / ``manifest.jsonl``)
    Fields ``audio`` (path), ``caption`` (one string) or ``captions`` (a list in JSONL; ``|``-separated in CSV),
    optional ``split`` (default ``train``; ``development``/``validation``/``evaluation`` are accepted as aliases),
    optional ``video`` (path) and optional ``id`` (default: the audio file name without extension). Relative paths
    resolve against the manifest's folder.

Every problem raises :class:`~hci_atr.errors.DataError` naming the file, the row (1-based data row; the line number
for JSONL) and the field.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from hci_atr.errors import DataError

SPLITS = ("train", "val", "test")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
FORMATS = ("auto", "clotho", "audiocaps", "manifest")

# Clotho's folder names and their split names.
CLOTHO_SPLITS = {"train": "development", "val": "validation", "test": "evaluation"}
SPLIT_ALIASES = {
    "train": "train", "development": "train", "dev": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "evaluation": "test", "eval": "test",
}


@dataclass(frozen=True)
class Record:
    """One audio clip and its reference captions."""

    audio_id: str  # unique within a dataset
    audio_path: str  # absolute path
    split: str  # "train" | "val" | "test"
    captions: tuple[str, ...]  # >= 1 non-empty caption
    video_path: str | None = None
    start_time: float | None = None  # seconds into the video / source (AudioCaps)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def read_dataset(path: str | os.PathLike, format: str = "auto", splits: Iterable[str] | None = None) -> list[Record]:
    """Read a dataset folder or manifest file into records (ordered by split file, then by row).

    ``format``: ``auto`` (detect), ``clotho``, ``audiocaps`` or ``manifest``. ``splits``: keep only these splits
    (names from ``train``/``val``/``test``); ``None`` keeps all.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: dataset path not found; pass a Clotho/AudioCaps folder or a manifest .csv/.jsonl file")
    if format not in FORMATS:
        raise DataError(f"unknown dataset format '{format}' (choose one of: {', '.join(FORMATS)})")
    wanted = _check_splits(splits)
    fmt = detect_format(p) if format == "auto" else format
    if fmt == "clotho":
        return read_clotho(p, wanted)
    if fmt == "audiocaps":
        return read_audiocaps(p, wanted)
    return read_manifest(p, wanted)


def detect_format(path: str | os.PathLike) -> str:
    """``clotho`` | ``audiocaps`` | ``manifest`` for a dataset path, or DataError when nothing fits."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in (".csv", ".jsonl", ".json"):
            return "manifest"
        raise DataError(f"{p}: not a dataset file; a manifest must end in .csv or .jsonl")
    if any((p / f"clotho_captions_{name}.csv").is_file() for name in CLOTHO_SPLITS.values()):
        return "clotho"
    if any((p / f"{s}.csv").is_file() for s in SPLITS):
        return "audiocaps"
    if (p / "manifest.jsonl").is_file() or (p / "manifest.csv").is_file():
        return "manifest"
    raise DataError(
        f"{p}: cannot tell the dataset format; expected clotho_captions_*.csv (Clotho), train/val/test.csv "
        "(AudioCaps) or manifest.csv/manifest.jsonl"
    )


def _check_splits(splits: Iterable[str] | None) -> tuple[str, ...] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s.strip()]
    out = []
    for s in splits:
        name = SPLIT_ALIASES.get(str(s).strip().lower())
        if name is None:
            raise DataError(f"unknown split '{s}' requested (known: {', '.join(SPLITS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise DataError("no split requested; pass one or more of train, val, test")
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# text helpers
# ---------------------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """Whole file as text; non-UTF-8 bytes raise DataError with the line number."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 text (byte {e.start}); save the file as UTF-8") from None


def _csv_rows(path: Path, required: Iterable[str]) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header and ``(data_row_number, row)`` pairs; row numbers are 1-based and count data rows only."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file; expected a header row") from None
    except csv.Error as e:
        raise DataError(f"{path}: header: malformed CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        n = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}: row {n + 1}: malformed CSV ({e})") from None
            if not values or all(not v.strip() for v in values):
                continue  # blank lines are not rows
            n += 1
            if len(values) > len(header):
                raise DataError(f"{path}: row {n}: {len(values)} fields but the header has {len(header)}")
            values = values + [""] * (len(header) - len(values))
            yield n, dict(zip(header, values))

    return header, rows()


def _caption(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: caption must be text, got {type(value).__name__}")
    text = " ".join(value.split())
    if not text:
        raise DataError(f"{where}: empty caption; every caption must have text (remove the row or fill it in)")
    return text


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def _abs(p: Path) -> str:
    return os.path.abspath(p)


class _DirIndex:
    """Names of the files in a folder, listed once (a dataset of N clips needs one listing, not N stat calls)."""

    def __init__(self) -> None:
        self._cache: dict[Path, frozenset[str]] = {}

    def names(self, folder: Path) -> frozenset[str]:
        if folder not in self._cache:
            try:
                self._cache[folder] = frozenset(e.name for e in os.scandir(folder) if e.is_file())
            except (FileNotFoundError, NotADirectoryError):
                self._cache[folder] = frozenset()
        return self._cache[folder]

    def find(self, folders: Iterable[Path], names: Iterable[str]) -> Path | None:
        names = list(names)
        for folder in folders:
            listing = self.names(folder)
            for name in names:
                if name in listing:
                    return folder / name
        return None


# ---------------------------------------------------------------------------------------------------------------
# Clotho v2
# ---------------------------------------------------------------------------------------------------------------


def read_clotho(root: str | os.PathLike, splits: Iterable[str] | None = None) -> list[Record]:
    root = Path(root)
    wanted = _check_splits(splits)
    index = _DirIndex()
    records: list[Record] = []
    seen: dict[str, str] = {}
    found_any = False
    for split, folder in CLOTHO_SPLITS.items():
        if wanted is not None and split not in wanted:
            continue
        csv_path = root / f"clotho_captions_{folder}.csv"
        if not csv_path.is_file():
            if wanted is not None:
                raise DataError(f"{csv_path}: file not found (needed for split '{split}')")
            continue
        found_any = True
        caption_cols = [f"caption_{i}" for i in range(1, 6)]
        header, rows = _csv_rows(csv_path, ["file_name", *caption_cols])
        audio_dirs = [root / folder, root / "audio" / folder]
        for n, row in rows:
            name = row["file_name"].strip()
            if not name:
                raise DataError(f"{csv_path}: row {n}: field 'file_name' is empty")
            caps = tuple(_caption(row[c], f"{csv_path}: row {n}: field '{c}'") for c in caption_cols)
            where = f"{csv_path}: row {n}: field 'file_name'"
            if name in seen:
                raise DataError(f"{where}: duplicate id '{name}' (already listed in {seen[name]})")
            seen[name] = f"{csv_path.name} row {n}"
            audio = index.find(audio_dirs, [name])
            if audio is None:
                raise DataError(f"{where}: audio file '{name}' not found in {audio_dirs[0]} or {audio_dirs[1]}")
            records.append(Record(audio_id=name, audio_path=_abs(audio), split=split, captions=caps))
    if not found_any:
        raise DataError(f"{root}: no clotho_captions_{{development,validation,evaluation}}.csv found")
    return records


# ---------------------------------------------------------------------------------------------------------------
# AudioCaps
# ---------------------------------------------------------------------------------------------------------------


def _start_names(start: str, value: float) -> list[str]:
    """Spellings of a start time in file names: ``30`` for 30.0, and the CSV's own text."""
    names = []
    if float(value).is_integer():
        names.append(str(int(value)))
    if start not in names:
        names.append(start)
    return names


def read_audiocaps(root: str | os.PathLike, splits: Iterable[str] | None = None) -> list[Record]:
    root = Path(root)
    wanted = _check_splits(splits)
    index = _DirIndex()
    records: list[Record] = []
    clip_owner: dict[str, str] = {}  # youtube_id -> "file row n" (first row of its clip)
    caption_ids: dict[str, str] = {}
    found_any = False
    for split in SPLITS:
        if wanted is not None and split not in wanted:
            continue
        csv_path = root / f"{split}.csv"
        if not csv_path.is_file():
            if wanted is not None:
                raise DataError(f"{csv_path}: file not found (needed for split '{split}')")
            continue
        found_any = True
        header, rows = _csv_rows(csv_path, ["audiocap_id", "youtube_id", "start_time", "caption"])
        path_col = "audio_path" if "audio_path" in header else ("file_name" if "file_name" in header else None)
        # clips in first-seen order: key -> [first_row, youtube_id, start text, start, captions, audio, video]
        clips: dict[tuple[str, float], list] = {}
        for n, row in rows:
            where = f"{csv_path}: row {n}"
            cap_id = row["audiocap_id"].strip()
            if not cap_id:
                raise DataError(f"{where}: field 'audiocap_id' is empty")
            if cap_id in caption_ids:
                raise DataError(f"{where}: field 'audiocap_id': duplicate id '{cap_id}' "
                                f"(already in {caption_ids[cap_id]})")
            caption_ids[cap_id] = f"{csv_path.name} row {n}"
            yid = row["youtube_id"].strip()
            if not yid:
                raise DataError(f"{where}: field 'youtube_id' is empty")
            start_text = row["start_time"].strip()
            try:
                start = float(start_text)
            except ValueError:
                raise DataError(f"{where}: field 'start_time': '{start_text}' is not a number of seconds") from None
            caption = _caption(row["caption"], f"{where}: field 'caption'")
            key = (yid, start)
            if key not in clips:
                if yid in clip_owner:
                    raise DataError(f"{where}: field 'youtube_id': duplicate id '{yid}' (a different clip of the "
                                    f"same video is in {clip_owner[yid]}); audio files are named by youtube_id")
                clip_owner[yid] = f"{csv_path.name} row {n}"
                clips[key] = [n, yid, start_text, start, [],
                              row.get(path_col, "").strip() if path_col else "", row.get("video", "").strip()]
            clips[key][4].append(caption)

        audio_dirs = [root / split, root / "audio" / split, root / "audio", root]
        video_dirs = [root / "videos" / split, root / "videos"]
        for n, yid, start_text, start, caps, explicit, video in clips.values():
            where = f"{csv_path}: row {n}"
            if explicit:
                audio = None
                for base in (root / split, root / "audio" / split, root):
                    cand = _resolve(base, explicit)
                    if cand.is_file():
                        audio = cand
                        break
                if audio is None:
                    raise DataError(f"{where}: field '{path_col}': audio file '{explicit}' not found")
            else:
                stems = [f"Y{yid}", yid] + [f"{yid}_{s}" for s in _start_names(start_text, start)]
                audio = index.find(audio_dirs, [s + ext for s in stems for ext in AUDIO_EXTENSIONS])
                if audio is None:
                    raise DataError(f"{where}: field 'youtube_id': no audio file for '{yid}' (looked for "
                                    f"Y{yid}.wav, {yid}.wav or {yid}_<start>.wav/.flac/.ogg in "
                                    f"{root / split}, {root / 'audio'} and {root})")
            video_path = None
            if video:
                vp = _resolve(root, video)
                if not vp.is_file():
                    raise DataError(f"{where}: field 'video': video file '{video}' not found")
                video_path = _abs(vp)
            else:
                found = index.find(video_dirs, [f"{yid}.mp4", f"Y{yid}.mp4"])
                video_path = _abs(found) if found else None
            records.append(Record(audio_id=yid, audio_path=_abs(audio), split=split, captions=tuple(caps),
                                  video_path=video_path, start_time=start))
    if not found_any:
        raise DataError(f"{root}: no train.csv, val.csv or test.csv found")
    return records


# ---------------------------------------------------------------------------------------------------------------
# generic manifest
# ---------------------------------------------------------------------------------------------------------------


def _manifest_path(path: Path) -> Path:
    if path.is_dir():
        for name in ("manifest.jsonl", "manifest.csv"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: no manifest.jsonl or manifest.csv in this folder")
    return path


def read_manifest(path: str | os.PathLike, splits: Iterable[str] | None = None) -> list[Record]:
    path = _manifest_path(Path(path))
    wanted = _check_splits(splits)
    base = path.parent
    if path.suffix.lower() == ".csv":
        entries = _manifest_csv(path)
        unit = "row"
    else:
        entries = _manifest_jsonl(path)
        unit = "line"
    records: list[Record] = []
    seen: dict[str, int] = {}
    for n, entry in entries:
        where = f"{path}: {unit} {n}"
        audio = entry.get("audio")
        if not isinstance(audio, str) or not audio.strip():
            raise DataError(f"{where}: field 'audio' is missing or empty")
        caps = entry.get("captions")
        field_name = "captions"
        if caps is None or (isinstance(caps, str) and not caps.strip()):
            caps, field_name = entry.get("caption"), "caption"
            if caps is None:
                raise DataError(f"{where}: field 'caption' is missing (give 'caption' or 'captions')")
            caps = [caps]
        elif isinstance(caps, str):
            caps = caps.split("|")
        if not isinstance(caps, list) or not caps:
            raise DataError(f"{where}: field '{field_name}' must be a non-empty list of strings")
        captions = tuple(_caption(c, f"{where}: field '{field_name}'") for c in caps)
        split_value = entry.get("split")
        if split_value is None or (isinstance(split_value, str) and not split_value.strip()):
            split = "train"
        else:
            split = SPLIT_ALIASES.get(str(split_value).strip().lower())
            if split is None:
                raise DataError(f"{where}: field 'split': unknown split '{split_value}' (use train, val or test)")
        audio_path = _resolve(base, audio.strip())
        audio_id = entry.get("id")
        audio_id = str(audio_id).strip() if audio_id not in (None, "") else audio_path.stem
        if audio_id in seen:
            raise DataError(f"{where}: field 'id': duplicate id '{audio_id}' (already used on {unit} {seen[audio_id]})")
        seen[audio_id] = n
        if wanted is not None and split not in wanted:
            continue
        if not audio_path.is_file():
            raise DataError(f"{where}: field 'audio': audio file '{audio}' not found (looked at {audio_path})")
        video_path = None
        video = entry.get("video")
        if isinstance(video, str) and video.strip():
            vp = _resolve(base, video.strip())
            if not vp.is_file():
                raise DataError(f"{where}: field 'video': video file '{video}' not found (looked at {vp})")
            video_path = _abs(vp)
        records.append(Record(audio_id=audio_id, audio_path=_abs(audio_path), split=split, captions=captions,
                              video_path=video_path))
    if wanted is not None:
        present = {r.split for r in records}
        missing = [s for s in wanted if s not in present]
        if missing:
            raise DataError(f"{path}: no rows in requested split(s) {', '.join(missing)}")
    if not records:
        raise DataError(f"{path}: no records; the manifest has no data rows")
    return records


def _manifest_csv(path: Path) -> Iterator[tuple[int, dict]]:
    header, rows = _csv_rows(path, ["audio"])
    if "caption" not in header and "captions" not in header:
        raise DataError(f"{path}: missing column caption (or captions) (header has: {', '.join(header)})")
    for n, row in rows:
        # an empty cell means "not given" so that 'caption' can fill in for an empty 'captions' and vice versa
        yield n, {k: v for k, v in row.items() if k != "caption" or v.strip() or not row.get("captions", "").strip()}


def _manifest_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    text = _read_text(path)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj
