"""Decoder limits: hostile headers are refused before decoding, odd rates resample in bounded memory (measured as the
peak RSS of a child process, Linux), partial decodes match whole ones, bytes and paths decode alike, soxr vs torchaudio."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from hci_atr.data.audio import READ_MARGIN_SECONDS, DecodeLimits, decode_audio, load_audio, resample
from hci_atr.errors import AudioError

REPO = Path(__file__).resolve().parents[1]

# Peak-RSS growth a decode may cause in the child (its RSS right after the imports is the baseline). A windowed-sinc
# kernel for 44111 Hz -> 32 kHz alone would be gigabytes.
MAX_GROWTH_MB = 300

# The child: imports, caps its address space a few GiB above what the imports mapped (so a regression fails with a
# MemoryError instead of taking the machine's memory), decodes argv[1] to argv[2] Hz (argv[3]: max_seconds or
# "none"), and prints its peak-RSS growth and the outcome as JSON. Peak RSS is the kernel's VmHWM of the child's own
# address space, reset after the imports: getrusage's ru_maxrss would start at the (larger) pytest parent's peak,
# which Linux carries over through fork + exec.
CHILD = r"""
import json, resource, sys
import numpy as np
from hci_atr.data.audio import decode_audio
from hci_atr.errors import AudioError

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

