"""Audio front end: shapes, resampling, mel against torchaudio called directly, the "panns" front end against
librosa, cut/pad and masks, crop/pad, odd files; the audio encoder's PANNs clip path, SpecAugment and dropout."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
import torchaudio

from hci_atr.config import AudioConfig, Config
from hci_atr.data import audio
from hci_atr.data.audio import (LOG_EPS, PannsMelSpectrogram, PowerMelSpectrogram, clip_features,
                                clip_features_and_duration, crop_frames, fit_to_duration, load_audio, log_mel,
                                mel_transform, n_frames, n_samples, slaney_mel_filters, valid_frames, wave_features)
from hci_atr.errors import AudioError, ConfigError
from hci_atr.models.audio_encoder import AudioEncoder

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
    raw = sf.read(p, dtype="float32")[0]
    np.testing.assert_allclose(wave, soxr.resample(raw, sr, 32000, quality="HQ"), atol=1e-6)
    sinc = torchaudio.functional.resample(torch.from_numpy(raw), sr, 32000).numpy()  # a second resampler agrees
    assert np.corrcoef(wave[500:-500], sinc[500:-500])[0, 1] > 0.9999


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


# -- one cut/pad + mask for files and waves -------------------------------------------------------------------------


def _mel_from_wave_as_it_was(wave, audio_cfg):
    """hci_atr.index.mel_from_wave before wave_features replaced it (the reference semantics)."""
    wave = np.asarray(wave, dtype=np.float32)[: n_samples(audio_cfg)]
    seconds = wave.shape[0] / audio_cfg.sample_rate
    if wave.shape[0] < n_samples(audio_cfg):
        wave = np.pad(wave, (0, n_samples(audio_cfg) - wave.shape[0]))
    mel = log_mel(wave, audio_cfg).numpy().astype(np.float32)
    mask = np.arange(n_frames(audio_cfg)) < valid_frames(seconds, audio_cfg)
    return mel, mask


@pytest.mark.parametrize("frontend", ["htk", "panns"])
def test_wave_features_cut_pad_and_mask(frontend):
    cfg = AudioConfig(duration=2.0, frontend=frontend)
    rng = np.random.default_rng(4)
    for n in (0, 1, 100, 9600, 64000, 64001, 100000):
        wave = (rng.standard_normal(n) * 0.1).astype(np.float32)
        mel, mask = wave_features(wave, cfg)
        ref_mel, ref_mask = _mel_from_wave_as_it_was(wave, cfg)
        assert mel.dtype == np.float32 and mel.shape == (201, 64) and mask.dtype == bool and mask.shape == (201,)
        np.testing.assert_array_equal(mel, ref_mel)
        np.testing.assert_array_equal(mask, ref_mask)
        assert mask.sum() == valid_frames(min(n, 64000) / 32000, cfg)
    fixed, seconds = fit_to_duration(np.ones(70000, np.float64), cfg)
    assert fixed.dtype == np.float32 and fixed.shape == (64000,) and seconds == 2.0
    fixed, seconds = fit_to_duration(np.ones(16000, np.float32), cfg)
    assert seconds == 0.5 and (fixed[16000:] == 0).all()
    with pytest.raises(AudioError):
        wave_features(np.zeros((2, 100), np.float32), cfg)


@pytest.mark.parametrize("frontend", ["htk", "panns"])
def test_file_and_wave_paths_give_the_same_features(tmp_path, frontend):
    cfg = AudioConfig(duration=2.0, frontend=frontend)
    for seconds, sr in ((0.7, 44100), (3.0, 32000)):
        p = tmp_path / f"c{sr}.wav"
        sf.write(p, _sine(700, seconds, sr), sr)
        mel, real = clip_features_and_duration(p, cfg)
        w_mel, w_mask = wave_features(load_audio(p, 32000, max_seconds=cfg.duration), cfg)
        np.testing.assert_array_equal(mel, w_mel)
        np.testing.assert_array_equal(w_mask, np.arange(n_frames(cfg)) < valid_frames(real, cfg))
        np.testing.assert_array_equal(wave_features(load_audio(p, 32000), cfg)[0], mel)  # whole decode, same crop


# -- front ends ------------------------------------------------------------------------------------------------------


def test_frontend_is_a_validated_config_choice():
    assert AudioConfig().frontend == "htk"
    assert isinstance(mel_transform(CFG), PowerMelSpectrogram)
    assert isinstance(mel_transform(AudioConfig(frontend="panns")), PannsMelSpectrogram)
    with pytest.raises(ConfigError, match="audio.frontend: expected 'htk' or 'panns', got 'mfcc'"):
        AudioConfig(frontend="mfcc")
    with pytest.raises(ConfigError, match="audio.frontend"):
        Config.from_dict({"audio": {"frontend": "HTK"}})
    assert Config.from_dict({"audio": {"frontend": "panns"}}).audio.frontend == "panns"


def test_htk_frontend_is_the_default_bit_for_bit():
    wave = (np.random.default_rng(5).standard_normal(20000) * 0.2).astype(np.float32)
    torch.testing.assert_close(log_mel(wave, AudioConfig(frontend="htk")), log_mel(wave, AudioConfig()), rtol=0,
                               atol=0)


def test_slaney_filters_equal_librosa():
    librosa = pytest.importorskip("librosa")
    for sr, n_fft, n_mels, fmin, fmax in ((32000, 1024, 64, 50, 14000), (16000, 512, 80, 0, 8000),
                                          (44100, 2048, 128, 20, 20000)):
        ours = slaney_mel_filters(sr, n_fft, n_mels, fmin, fmax)
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        assert ours.shape == ref.shape == (n_mels, n_fft // 2 + 1) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.max()))
    # the module uses them (f_max capped at Nyquist like the htk front end)
    fb = mel_transform(AudioConfig(frontend="panns")).fb
    np.testing.assert_allclose(fb.numpy().T, librosa.filters.mel(sr=32000, n_fft=1024, n_mels=64, fmin=50,
                                                                  fmax=14000), rtol=1e-5, atol=1e-10)


def _librosa_db(librosa, y):
    s = librosa.feature.melspectrogram(y=y, sr=32000, n_fft=1024, hop_length=320, win_length=1024, window="hann",
                                       center=True, pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=14000)
    return librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=None).T  # [T, 64]


@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")
def test_panns_log_mel_equals_librosa():
    """Absolute error in dB, float32 both sides: <= 1e-4 dB on every band of noise clips (loud, ordinary, quiet,
    shorter than half a window). Clips with tones: <= 1e-4 dB on bands within 50 dB of the clip's peak; further down,
    a band's level is near float32 FFT rounding of the peak (librosa's as much as ours), so all bands are compared
    to 1e-3 relative."""
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(6)
    cfg = AudioConfig(frontend="panns")
    t = np.arange(64000) / 32000
    noise = {"noise": 0.1 * rng.standard_normal(64000), "loud": 30 * rng.standard_normal(64000),
             "quiet": 1e-4 * rng.standard_normal(48000), "short": 0.1 * rng.standard_normal(300)}
    tones = {"440 Hz": 0.5 * np.sin(2 * np.pi * 440 * t), "2500 Hz": 0.5 * np.sin(2 * np.pi * 2500 * t),
             "tones+noise": 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
             + 1e-2 * rng.standard_normal(64000)}
    for name, y in {**noise, **tones}.items():
        y = y.astype(np.float32)
        ours, ref = log_mel(y, cfg).numpy(), _librosa_db(librosa, y)
        assert ours.shape == ref.shape == (len(y) // 320 + 1, 64), name
        near = ref > ref.max() - 50 if name in tones else np.ones(ref.shape, bool)
        np.testing.assert_allclose(ours[near], ref[near], rtol=0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4, err_msg=name)


def test_panns_silence_and_padding_sit_at_minus_100_db(tmp_path):
    cfg = AudioConfig(duration=2.0, frontend="panns")
    assert np.all(log_mel(np.zeros(32000, np.float32), cfg).numpy() == np.float32(-100.0))
    p = tmp_path / "short.wav"
    sf.write(p, _sine(500, 0.3, 32000), 32000)
    mel, mask = wave_features(load_audio(p, 32000), cfg)
    k = valid_frames(0.3, cfg)
    assert mask.sum() == k == 31 and mask[:k].all()
    assert np.isfinite(mel).all() and (mel[k + 2:] == np.float32(-100.0)).all()  # frames past the reach of audio
    assert mel[5].max() > 0.0  # a 0.3 amplitude tone is well above 0 dB in its band
    f_silent = clip_features(tmp_path / "short.wav", AudioConfig(duration=2.0, frontend="panns"))
    np.testing.assert_array_equal(f_silent, mel)


# -- audio encoder ---------------------------------------------------------------------------------------------------


def _panns_reference_clip(enc: AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """PANNs Cnn14.forward's path from log-mel to ``embedding`` (eval mode), written out with the encoder's weights:
    bn0 over mel bins, conv blocks (conv-BN-ReLU x2, avg pool), mean over frequency, max + mean over time, fc1, ReLU."""
    x = enc.bn0(mel.unsqueeze(1).transpose(1, 3)).transpose(1, 3)
    for i in range(1, enc.n_blocks + 1):
        blk = getattr(enc, f"conv_block{i}")
        x = F.relu(blk.bn1(blk.conv1(x)))
        x = F.relu(blk.bn2(blk.conv2(x)))
        x = F.avg_pool2d(x, blk.pool)
    x = torch.mean(x, dim=3)
    x = torch.max(x, dim=2)[0] + torch.mean(x, dim=2)
    return F.relu(enc.fc1(x))


def _trained_bn(enc: AudioEncoder) -> AudioEncoder:
    """Non-trivial BatchNorm running statistics, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return enc.eval()


