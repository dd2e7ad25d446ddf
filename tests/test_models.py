"""Encoders, the full model's shapes/masks, padding invariance, switches, save/load and PANNs checkpoint loading."""

import pytest
import torch

from hci_atr.errors import ModelLoadError
from hci_atr.models.audio_encoder import AudioEncoder, load_panns_checkpoint
from hci_atr.models.model import HciAtrModel
from hci_atr.models.text_encoder import TextEncoder, packaged_minilm_path
from model_helpers import tiny_mel, tiny_model

CAPS = ["a dog barks while a car passes by", "rain", "people talk, then a door slams shut"]


_model, _mel = tiny_model, tiny_mel


def test_packaged_minilm_and_load_errors(tmp_path):
    assert (packaged_minilm_path() / "config.json").is_file()
    with pytest.raises(ModelLoadError, match="no_such_model"):
        TextEncoder(str(tmp_path / "no_such_model"))


def test_text_encoder_words_merge_pieces(tiny_text_dir):
    enc = TextEncoder(str(tiny_text_dir), freeze=True, max_words=5, out_dim=None).eval()
    b = enc.tokenize(["an unbelievably loud helicopter", "rain"])
    assert b.word_mask.tolist() == [[True] * 4, [True, False, False, False]]
    # "unbelievably" is several word pieces but one word
    assert int((b.word_ids[0] == 1).sum()) > 1
    words, sent = enc(b)
    assert words.shape == (2, 4, 32) and sent.shape == (2, 32)
    hidden = enc.transformer(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    torch.testing.assert_close(words[0, 1], hidden[0, b.word_ids[0] == 1].mean(0))
    assert torch.all(words[1, 1:] == 0)
    assert not any(p.requires_grad for p in enc.transformer.parameters())
    # max_words truncates
    assert enc.tokenize(["one two three four five six seven"]).word_mask.sum() == 5


def test_model_shapes_and_masks(tiny_text_dir):
    m = _model(tiny_text_dir)
    t = m.encode_text(m.tokenize(CAPS))
    mask = torch.ones(3, 61, dtype=torch.bool)
    mask[2, 30:] = False
    a = m.encode_audio(_mel(), mask)
    assert t.sentence.shape == (3, 16) and t.words.shape[0] == 3 and t.phrases.shape[-1] == 16
    assert t.word_mask.sum(1).tolist() == [8, 1, 7]
    assert t.phrase_mask.sum(1).tolist() == [4, 1, 3]  # chunker: "a dog barks|while a car|passes|by", ...
    assert a.frames.shape == (3, 7, 16) and a.frame_mask.sum(1).tolist() == [7, 7, 3]  # 61 // 8, 30 // 8
    assert a.segments.shape[1] == 3 and a.segment_mask.sum(1).tolist() == [3, 3, 1]
    assert torch.all(a.frames[2, 3:] == 0) and torch.all(t.words[1, 1:] == 0)
    torch.testing.assert_close(a.clip.norm(dim=-1), torch.ones(3))
    s = m.score(a, t)
    assert set(s.levels) == {"clip", "segment", "frame"}
    assert all(v.shape == (3, 3) for v in s.levels.values())
    torch.testing.assert_close(s.fused, sum(s.levels.values()))


def test_every_level_is_invariant_to_padding(tiny_text_dir):
    m = _model(tiny_text_dir)
    mel = _mel()
    tb = m.tokenize(CAPS)
    with torch.no_grad():
        ref = m.score(m.encode_audio(mel), m.encode_text(tb))
        junk = torch.randn(3, 27, 16) * 5
        padded_mel = torch.cat([mel, junk], 1)
        pmask = torch.cat([torch.ones(3, 61), torch.zeros(3, 27)], 1).bool()
        got = m.score(m.encode_audio(padded_mel, pmask), m.encode_text(m.tokenize(CAPS, pad_words_to=12)))
    for k in ref.levels:
        torch.testing.assert_close(got.levels[k], ref.levels[k], atol=1e-5, rtol=1e-5)
    # a caption scored alone equals the same caption scored in a batch with longer ones
    with torch.no_grad():
        alone = m.score(m.encode_audio(mel), m.encode_text(m.tokenize(CAPS[1:2]))).fused
    torch.testing.assert_close(alone[:, 0], ref.fused[:, 1], atol=1e-5, rtol=1e-5)


def test_level_switches_change_only_their_level(tiny_text_dir):
    full = _model(tiny_text_dir)
    mel, tb = _mel(), full.tokenize(CAPS)
    with torch.no_grad():
        ref = full.score(full.encode_audio(mel), full.encode_text(tb))
    for level, key in (("clip", "model.use_clip"), ("segment", "model.use_segment"), ("frame", "model.use_frame")):
        m = _model(tiny_text_dir, **{key: False})
        m.load_state_dict(full.state_dict())
        with torch.no_grad():
            s = m.score(m.encode_audio(mel), m.encode_text(tb))
        assert level not in s.levels
        for k, v in s.levels.items():
            torch.testing.assert_close(v, ref.levels[k])
        torch.testing.assert_close(s.fused, ref.fused - ref.levels[level])
    # weights and learnable weights
    w = _model(tiny_text_dir, **{"model.level_weights": [2.0, 0.0, 1.0]})
    w.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        s = w.score(w.encode_audio(mel), w.encode_text(tb))
    torch.testing.assert_close(s.fused, 2 * ref.levels["clip"] + ref.levels["frame"])
    lw = _model(tiny_text_dir, **{"model.learn_level_weights": True})
    assert lw.level_logits.requires_grad and not full.level_logits.requires_grad
    assert not _model(tiny_text_dir, **{"model.use_frame": False}).word_head.weight.requires_grad


def test_ac_fusion_and_branch_switches(tiny_text_dir):
    base = _model(tiny_text_dir)
    mel, tb = _mel(), base.tokenize(CAPS)
    gens = ["dog barking", "", "a door"]
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        ref = base.score(base.encode_audio(mel), base.encode_text(tb))
        fus = _model(tiny_text_dir, **{"model.ac_fusion": True})
        fus.load_state_dict(base.state_dict())
        aux = fus.tokenize(gens)
        a0 = fus.encode_audio(mel, None, aux, has)
        torch.testing.assert_close(a0.clip, base.encode_audio(mel).clip)  # gate 0: identity
        fus.fusion.gate.fill_(0.7)
        a1 = fus.encode_audio(mel, None, aux, has)
        changed = (a1.clip - a0.clip).abs().amax(1) > 1e-4
        assert changed.tolist() == [True, False, True]  # the clip without caption passes through unchanged
        br = _model(tiny_text_dir, **{"model.ac_branch": True, "model.ac_branch_weight": 0.5})
        br.load_state_dict(base.state_dict())
        ab = br.encode_audio(mel, None, br.tokenize(gens), has)
        s = br.score(ab, br.encode_text(tb))
    for k in ("clip", "segment", "frame"):
        torch.testing.assert_close(s.levels[k], ref.levels[k])
    assert torch.all(s.levels["ac_branch"][1] == 0)
    assert torch.all(s.levels["ac_branch"][0] != 0)
    torch.testing.assert_close(s.fused, ref.fused + 0.5 * s.levels["ac_branch"])


def test_save_load_round_trip_gives_identical_scores(tiny_text_dir, tmp_path):
    m = _model(tiny_text_dir, **{"model.ac_fusion": True, "model.ac_branch": True})
    with torch.no_grad():
        m.fusion.gate.fill_(0.3)
    d = m.save_pretrained(tmp_path / "model")
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "config.yaml", "text_encoder"}
    m2 = HciAtrModel.from_pretrained(d)
    mel = _mel()
    with torch.no_grad():
        s1 = m.score(m.encode_audio(mel, None, m.tokenize(["x y", "", "z"])), m.encode_text(m.tokenize(CAPS)))
        s2 = m2.score(m2.encode_audio(mel, None, m2.tokenize(["x y", "", "z"])), m2.encode_text(m2.tokenize(CAPS)))
    for k in s1.levels:
        assert torch.equal(s1.levels[k], s2.levels[k])
    assert torch.equal(m.embed_text(CAPS), m2.embed_text(CAPS))
    m.save_pretrained(d)  # overwrite in place works
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ModelLoadError, match="missing model.safetensors"):
        HciAtrModel.from_pretrained(tmp_path)


