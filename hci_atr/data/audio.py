"""Audio front end: decode, mono, resample, log-mel, crop/pad: one implementation for files, bytes and waves.

Public entry points (names are stable; feature extraction, training, the index and serving all call these):

* :func:`decode_audio` ``(source, sample_rate, *, max_seconds=None, limits=DecodeLimits(), where=None)``: a path or
  the bytes of an audio file -> mono float32 ``[N]`` at ``sample_rate``. :func:`load_audio` is the same for paths.
  :class:`DecodeLimits` bounds what a file may make the decoder allocate.
* :func:`wave_features` ``(wave, audio_cfg) -> (mel [T, M] float32, mask [T] bool)``: a decoded wave cut at /
  zero-padded to ``audio_cfg.duration`` (:func:`fit_to_duration`), then :func:`log_mel`; the mask is True on frames
  that cover real audio. :func:`clip_features_and_duration` / :func:`clip_features` do the same from a file.
* :func:`log_mel`, :func:`mel_transform`, :func:`n_samples`, :func:`n_frames`, :func:`valid_frames`,
  :func:`crop_frames`, :func:`resample`, :func:`slaney_mel_filters`.

Choices (the same everywhere):

* Decoding uses ``soundfile`` (WAV, FLAC, OGG/Vorbis, and whatever else the bundled libsndfile reads). The header is
  read first and a file is refused (:class:`~hci_atr.errors.AudioError`, naming the file and the limit) before any
  sample is decoded when its sample rate, channel count or decoded size is outside :class:`DecodeLimits`. Samples are
  read in bounded chunks and averaged to mono chunk by chunk. Resampling uses ``soxr`` (``quality="HQ"``): its memory
  does not depend on the rate pair (a windowed-sinc kernel for, say, 44111 Hz -> 32 kHz would be gigabytes).
* Log-mel, two named front ends (``audio_cfg.frontend``):

  - ``"htk"`` (default): ``torchaudio.transforms.MelSpectrogram`` with power 2 (computed as torchaudio's complex STFT,
    re² + im², see :class:`PowerMelSpectrogram`), HTK mel scale without filter normalisation, ``center=True`` with
    ``pad_mode="constant"`` (zero padding at the edges, so the edges do not mirror content), then ``log(mel + 1e-6)``.
    A plain log with a small floor keeps the absolute level (a quiet clip stays quiet) and digital silence maps to
    ``log(1e-6) ≈ -13.8`` rather than ``-inf``.
  - ``"panns"``: what PANNs CNN14 was trained on (torchlibrosa, i.e. librosa's definitions): Slaney-scale mel filters
    with Slaney area normalisation (``librosa.filters.mel`` defaults, :func:`slaney_mel_filters`), a reflect-padded
    centred STFT with a periodic Hann window, power 2, then ``10 * log10(max(mel, 1e-10))`` (``ref=1.0``,
    ``amin=1e-10``, no ``top_db``): silence and padding map to -100 dB. Use it with a PANNs checkpoint.

  ``f_max`` is capped at Nyquist in both.
* Frames: ``T = N // hop_length + 1`` for ``N`` samples; features are ``[T, n_mels]`` (time first).
* :func:`clip_features` decodes only the first ``audio_cfg.duration`` seconds (plus :data:`READ_MARGIN_SECONDS` for
  the resampling filter), so an hour-long file costs no more memory than a clip; it cuts at that duration and
  zero-pads shorter clips to exactly that duration, so every clip has the same
  ``T = round(duration * sample_rate) // hop + 1`` frames (501 for the 5 s / 32 kHz / hop 320 demo defaults). The
  real length is returned by :func:`clip_features_and_duration` for a padding mask.

Odd files: a missing, empty (0 bytes) or undecodable file, a file with no samples, a file holding NaN/Inf, and a
header outside :class:`DecodeLimits` raise :class:`~hci_atr.errors.AudioError`. Silence is valid (finite features at
the floor).
"""

from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf
import soxr
import torch
import torchaudio

from hci_atr.config import AudioConfig
from hci_atr.errors import AudioError

LOG_EPS = 1e-6  # "htk": floor added before the log: silence -> log(1e-6)
DB_AMIN = 1e-10  # "panns": power floor before 10 * log10: silence -> -100 dB