cap = (status_kb("VmSize") + 4 * 1024 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
before = status_kb("VmHWM")
out = {}
try:
    if sys.argv[1].startswith("alloc:"):  # calibration: hold this many MB
        held = np.ones(int(sys.argv[1][6:]) * 2**20 // 4, np.float32)
    else:
        max_seconds = None if sys.argv[3] == "none" else float(sys.argv[3])
        wave = decode_audio(sys.argv[1], int(sys.argv[2]), max_seconds=max_seconds)
        spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        out["n"] = int(wave.shape[0])
        out["hz"] = float(np.fft.rfftfreq(len(wave), 1 / int(sys.argv[2]))[spec.argmax()])
except AudioError as e:
    out["error"] = str(e)
out["growth_mb"] = (status_kb("VmHWM") - before) / 1024
print(json.dumps(out))
"""


def decode_in_child(path: Path | str, sample_rate: int = 32000, max_seconds: float | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(sample_rate),
                           "none" if max_seconds is None else str(max_seconds)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tone(freq: float, seconds: float, sr: int, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    w = (amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)).astype(np.float32)
    return np.stack([w] * channels, 1) if channels > 1 else w


def _wav_header(sample_rate: int, channels: int, n_frames: int, data_bytes: int | None = None) -> bytes:
    """A PCM16 WAV header, written by hand so it can declare what soundfile would not write."""
    block = channels * 2
    data_bytes = n_frames * block if data_bytes is None else data_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, (sample_rate * block) & 0xFFFFFFFF, block, 16)
    return (b"RIFF" + struct.pack("<I", (36 + data_bytes) & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", data_bytes & 0xFFFFFFFF))


# -- odd rates resample in bounded memory -------------------------------------------------------------------------


def test_child_measure_sees_an_allocation():
    """The measure itself: a child holding 200 MB reports that growth."""
    assert 190 < decode_in_child("alloc:200")["growth_mb"] < 260



def test_odd_rate_resamples_in_bounded_memory(tmp_path):
    """44111 Hz -> 32 kHz: the rates share no factor, so torchaudio's sinc kernel would be [32000, 44111+] floats."""
    p = tmp_path / "odd.wav"
    sf.write(p, _tone(1000, 3.0, 44111), 44111, subtype="PCM_16")
    got = decode_in_child(p, 32000)
    assert "error" not in got, got
    assert got["n"] == 96000 and abs(got["hz"] - 1000) <= 2
    assert got["growth_mb"] < MAX_GROWTH_MB, got


@pytest.mark.parametrize("rate", [8000, 44111, 96000, 192000])
def test_partial_decode_keeps_the_samples_of_a_whole_decode(tmp_path, rate):
    """max_seconds decodes READ_MARGIN_SECONDS more than asked, enough for soxr's filter: the kept samples are the
    whole decode's (to float rounding)."""
    p = tmp_path / f"r{rate}.flac"
    x = (np.random.default_rng(rate).standard_normal(int(2.5 * rate)) * 0.1).clip(-1, 1).astype(np.float32)
    sf.write(p, x, rate, subtype="PCM_24")
    full = load_audio(p, 32000)
    part = load_audio(p, 32000, max_seconds=1.0)
    assert full.shape == (80000,)
    assert 32000 < part.shape[0] <= int(np.ceil((1.0 + READ_MARGIN_SECONDS) * 32000)) + 1
    np.testing.assert_allclose(part[:32000], full[:32000], rtol=0, atol=1e-6)


def test_soxr_matches_torchaudio_on_an_ordinary_rate_pair():
    """44100 -> 32000 on tones below 11 kHz (the two filters differ only in their transition band near 16 kHz):
    correlation > 0.9999, relative L2 error < 2e-3 away from the edges."""
    sr = 44100
    t = np.arange(2 * sr) / sr
    x = sum(a * np.sin(2 * np.pi * f * t + ph) for a, f, ph in [(0.3, 440, 0), (0.2, 1000, 1), (0.1, 5000, 2),
                                                                 (0.05, 11000, 3)]).astype(np.float32)
    ours = resample(x, sr, 32000)
    ref = torchaudio.functional.resample(torch.from_numpy(x), sr, 32000).numpy()
    assert ours.shape == ref.shape == (64000,) and ours.dtype == np.float32
    mid = slice(1000, -1000)
    assert np.corrcoef(ours[mid], ref[mid])[0, 1] > 0.9999
    assert np.linalg.norm(ours[mid] - ref[mid]) / np.linalg.norm(ref[mid]) < 2e-3


# -- hostile headers are refused before decoding ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_655_khz_8_channels_is_refused_in_bounded_memory(tmp_path, fmt):
    p = tmp_path / f"bomb.{fmt.lower()}"
    sf.write(p, np.zeros((65500, 8), np.float32), 655000, format=fmt, subtype="PCM_16")
    got = decode_in_child(p, 32000)
    assert "error" in got, got
    assert p.name in got["error"] and "655000 Hz" in got["error"] and "192000" in got["error"]
    assert "\n" not in got["error"] and got["growth_mb"] < MAX_GROWTH_MB


@pytest.mark.parametrize("rate", [2**31 - 1, 2**32 - 1])
def test_absurd_rate_in_a_crafted_header_is_an_audio_error(tmp_path, rate):
    """A hand-made WAV header declaring ~2**31 (or 2**32 - 1) Hz: an AudioError naming the limit, never a crash."""
    p = tmp_path / "absurd.wav"
    p.write_bytes(_wav_header(rate, 1, 16000) + np.zeros(16000, "<i2").tobytes())
    got = decode_in_child(p, 32000)
    assert "error" in got, got
    assert p.name in got["error"] and ("192000" in got["error"] or "cannot decode" in got["error"])
    assert got["growth_mb"] < MAX_GROWTH_MB
    with pytest.raises(AudioError):
        decode_audio(p.read_bytes(), 32000, where="upload absurd.wav")


def test_huge_declared_length_is_refused_before_allocating(tmp_path):
    """A FLAC whose STREAMINFO claims 2**36 - 1 samples (the file holds 1 s): refused by max_decoded_bytes unless the
    caller asks for a bounded part."""
    buf = io.BytesIO()
    sf.write(buf, _tone(440, 1.0, 16000), 16000, format="FLAC")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the first metadata block is STREAMINFO
    data[8 + 13] |= 0x0F  # total samples: the 36 bits starting at bit 108 of STREAMINFO
    data[8 + 14:8 + 18] = b"\xff\xff\xff\xff"
    p = tmp_path / "long_claim.flac"
    p.write_bytes(bytes(data))
    got = decode_in_child(p, 32000)
    assert "error" in got and p.name in got["error"] and "MiB" in got["error"] and "max_seconds" in got["error"]
    assert got["growth_mb"] < MAX_GROWTH_MB
    # a bounded part allocates only that part (this file then fails to seek past its real end: still an AudioError)
    try:
        wave = decode_audio(p, 32000, max_seconds=0.5)
        assert wave.shape[0] <= 0.6 * 32000
    except AudioError as e:
        assert p.name in str(e)


def test_limits_are_configurable_and_messages_name_the_limit(tmp_path):
    p = tmp_path / "six.wav"
    sf.write(p, _tone(440, 30.0, 16000, channels=3), 16000)
    assert decode_audio(p, 16000).shape == (480000,)
    with pytest.raises(AudioError, match=r"six\.wav: 3 channels, over the limit of 2"):
        decode_audio(p, 16000, limits=DecodeLimits(max_channels=2))
    with pytest.raises(AudioError, match=r"six\.wav: sample rate 16000 Hz is outside the accepted 22050\.\.48000"):
        decode_audio(p, 16000, limits=DecodeLimits(min_sample_rate=22050, max_sample_rate=48000))
    small = DecodeLimits(max_decoded_bytes=2**20)
    with pytest.raises(AudioError, match=r"six\.wav: decoding 30\.0 s of 3 x 16000 Hz .* over the limit of 1 MiB"):
        decode_audio(p, 16000, limits=small)
    assert decode_audio(p, 16000, max_seconds=5.0, limits=small).shape[0] > 5 * 16000  # a crop fits
    with pytest.raises(AudioError, match=r"upload: decoding"):  # the output side counts too (16 -> 192 kHz)
        decode_audio(p.read_bytes(), 192000, max_seconds=2.0, limits=small, where="upload")
    ch9 = tmp_path / "nine.wav"
    sf.write(ch9, np.zeros((100, 9), np.float32), 16000)
    with pytest.raises(AudioError, match="9 channels, over the limit of 8"):
        decode_audio(ch9, 16000)
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(100, np.float32), 4000)
    with pytest.raises(AudioError, match="low.wav: sample rate 4000 Hz is outside the accepted 8000..192000 Hz"):
        load_audio(low, 16000)


# -- one decoder for bytes and paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,subtype,sr,channels", [("WAV", "PCM_16", 44100, 2), ("FLAC", "PCM_16", 48000, 6),
                                                     ("OGG", "VORBIS", 22050, 1), ("WAV", "FLOAT", 32000, 1)])