def test_clip_embedding_is_panns_pooling_and_ignores_padding():
    torch.manual_seed(0)
    enc = _trained_bn(AudioEncoder("cnn-small", 64, 8))
    mel = torch.randn(2, 96, 64)
    with torch.no_grad():
        conv, mask = enc.conv_frames(mel)
        assert conv.shape == (2, 12, enc.conv_dim) and mask.all()
        clip = enc.clip_embedding(conv, mask)
        assert clip.shape == (2, enc.out_dim)
        torch.testing.assert_close(clip, _panns_reference_clip(enc, mel))
        frames, fmask = enc(mel)
        torch.testing.assert_close(frames, enc.frame_embedding(conv, mask))
        assert not torch.allclose(clip, frames.amax(1) + frames.mean(1))  # fc1 after pooling, not before
        # padded frames appended to clip 0 change nothing; a clip with no valid frame pools to fc1(0)
        padded = torch.cat([mel, torch.randn(2, 40, 64)], 1)
        pmask = torch.ones(2, 136, dtype=torch.bool)
        pmask[:, 96:] = False
        pmask[1] = False
        conv_p, mask_p = enc.conv_frames(padded, pmask)
        clip_p = enc.clip_embedding(conv_p, mask_p)
        torch.testing.assert_close(clip_p[0], clip[0])
        torch.testing.assert_close(clip_p[1], F.relu(enc.fc1.bias))