# Extra source seconds decoded past ``max_seconds``, so the samples kept up to ``max_seconds`` equal those of a whole
# decode: soxr's HQ filter reaches a few milliseconds past a sample at the lowest accepted rate (8 kHz), and the
# samples it produces near the end of a cut input differ from the whole file's only within that reach.
READ_MARGIN_SECONDS = 0.05

_CHUNK_FRAMES = 1 << 16  # frames read per soundfile call: a chunk of C channels costs C * 256 KiB before the mix


@dataclass(frozen=True)
class DecodeLimits:
    """What a file's header may ask the decoder for; anything outside is refused before a sample is decoded.

    ``max_decoded_bytes`` bounds ``frames to read x channels x 4`` (float32) and the float32 output after
    resampling, whichever is larger: 256 MiB is about 35 min of 32 kHz mono, or 11 min of 48 kHz stereo. A caller
    that needs only a crop passes ``max_seconds`` and is then bounded by the crop, not by the file.
    """

    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_channels: int = 8
    max_decoded_bytes: int = 256 * 2**20


def _first_line(e: Exception) -> str:
    # libsndfile messages start "Error opening '<path>': " or "<_io.BytesIO object at 0x..>: "; keep the reason
    text = str(e).splitlines()[0] if str(e) else ""
    return text.split(": ")[-1][:120] or type(e).__name__


