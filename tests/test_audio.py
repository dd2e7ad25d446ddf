"""Audio front end: shapes, resampling, mel against torchaudio called directly, crop/pad, odd files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from hci_atr.config import AudioConfig
from hci_atr.data import audio
from hci_atr.data.audio import (LOG_EPS, clip_features, clip_features_and_duration, crop_frames, load_audio, log_mel,
                                mel_transform, n_frames, valid_frames, PowerMelSpectrogram)
from hci_atr.errors import AudioError

CFG = AudioConfig(duration=2.0)


def _sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def _dominant_hz(wave: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spec.argmax()])


def test_load_resamples_and_mixes_to_mono(tmp_path):
    p = tmp_path / "stereo_44k.wav"
    left, right = _sine(1000, 1.0, 44100), _sine(1000, 1.0, 44100, amp=0.1)
    sf.write(p, np.stack([left, right], axis=1), 44100)
    wave = load_audio(p, 32000)
    assert wave.dtype == np.float32 and wave.shape == (32000,)
    assert abs(_dominant_hz(wave, 32000) - 1000) <= 2  # pitch preserved through resampling
    mid = wave[8000:24000]
    assert np.sqrt((mid ** 2).mean()) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)  # mean of 0.5 and 0.1 amplitude


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 48000])
def test_wrong_sample_rate_is_resampled(tmp_path, sr):
    p = tmp_path / f"s{sr}.flac"
    sf.write(p, _sine(440, 0.5, sr), sr)
    wave = load_audio(p, 32000)
    assert wave.shape == (16000,)
    assert abs(_dominant_hz(wave, 32000) - 440) <= 3
    expected = torchaudio.functional.resample(torch.from_numpy(sf.read(p, dtype="float32")[0]), sr, 32000).numpy()
    np.testing.assert_allclose(wave, expected, atol=1e-6)


def test_log_mel_equals_torchaudio_directly():
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(32000) * 0.1).astype(np.float32)
    got = log_mel(wave, CFG)
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=32000, n_fft=1024, win_length=1024, hop_length=320,
                                               f_min=50.0, f_max=14000.0, n_mels=64, power=2.0, center=True,
                                               pad_mode="constant")(torch.from_numpy(wave))
    assert got.shape == (32000 // 320 + 1, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.log(ref + LOG_EPS).T)


@pytest.mark.parametrize("n_fft,win,hop,n_mels,sr", [(1024, 1024, 320, 64, 32000), (512, 400, 160, 80, 16000)])
def test_power_mel_matches_torchaudio_melspectrogram(n_fft, win, hop, n_mels, sr):
    """re² + im² of torchaudio's complex STFT + MelScale == MelSpectrogram(power=2), loud and quiet, batched."""
    rng = np.random.default_rng(1)
    wave = torch.from_numpy((rng.standard_normal((2, sr)) * np.array([[30.0], [1e-3]])).astype(np.float32))
    got = PowerMelSpectrogram(sr, n_fft, win, hop, n_mels, 0.0, sr / 2)(wave)
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=sr, n_fft=n_fft, win_length=win, hop_length=hop,
                                               f_min=0.0, f_max=sr / 2, n_mels=n_mels, power=2.0, center=True,
                                               pad_mode="constant")(wave)
    assert got.shape == ref.shape == (2, n_mels, sr // hop + 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9 * float(ref.max()))


def test_mel_module_is_cached_per_config():
    assert mel_transform(CFG) is mel_transform(AudioConfig(duration=7.0))  # duration does not change the module
    assert mel_transform(CFG) is not mel_transform(AudioConfig(n_mels=32))
    low = AudioConfig(sample_rate=16000)  # f_max 14000 > Nyquist: capped at 8000
    assert float(mel_transform(low).mel_scale.f_max) == 8000.0
    assert log_mel(_sine(1000, 0.5, 16000), low).shape == (8000 // 320 + 1, 64)


def test_log_mel_frame_count_and_pitch_band():
    for n in (1, 100, 320, 641, 32000):
        assert log_mel(np.zeros(n, np.float32), CFG).shape == (n // 320 + 1, 64)
    lo = log_mel(_sine(200, 1.0, 32000), CFG).mean(0)
    hi = log_mel(_sine(4000, 1.0, 32000), CFG).mean(0)
    assert int(lo.argmax()) < int(hi.argmax())  # higher pitch -> higher mel band


def test_clip_features_pads_and_caps(tmp_path):
    short, long_ = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, _sine(500, 0.3, 32000), 32000)
    sf.write(long_, _sine(500, 5.0, 32000), 32000)
    f_short, sec_short = clip_features_and_duration(short, CFG)
    f_long, sec_long = clip_features_and_duration(long_, CFG)
    assert f_short.shape == f_long.shape == (n_frames(CFG), 64) == (201, 64)
    assert f_short.dtype == np.float32
    assert sec_short == pytest.approx(0.3) and sec_long == pytest.approx(2.0)
    # padded tail is digital silence: exactly the log floor
    assert np.allclose(f_short[-50:], np.log(LOG_EPS), atol=1e-4)
    assert f_short[5].max() > 0.0
    assert valid_frames(sec_short, CFG) == 9600 // 320 + 1
    np.testing.assert_array_equal(clip_features(long_, CFG), f_long)


def test_very_short_and_silent_files_work(tmp_path):
    tiny, silent = tmp_path / "tiny.wav", tmp_path / "silent.wav"
    sf.write(tiny, _sine(1000, 0.001, 32000), 32000)  # 32 samples, shorter than half an FFT window
    sf.write(silent, np.zeros(32000, np.float32), 32000)
    f_tiny = clip_features(tiny, CFG)
    f_silent = clip_features(silent, CFG)
    assert f_tiny.shape == f_silent.shape == (201, 64)
    assert np.isfinite(f_tiny).all() and np.isfinite(f_silent).all()
    assert np.allclose(f_silent, np.log(LOG_EPS), atol=1e-4)


def test_odd_files_raise_audio_error(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    nosamples = tmp_path / "zero.wav"
    sf.write(nosamples, np.zeros((0,), np.float32), 16000)
    nan = tmp_path / "nan.wav"
    x = _sine(300, 0.2, 16000)
    x[100:200] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    cases = {empty: "empty (0 bytes)", corrupt: "cannot decode", nosamples: "contains no samples",
             nan: "not finite", tmp_path / "absent.wav": "not found"}
    for path, message in cases.items():
        with pytest.raises(AudioError) as err:
            clip_features(path, CFG)
        assert message in str(err.value) and path.name in str(err.value)


def test_crop_frames_modes_and_determinism():
    mel = torch.arange(100 * 4, dtype=torch.float32).reshape(100, 4)
    out, mask = crop_frames(mel, 30, "start")
    assert out.shape == (30, 4) and mask.all() and out[0, 0] == 0
    out, _ = crop_frames(mel, 30, "center")
    assert out[0, 0] == 35 * 4
    a, _ = crop_frames(mel, 30, "random", torch.Generator().manual_seed(3))
    b, _ = crop_frames(mel, 30, "random", torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    starts = {int(crop_frames(mel, 30, "random", g)[0][0, 0]) // 4 for g in
              [torch.Generator().manual_seed(s) for s in range(20)]}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 70
    padded, mask = crop_frames(mel[:10], 30, "random")
    assert padded.shape == (30, 4) and mask.sum() == 10 and not mask[10:].any()
    torch.testing.assert_close(padded[:10], mel[:10])
    assert (padded[10:] == 0).all()
    np_out, np_mask = crop_frames(mel.numpy(), 50, "center")
    assert isinstance(np_out, np.ndarray) and np_out.shape == (50, 4) and np_mask.dtype == bool
    with pytest.raises(ValueError):
        crop_frames(mel, 10, "middle")


def test_log_mel_rejects_bad_shapes():
    with pytest.raises(AudioError):
        log_mel(np.zeros((2, 100), np.float32), CFG)
    with pytest.raises(AudioError):
        log_mel(np.zeros(0, np.float32), CFG)
    assert audio.n_samples(CFG) == 64000