def _panns_like_state(enc: AudioEncoder) -> dict:
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in enc.state_dict().items()}
    state["spectrogram_extractor.stft.conv_real.weight"] = torch.randn(513, 1, 1024)
    state["logmel_extractor.melW"] = torch.randn(513, 64)
    state["fc_audioset.weight"] = torch.randn(527, enc.out_dim)
    state["fc_audioset.bias"] = torch.randn(527)
    return state


def test_panns_checkpoint_loading(tmp_path):
    enc = AudioEncoder("cnn-small", n_mels=16, width=4)
    state = _panns_like_state(enc)
    state["fc1.weight"] = torch.randn(3, 3)  # wrong shape: skipped and reported
    del state["conv_block3.bn2.running_var"]
    path = tmp_path / "Cnn_small.pth"
    torch.save({"model": state, "iteration": 1}, path)
    fresh = AudioEncoder("cnn-small", n_mels=16, width=4)
    rep = load_panns_checkpoint(fresh, path)
    assert torch.equal(fresh.conv_block1.conv1.weight, state["conv_block1.conv1.weight"])
    assert torch.equal(fresh.bn0.running_mean, state["bn0.running_mean"])
    assert sorted(rep.skipped) == sorted(["spectrogram_extractor.stft.conv_real.weight", "logmel_extractor.melW",
                                          "fc_audioset.weight", "fc_audioset.bias"])
    assert rep.mismatched == ["fc1.weight: (3, 3) vs (16, 16)"]
    assert set(rep.missing) == {"fc1.weight", "conv_block3.bn2.running_var"}
    assert len(rep.used) == len(state) - 4 - 1
    # not a checkpoint
    (tmp_path / "bad.pth").write_text("hello")
    with pytest.raises(ModelLoadError, match="bad.pth"):
        load_panns_checkpoint(fresh, tmp_path / "bad.pth")
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="not a PANNs checkpoint"):
        load_panns_checkpoint(fresh, tmp_path / "other.pth")