def decode_audio(source: str | os.PathLike | bytes, sample_rate: int, *, max_seconds: float | None = None,
                 limits: DecodeLimits = DecodeLimits(), where: str | None = None) -> np.ndarray:
    """A path or the bytes of an audio file -> mono float32 ``[N]`` at ``sample_rate``; raises :class:`AudioError`.

    ``max_seconds``: decode only about the first ``max_seconds`` (plus :data:`READ_MARGIN_SECONDS`) of the file, so
    the memory a file costs is bounded by the caller's crop, not by the file (a compressed upload can be tiny and hold
    an hour). The result is longer than ``max_seconds`` when the source is (by up to the margin), so a caller that
    rejects long audio can tell, and its first ``max_seconds`` equal those of a whole decode.
    ``limits``: see :class:`DecodeLimits`. ``where``: how error messages name the source (default: the path, or
    "audio bytes").
    """
    if max_seconds is not None and not max_seconds >= 0:
        raise ValueError(f"max_seconds must be >= 0 or None, got {max_seconds!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = where or "audio bytes"
        if not data:
            raise AudioError(f"{name}: audio file is empty (0 bytes); send WAV, FLAC or OGG")
        opened = io.BytesIO(data)
    else:
        path = os.fspath(source)
        name = where or path
        if not os.path.isfile(path):
            raise AudioError(f"{name}: audio file not found")
        if os.path.getsize(path) == 0:
            raise AudioError(f"{name}: audio file is empty (0 bytes); re-export or remove it")
        opened = path
    if int(sample_rate) <= 0:
        raise AudioError(f"{name}: invalid target sample rate {sample_rate}")
    try:
        with sf.SoundFile(opened) as fh:
            mono = _read_mono(fh, name, int(sample_rate), max_seconds, limits)
            sr = int(fh.samplerate)
    except AudioError:
        raise
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError for broken files
        raise AudioError(f"{name}: cannot decode audio ({_first_line(e)}); use WAV, FLAC or OGG") from None
    if mono.shape[0] == 0:
        raise AudioError(f"{name}: audio file contains no samples")
    return resample(mono, sr, int(sample_rate))


def _read_mono(fh: sf.SoundFile, name: str, sample_rate: int, max_seconds: float | None,
               limits: DecodeLimits) -> np.ndarray:
    """Check ``fh``'s header against ``limits``, then read (the first part of) it chunk by chunk, mixed to mono."""
    sr, channels, frames = int(fh.samplerate), int(fh.channels), int(fh.frames)
    if not limits.min_sample_rate <= sr <= limits.max_sample_rate:
        raise AudioError(f"{name}: sample rate {sr} Hz is outside the accepted {limits.min_sample_rate}.."
                         f"{limits.max_sample_rate} Hz (DecodeLimits); resample the file first")
    if not 1 <= channels <= limits.max_channels:
        raise AudioError(f"{name}: {channels} channels, over the limit of {limits.max_channels} (DecodeLimits); "
                         f"mix the file down first")
    to_read = max(frames, 0)
    if max_seconds is not None:
        to_read = min(to_read, int(math.ceil((max_seconds + READ_MARGIN_SECONDS) * sr)))
    need = max(to_read * channels * 4, int(math.ceil(to_read * sample_rate / sr)) * 4)
    if need > limits.max_decoded_bytes:
        raise AudioError(f"{name}: decoding {to_read / sr:.1f} s of {channels} x {sr} Hz would take "
                         f"{need / 2**20:.0f} MiB, over the limit of {limits.max_decoded_bytes / 2**20:.0f} MiB "
                         f"(DecodeLimits.max_decoded_bytes); decode a shorter part (max_seconds)")
    mono = np.empty(to_read, dtype=np.float32)
    pos = 0
    while pos < to_read:
        block = fh.read(frames=min(_CHUNK_FRAMES, to_read - pos), dtype="float32", always_2d=True)  # [n, C]
        n = block.shape[0]
        if n == 0:
            break  # the header promised more than the file holds (a truncated file): keep what is there
        if not np.isfinite(block).all():
            raise AudioError(f"{name}: audio is not finite (contains NaN or Inf samples)")
        mono[pos:pos + n] = block.mean(axis=1) if channels > 1 else block[:, 0]
        pos += n
    return mono[:pos]


def load_audio(path: str | os.PathLike, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode the file at ``path`` to mono float32 ``[N]`` at ``sample_rate``: :func:`decode_audio` for a path."""
    return decode_audio(path, sample_rate, max_seconds=max_seconds)


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """``[N] -> [round(N * new_sr / orig_sr)]`` float32 with ``soxr`` (``quality="HQ"``; memory independent of the
    rates)."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if orig_sr == new_sr:
        return wave
    if orig_sr <= 0 or new_sr <= 0:
        raise AudioError(f"invalid sample rates for resampling: {orig_sr} -> {new_sr}")
    if wave.shape[0] == 0:
        return wave
    return np.ascontiguousarray(soxr.resample(wave, orig_sr, new_sr, quality="HQ"), dtype=np.float32)


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                    hz / f_sp)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Slaney-scale triangular mel filters with Slaney area normalisation, ``[n_mels, n_fft // 2 + 1]`` float32:
    the definition of ``librosa.filters.mel`` with its defaults (``htk=False, norm="slaney"``), which PANNs used.

    Built in float64 and rounded once, as librosa does. (``torchaudio.functional.melscale_fbanks(norm="slaney",
    mel_scale="slaney")`` is the same definition built in float32, which is off by up to 0.2 % at the filter edges,
    and takes ``sample_rate // 2`` as the top FFT frequency.)
    """
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_hz = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2))
    width = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / width[:-1, None]
    falling = ramps[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]  # each filter has unit area in Hz
    return weights.astype(np.float32)


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``numpy.pad(x, pad, mode="reflect")`` on the last dimension, also when ``pad >= x.shape[-1]`` (torch's
    reflect padding refuses that; numpy, and so librosa, keeps reflecting)."""
    n = x.shape[-1]
    if pad < n:
        flat = torch.nn.functional.pad(x.reshape(-1, n), (pad, pad), mode="reflect")
        return flat.reshape(*x.shape[:-1], n + 2 * pad)
    i = torch.arange(-pad, n + pad, device=x.device)
    if n == 1:
        return x[..., torch.zeros_like(i)]
    period = 2 * (n - 1)
    j = i.remainder(period)
    return x[..., torch.where(j >= n, period - j, j)]


class PowerMelSpectrogram(torch.nn.Module):
    """``"htk"`` front end: ``torchaudio.transforms.MelSpectrogram(power=2.0)``, computed as torchaudio's complex
    STFT (``transforms.Spectrogram(power=None)``), then ``re² + im²``, then ``transforms.MelScale``.

    The same numbers up to float rounding (relative 1e-6), in about half the time on the CPU: torchaudio's own path
    takes ``|z|`` (a complex ``abs``, computed as an overflow-safe hypot) and then squares it, and that ``abs`` costs
    more than the FFT itself.
    """

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int, f_min: float,
                 f_max: float):
        super().__init__()
        self.spectrogram = torchaudio.transforms.Spectrogram(n_fft=n_fft, win_length=win_length,
                                                             hop_length=hop_length, power=None, center=True,
                                                             pad_mode="constant")
        self.mel_scale = torchaudio.transforms.MelScale(n_mels=n_mels, sample_rate=sample_rate, f_min=f_min,
                                                        f_max=f_max, n_stft=n_fft // 2 + 1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``[..., N] -> [..., n_mels, T]`` mel power."""
        z = self.spectrogram(wave)
        return self.mel_scale(z.real.square() + z.imag.square())


class PannsMelSpectrogram(torch.nn.Module):
    """``"panns"`` front end: a centred STFT with reflect padding and a periodic Hann window, power 2, then
    :func:`slaney_mel_filters` (what ``librosa.feature.melspectrogram`` and torchlibrosa compute)."""

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int, f_min: float,
                 f_max: float):
        super().__init__()
        self.pad = n_fft // 2
        # centring done by _reflect_pad (the same padding torch.stft applies, also for inputs shorter than the pad)
        self.spectrogram = torchaudio.transforms.Spectrogram(n_fft=n_fft, win_length=win_length,
                                                             hop_length=hop_length, power=None, center=False)
        fb = slaney_mel_filters(sample_rate, n_fft, n_mels, f_min, f_max)
        self.register_buffer("fb", torch.from_numpy(np.ascontiguousarray(fb.T)))  # [n_freqs, n_mels]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``[..., N] -> [..., n_mels, T]`` mel power, ``T = N // hop + 1``."""
        z = self.spectrogram(_reflect_pad(wave, self.pad))
        power = z.real.square() + z.imag.square()  # [..., n_freqs, T]
        return torch.matmul(power.transpose(-1, -2), self.fb).transpose(-1, -2)


FRONTENDS = {"htk": PowerMelSpectrogram, "panns": PannsMelSpectrogram}

# The module holds its filter bank and window; building it costs more than running it on a short clip, so one
# module per distinct front-end setting is built once and reused (it is stateless, so sharing across threads is safe).
_MEL_LOCK = threading.Lock()


@lru_cache(maxsize=16)
def _mel_module(sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int, f_min: float,
                f_max: float, device: str = "cpu", frontend: str = "htk") -> torch.nn.Module:
    return FRONTENDS[frontend](sample_rate, n_fft, win_length, hop_length, n_mels, f_min, f_max).to(device)


def mel_transform(audio_cfg: AudioConfig, device: str = "cpu") -> torch.nn.Module:
    """The cached mel power module of ``audio_cfg.frontend`` for ``audio_cfg`` on ``device`` (``f_max`` capped at
    Nyquist): :class:`PowerMelSpectrogram` (``"htk"``) or :class:`PannsMelSpectrogram` (``"panns"``)."""
    f_max = min(float(audio_cfg.f_max), audio_cfg.sample_rate / 2.0)
    with _MEL_LOCK:
        return _mel_module(audio_cfg.sample_rate, audio_cfg.n_fft, audio_cfg.win_length, audio_cfg.hop_length,
                           audio_cfg.n_mels, float(audio_cfg.f_min), f_max, str(device), audio_cfg.frontend)


def log_mel(wave: np.ndarray | torch.Tensor, audio_cfg: AudioConfig, device: str = "cpu") -> torch.Tensor:
    """Log-mel of a mono wave ``[N]`` at ``audio_cfg.sample_rate``: ``[T, n_mels]`` float32 on the CPU,
    ``T = N // hop + 1``; ``log(mel + 1e-6)`` (``"htk"``) or ``10 * log10(max(mel, 1e-10))`` dB (``"panns"``).
    ``device="cuda"`` computes the spectrogram on the GPU (the result comes back to the CPU)."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not isinstance(wave, torch.Tensor) else wave)
    x = x.to(torch.float32)
    if x.ndim != 1:
        raise AudioError(f"log_mel expects a mono wave [N], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise AudioError("log_mel got an empty wave")
    with torch.no_grad():
        mel = mel_transform(audio_cfg, device)(x.to(device))  # [n_mels, T]
        if audio_cfg.frontend == "panns":
            out = 10.0 * torch.log10(torch.clamp(mel, min=DB_AMIN))
        else:
            out = torch.log(mel + LOG_EPS)
        return out.T.contiguous().cpu()


def n_samples(audio_cfg: AudioConfig) -> int:
    """Samples in a clip of ``audio_cfg.duration`` seconds."""
    return int(round(audio_cfg.duration * audio_cfg.sample_rate))


def n_frames(audio_cfg: AudioConfig) -> int:
    """Frames of a clip of ``audio_cfg.duration`` seconds (what :func:`clip_features` returns)."""
    return n_samples(audio_cfg) // audio_cfg.hop_length + 1


def fit_to_duration(wave: np.ndarray, audio_cfg: AudioConfig) -> tuple[np.ndarray, float]:
    """A mono wave at ``audio_cfg.sample_rate`` cut at / zero-padded to :func:`n_samples`: ``(wave [n_samples]
    float32, seconds of real audio <= duration)``. Zero is silence, so padded frames sit at the log floor."""
    target = n_samples(audio_cfg)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise AudioError(f"expected a mono wave [N], got shape {wave.shape}")
    wave = wave[:target]
    seconds = wave.shape[0] / audio_cfg.sample_rate
    if wave.shape[0] < target:
        wave = np.pad(wave, (0, target - wave.shape[0]))
    return wave, float(seconds)


def wave_features(wave: np.ndarray, audio_cfg: AudioConfig, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mono wave at ``audio_cfg.sample_rate`` -> ``(mel [T, M] float32, mask [T] bool)``, exactly as feature
    extraction does it (:func:`fit_to_duration`, then :func:`log_mel`; ``T`` = :func:`n_frames`), so a served query
    clip matches what the model was trained on. ``mask`` is True on the :func:`valid_frames` that cover real audio."""
    fixed, seconds = fit_to_duration(wave, audio_cfg)
    mel = log_mel(fixed, audio_cfg, device).numpy()
    mask = np.arange(n_frames(audio_cfg)) < valid_frames(seconds, audio_cfg)
    return mel, mask


def clip_features_and_duration(path: str | os.PathLike, audio_cfg: AudioConfig,
                               device: str = "cpu") -> tuple[np.ndarray, float]:
    """``(features [T, n_mels] float32, seconds of real audio <= duration)``; T fixed by :func:`n_frames`.
    Decodes only the first ``duration`` seconds. ``device``: where the mel spectrogram is computed (decoding and
    resampling stay on the CPU)."""
    fixed, seconds = fit_to_duration(load_audio(path, audio_cfg.sample_rate, max_seconds=audio_cfg.duration),
                                     audio_cfg)
    return log_mel(fixed, audio_cfg, device).numpy(), seconds


def clip_features(path: str | os.PathLike, audio_cfg: AudioConfig) -> np.ndarray:
    """Whole clip (cut at / zero-padded to ``audio_cfg.duration``) as log-mel: ``[T, n_mels]`` float32."""
    return clip_features_and_duration(path, audio_cfg)[0]


def valid_frames(seconds: float, audio_cfg: AudioConfig) -> int:
    """How many leading frames of :func:`clip_features` cover real audio (for a padding mask)."""
    n = min(int(math.ceil(seconds * audio_cfg.sample_rate)), n_samples(audio_cfg))
    return max(1, min(n_frames(audio_cfg), n // audio_cfg.hop_length + 1))


def crop_frames(mel, n_frames: int, mode: str = "start", generator: torch.Generator | None = None):
    """Crop or pad ``mel [T, M]`` to ``[n_frames, M]``; returns ``(mel, mask [n_frames] bool)``.

    Longer inputs: ``start`` keeps the first frames, ``center`` the middle ones, ``random`` a window whose start
    is drawn from ``generator`` (training). Shorter inputs are zero-padded at the end; ``mask`` is True on real
    frames. A numpy input gives numpy outputs, a tensor gives tensors.
    """
    if mode not in ("start", "center", "random"):
        raise ValueError(f"crop mode must be start, center or random, got {mode!r}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    is_numpy = not isinstance(mel, torch.Tensor)
    if is_numpy:
        arr = np.asarray(mel)
        # feature rows are read-only views of the parquet buffers; torch wants writable memory (a clip is small)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    else:
        x = mel
    if x.ndim != 2:
        raise ValueError(f"crop_frames expects mel [T, M], got shape {tuple(x.shape)}")
    t = x.shape[0]
    if t >= n_frames:
        if mode == "start" or t == n_frames:
            offset = 0
        elif mode == "center":
            offset = (t - n_frames) // 2
        else:
            offset = int(torch.randint(0, t - n_frames + 1, (1,), generator=generator).item())
        out = x[offset:offset + n_frames]
        mask = torch.ones(n_frames, dtype=torch.bool)
    else:
        out = torch.zeros((n_frames, x.shape[1]), dtype=x.dtype)
        out[:t] = x
        mask = torch.zeros(n_frames, dtype=torch.bool)
        mask[:t] = True
    if is_numpy:
        return out.numpy().copy(), mask.numpy()
    return out, mask