def test_cnn14_clip_embedding_matches_panns_layout():
    torch.manual_seed(1)
    enc = _trained_bn(AudioEncoder("cnn14", 64))
    mel = torch.randn(1, 64, 64)
    with torch.no_grad():
        conv, mask = enc.conv_frames(mel)
        assert conv.shape == (1, 2, 2048)
        torch.testing.assert_close(enc.clip_embedding(conv, mask), _panns_reference_clip(enc, mel))


def test_spec_augment_and_dropout_are_training_only_and_off_by_default():
    torch.manual_seed(2)
    plain = _trained_bn(AudioEncoder("cnn-small", 64, 8))
    torch.manual_seed(2)
    aug = AudioEncoder("cnn-small", 64, 8, spec_augment=True, time_masks=2, time_mask_width=20, freq_masks=2,
                       freq_mask_width=8, dropout=0.2, fc_dropout=0.5)
    aug.load_state_dict(plain.state_dict())
    assert aug.state_dict().keys() == plain.state_dict().keys()  # PANNs checkpoints still fit
    aug.eval()
    mel = torch.randn(3, 80, 64)
    with torch.no_grad():
        torch.testing.assert_close(aug(mel)[0], plain(mel)[0], rtol=0, atol=0)
        c1, m1 = aug.conv_frames(mel)
        torch.testing.assert_close(aug.clip_embedding(c1, m1), plain.clip_embedding(*plain.conv_frames(mel)))
        # default encoder: training mode is deterministic (no augmentation, no dropout)
        plain.train()
        torch.testing.assert_close(plain(mel)[0], plain(mel)[0], rtol=0, atol=0)
        plain.eval()
        aug.train()
        x = torch.ones(4, 1, 80, 64)
        y = aug.augment(x)
        zero_t = (y == 0).all(dim=3)[:, 0]  # [B, T] whole frames masked
        zero_f = (y == 0).all(dim=2)[:, 0]  # [B, M] whole bins masked
        assert zero_t.any() and zero_f.any()
        assert int(zero_t.sum(1).max()) <= 2 * 20 and int(zero_f.sum(1).max()) <= 2 * 8
        assert ((y == 0) == (zero_t[:, :, None] | zero_f[:, None, :])[:, None]).all()  # only whole stripes
        assert not torch.equal(zero_t[0], zero_t[1]) or not torch.equal(zero_f[0], zero_f[1])  # per example
        a, b = aug(mel)[0], aug(mel)[0]
        assert not torch.equal(a, b)
        aug.eval()
        torch.testing.assert_close(aug.augment(x), x, rtol=0, atol=0)
    with pytest.raises(ValueError):
        AudioEncoder("cnn-small", 64, 8, dropout=1.0)
    with pytest.raises(ValueError):
        AudioEncoder("cnn-small", 64, 8, spec_augment=True, time_masks=-1)
