"""Shared by tests/test_bad_inputs.py, tests/test_faults.py and bench/load.py: the bad-audio corpus, a tiny served
index, and output-directory checks.

Audio corpus (:func:`write_audio_corpus`): every file is written with soundfile (or raw bytes for the broken ones),
and :data:`AUDIO_CASES` says what each one must produce: an error whose message holds the given words, or a clean
decode of the given length (seconds of real audio, cut at the crop length).
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np

# name -> (expected outcome for the CLI pipeline, expected HTTP status for an upload, words in the message)
# outcome: "error" (an errors.parquet row) or a float (seconds of real audio the feature row must report, at a
# 2 s crop for the CLI)
AUDIO_CASES: dict[str, tuple[object, int, str]] = {
    "empty.wav": ("error", 400, "empty"),                     # 0 bytes
    "trunc_header.wav": ("error", 400, "cannot decode"),      # the first 30 bytes of a WAV: no data chunk
    "random.wav": ("error", 400, "cannot decode"),            # random bytes with a .wav name
    "text.wav": ("error", 400, "cannot decode"),              # a text file with a .wav name
    "zero_frames.wav": ("error", 400, "no samples"),          # a valid header and no samples
    "nan.wav": ("error", 400, "not finite"),                  # float WAV full of NaN
    "inf.wav": ("error", 400, "not finite"),                  # float WAV full of +Inf
    "trunc_data.wav": (1.0, 200, ""),                         # header says 2 s, half the data: decode what is there
    "sr8k_stereo.wav": (2.0, 200, ""),                        # other rate, 2 channels: resampled, averaged
    "sr48k_6ch.flac": (2.0, 200, ""),                         # 48 kHz, 6 channels, FLAC
    "one_sample.wav": (1 / 16000, 200, ""),                   # a single sample: padded to the crop length
}


def _tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    w = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([w] * channels, 1) if channels > 1 else w


def wav_bytes(seconds: float, sr: int = 16000, channels: int = 1, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _tone(seconds, sr, channels), sr, format=fmt)
    return buf.getvalue()


def write_audio_corpus(root: Path) -> dict[str, Path]:
    """Write every file of :data:`AUDIO_CASES` under ``root``; returns name -> path."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    raw = wav_bytes(2.0)
    (root / "empty.wav").write_bytes(b"")
    (root / "trunc_header.wav").write_bytes(raw[:30])
    (root / "trunc_data.wav").write_bytes(raw[:44 + (len(raw) - 44) // 2])
    (root / "random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "text.wav").write_text("hello, this is not audio\n")
    sf.write(root / "zero_frames.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(root / "inf.wav", np.full(16000, np.inf, np.float32), 16000, subtype="FLOAT")
    sf.write(root / "sr8k_stereo.wav", _tone(2.0, 8000, 2), 8000)
    sf.write(root / "sr48k_6ch.flac", _tone(2.0, 48000, 6), 48000)
    sf.write(root / "one_sample.wav", np.array([0.1], np.float32), 16000)
    return {name: root / name for name in AUDIO_CASES}


def write_hour_long(path: Path, fmt: str = "WAV", sr: int = 8000) -> Path:
    """One hour of audio written block by block (never held in memory): WAV PCM16 is 57.6 MB at 8 kHz; OGG/Vorbis
    of silence is a few hundred KB, small enough to pass any upload size limit."""
    import soundfile as sf

    subtype = "PCM_16" if fmt == "WAV" else "VORBIS"
    block = _tone(60.0, sr) if fmt == "WAV" else np.zeros(60 * sr, np.float32)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, format=fmt, subtype=subtype) as fh:
        for _ in range(60):
            fh.write(block)
    return path


def temp_files(root: Path) -> list[str]:
    """Temporary files a writer may leave behind: dot-files with a temp mark (ours: ``.x.tmp-<pid>``,
    atomic_write_text: ``.x.<random>.tmp``, mkdtemp siblings) anywhere under ``root``."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if p.name != ".lock" and (".tmp" in p.name or p.name.startswith(".") and p.is_dir()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_and_index(demo_root: Path, text_dir: Path, work: Path) -> tuple[Path, Path, list]:
    """An untrained tiny HCI+AC model (real classes, saved with save_pretrained, loaded back) and the index of the
    demo clips, built with the library (no Ray). Enough for input checks, faults and load: ranking quality is
    tested elsewhere (tests/test_serve.py)."""
    import torch

    from hci_atr.data.formats import read_dataset
    from hci_atr.models.model import HciAtrModel
    from hci_atr.search.embed import embed_items
    from hci_atr.search.index import is_index, write_index
    from hci_atr.search.items import items_from_records
    from tests.test_retriever import tiny_config

    model_dir, index_dir = work / "model", work / "index"
    records = read_dataset(demo_root)
    if not is_index(index_dir):
        torch.manual_seed(0)
        HciAtrModel(tiny_config(text_dir, ac=True)).eval().save_pretrained(model_dir)
        model = HciAtrModel.from_pretrained(model_dir)
        items = items_from_records(records, {r.audio_id: r.captions[-1] for r in records})
        emb = embed_items(model, items, batch_size=8)
        assert not emb.errors
        write_index(index_dir, model, emb.arrays, emb.items, model_dir=str(model_dir))
    return model_dir, index_dir, records


def start_serve(port: int) -> None:
    """A fresh Serve instance whose HTTP proxy listens on 127.0.0.1:``port`` (shuts down an earlier module's one:
    Serve keeps its first HTTP options for the life of the instance)."""
    from ray import serve

    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
