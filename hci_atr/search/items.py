"""What goes into a search index: one :class:`IndexItem` per clip, from dataset records or a folder of audio files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from hci_atr.errors import DataError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a")


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
    folder with '/' separators (e.g. ``birds/a.wav``), what ``caption-all`` on a manifest of the folder uses."""
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