def test_cnn14_layout_matches_panns_names():
    with torch.device("meta"):
        enc = AudioEncoder("cnn14", n_mels=64)
    sd = enc.state_dict()
    assert sd["conv_block1.conv1.weight"].shape == (64, 1, 3, 3)
    assert sd["conv_block6.conv2.weight"].shape == (2048, 2048, 3, 3)
    assert sd["fc1.weight"].shape == (2048, 2048) and sd["bn0.running_mean"].shape == (64,)
    assert {k.split(".")[0] for k in sd} == {"bn0", "fc1", *(f"conv_block{i}" for i in range(1, 7))}
    assert enc.time_reduction == 32


def test_text_encoder_words_of_non_latin_captions(tiny_text_dir):
    """Cyrillic, Japanese and accented captions get words and phrases (they had none: the splitter knew only
    [a-z0-9]); CJK runs are cut where the tokenizer itself cuts them."""
    enc = TextEncoder(str(tiny_text_dir), out_dim=None).eval()
    b = enc.tokenize(["собака лает", "犬が吠える", "café", "\u200b\u200b"])
    assert b.word_mask.sum(1).tolist() == [2, 4, 1, 0]
    assert b.phrase_mask.sum(1).tolist() == [1, 2, 1, 0]
    for i in range(3):  # every word has pieces, and every non-special piece belongs to a word
        assert set(b.word_ids[i][b.attention_mask[i].bool()].tolist()) - {-1} == set(range(int(b.word_mask[i].sum())))
    # English is tokenized exactly as before the change
    e = enc.tokenize(CAPS)
    assert e.word_mask.sum(1).tolist() == [8, 1, 7] and e.phrase_mask.sum(1).tolist() == [4, 1, 3]


def test_zero_width_query_adds_nothing_at_the_word_levels(tiny_text_dir):
    m = _model(tiny_text_dir)
    t = m.encode_text(m.tokenize(["\u200b\u200b", "a dog barks"]))
    a = m.encode_audio(_mel(2), torch.ones(2, 61, dtype=torch.bool))
    s = m.score(a, t)
    assert torch.all(s.levels["segment"][:, 0] == 0) and torch.all(s.levels["frame"][:, 0] == 0)
    torch.testing.assert_close(s.fused[:, 0], s.levels["clip"][:, 0])
    assert bool((s.fused > -2).all())


def test_uncached_hub_id_fails_fast_without_any_network_call(monkeypatch):
    """A Hugging Face id that is not in the local cache: one line saying how to get it there, and no connection is
    even attempted (local_files_only unless HCI_ATR_ALLOW_DOWNLOADS=1)."""
    import socket

    import huggingface_hub.constants

    attempts = []

    def no_network(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HCI_ATR_ALLOW_DOWNLOADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(ModelLoadError) as e:
        TextEncoder("hci-atr-test/no-such-model-anywhere")
    msg = str(e.value)
    assert "\n" not in msg and "local_files_only" in msg and "cache" in msg
    assert "huggingface-cli download hci-atr-test/no-such-model-anywhere" in msg
    assert attempts == []