def test_bytes_and_path_decode_identically(tmp_path, fmt, subtype, sr, channels):
    p = tmp_path / f"clip.{fmt.lower()}"
    sf.write(p, _tone(660, 1.5, sr, channels), sr, format=fmt, subtype=subtype)
    raw = p.read_bytes()
    for max_seconds in (None, 1.0):
        from_path = decode_audio(p, 32000, max_seconds=max_seconds)
        assert from_path.dtype == np.float32 and from_path.ndim == 1
        for src in (raw, bytearray(raw), memoryview(raw)):
            np.testing.assert_array_equal(decode_audio(src, 32000, max_seconds=max_seconds), from_path)
    np.testing.assert_array_equal(load_audio(str(p), 32000), decode_audio(p, 32000))


def test_bytes_errors_name_where():
    cases = {b"": "upload x.wav: audio file is empty (0 bytes)",
             b"not audio at all" * 10: "upload x.wav: cannot decode",
             _wav_header(16000, 1, 0): "upload x.wav: audio file contains no samples"}
    for data, message in cases.items():
        with pytest.raises(AudioError) as err:
            decode_audio(data, 16000, where="upload x.wav")
        assert str(err.value).startswith(message) and "\n" not in str(err.value) and "BytesIO" not in str(err.value)
    with pytest.raises(AudioError, match="^audio bytes: cannot decode"):
        decode_audio(b"junk" * 100, 16000)
    buf = io.BytesIO()
    sf.write(buf, np.full(1000, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="^q: audio is not finite"):
        decode_audio(buf.getvalue(), 16000, where="q")
