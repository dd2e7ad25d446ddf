"""Captioner backends (no Ray): tiny random-weight BLIP / Whisper models saved and loaded with from_pretrained, a real
video decoded with PyAV, real wav files, and a tiny trained-format hci-atr model for the nearest backend."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from hci_atr.captioners import OUTPUT_COLUMNS, build_captioner, captioner_class, merge_captions
from hci_atr.captioners.blip import BlipCaptioner
from hci_atr.data.video import frame_times, read_frames, video_seconds
from hci_atr.errors import CaptionerError, DataError
from tiny_models import (build_tiny_audio_captioner, build_tiny_blip, frame_level, write_test_video,
                               write_tone)

FPS = 10
FAST = {"num_beams": 1, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner_media")
    video = write_test_video(root / "clip.mp4", seconds=3.0, fps=FPS, size=(64, 48))
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all " * 50)
    return {"root": root, "video": str(video), "corrupt": str(corrupt)}


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"), seed=0)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    return build_tiny_audio_captioner(tmp_path_factory.mktemp("tiny_whisper"), seed=0)


def _batch(**cols):
    """A column batch as Ray Data hands it to map_batches (numpy arrays, object dtype for strings)."""
    out = {}
    for k, v in cols.items():
        out[k] = np.array(v, dtype=np.float64 if k == "start_time" else object)
    return out


def _check_columns(out, n, captioner, model):
    assert tuple(out) == OUTPUT_COLUMNS
    assert all(len(out[c]) == n for c in OUTPUT_COLUMNS)
    assert out["seconds"].dtype == np.float32 and (out["seconds"] >= 0).all()
    if captioner != "nearest":  # only nearest measures its trust in a caption
        assert out["confidence"].dtype == np.float32 and np.isnan(out["confidence"]).all()
    assert list(out["captioner"]) == [captioner] * n
    assert list(out["model"]) == [str(model)] * n
    for caption, error in zip(out["generated_caption"], out["error"]):
        assert isinstance(caption, str) and isinstance(error, str)
        assert (caption == "") != (error == ""), "exactly one of caption / error per row"
        assert "\n" not in error


# -- frame sampling -----------------------------------------------------------------------------------------------


def test_frame_times_spread_over_clip_window():
    assert frame_times(2.0, 3.0, 3) == pytest.approx([2.5, 3.5, 4.5])
    assert frame_times(float("nan"), 10.0, 2) == pytest.approx([2.5, 7.5])  # unknown start -> from 0
    assert frame_times(None, 4.0, 1) == pytest.approx([2.0])
    # window clamped to the video's end: [8, 10] instead of [8, 18]
    assert frame_times(8.0, 10.0, 2, video_seconds=10.0) == pytest.approx([8.5, 9.5])
    with pytest.raises(ValueError, match="past the end of the video"):
        frame_times(12.0, 10.0, 3, video_seconds=10.0)


def test_sampled_frames_are_the_frames_near_start_time(media, blip_dir):
    assert video_seconds(media["video"]) == pytest.approx(3.0)
    cap = BlipCaptioner(str(blip_dir), num_frames=3, clip_seconds=1.5, **FAST)
    frames = cap.sample_frames(media["video"], 1.0)  # window [1.0, 2.5] -> targets 1.25, 1.75, 2.25
    targets = [1.25, 1.75, 2.25]
    assert len(frames) == 3
    times = [t for t, _ in frames]
    assert times == sorted(times)
    for (t, img), target in zip(frames, targets):
        assert abs(t - target) <= 0.5 / FPS + 1e-6
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        # the frame content identifies the frame: grey level of frame i is frame_level(i) (below the moving square)
        assert abs(float(img[16:].mean()) - frame_level(round(t * FPS))) < 3.0
    # targets past the last frame get the last frame (time 2.9 s)
    tail = read_frames(media["video"], [2.95, 5.0])
    assert [t for t, _ in tail] == pytest.approx([2.9, 2.9])


def test_merge_rules():
    caps = ["A dog barks.", "a  dog barks", "a car passes", "a dog barks", "a car passes", ""]
    assert merge_captions(caps, "join") == "a dog barks ; a car passes"
    assert merge_captions(caps, "most_frequent") == "a dog barks"
    assert merge_captions(["b", "a", "a", "b"], "most_frequent") == "b"  # tie -> earliest frame
    assert merge_captions(["", " "], "join") == ""
    with pytest.raises(CaptionerError, match="merge rule 'vote'"):
        merge_captions(caps, "vote")


# -- blip ---------------------------------------------------------------------------------------------------------


def test_blip_captions_video_and_isolates_bad_rows(media, blip_dir):
    cap = build_captioner("blip", str(blip_dir), num_frames=3, clip_seconds=1.5, **FAST)
    missing = str(media["root"] / "missing.mp4")
    batch = _batch(audio_id=["good1", "novid", "empty", "corrupt", "missing", "good2"],
                   video_path=[media["video"], None, "", media["corrupt"], missing, media["video"]],
                   start_time=[0.5, 0.0, math.nan, 0.0, 0.0, 1.0],
                   audio_path=["a.wav"] * 6, split=["train"] * 6, captions=[["x"]] * 6)
    out = cap(batch)
    _check_columns(out, 6, "blip", blip_dir)
    assert list(out["audio_id"]) == ["good1", "novid", "empty", "corrupt", "missing", "good2"]
    err = list(out["error"])
    assert err[0] == "" and err[5] == ""
    assert err[1] == "no video for clip" and err[2] == "no video for clip"
    assert err[3].startswith(f"cannot read video {media['corrupt']}")
    assert err[4] == f"video file not found: {missing}"
    for i in (0, 5):
        assert len(out["generated_caption"][i].split()) >= 1
    assert json.loads(out["params"][0]) == {"num_frames": 3, "clip_seconds": 1.5, "max_new_tokens": 8,
                                            "num_beams": 1, "merge": "join", "allow_download": False}
    # the row's caption is the merge of the captions of exactly the sampled frames
    frames = [img for _, img in cap.sample_frames(media["video"], 0.5)]
    assert out["generated_caption"][0] == merge_captions(cap._generate(frames), "join")


def test_blip_is_deterministic_for_a_seed(media, blip_dir, tmp_path):
    batch = _batch(audio_id=["c"], video_path=[media["video"]], start_time=[0.5])
    first = build_captioner("blip", str(blip_dir), clip_seconds=1.5, **FAST)(batch)["generated_caption"][0]
    same_seed = build_captioner("blip", str(build_tiny_blip(tmp_path / "s0", seed=0)), clip_seconds=1.5,
                                **FAST)(batch)["generated_caption"][0]
    other_seed = build_captioner("blip", str(build_tiny_blip(tmp_path / "s1", seed=1)), clip_seconds=1.5,
                                 **FAST)(batch)["generated_caption"][0]
    assert first and first == same_seed
    assert other_seed != first  # the caption comes from the weights, not from a constant
    # default generation settings (beam search, 3 frames over a 10 s window clamped to the 3 s video)
    default = build_captioner("blip", str(blip_dir))
    out = default(batch)
    assert out["error"][0] == "" and out["generated_caption"][0]
    assert json.loads(out["params"][0])["num_beams"] == 3
    targets = frame_times(0.5, 10.0, 3, video_seconds=3.0)
    assert targets == pytest.approx([0.5 + 2.5 / 6, 1.75, 3.0 - 2.5 / 6])
    got = [t for t, _ in default.sample_frames(media["video"], 0.5)]
    assert all(abs(t - g) <= 0.5 / FPS + 1e-6 for t, g in zip(targets, got))


def test_blip_setup_errors_say_what_to_fix(tmp_path, blip_dir, audio_dir):
    with pytest.raises(CaptionerError, match="model directory .*nope not found"):
        build_captioner("blip", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match="no config.json"):
        build_captioner("blip", str(tmp_path / "empty"))
    with pytest.raises(CaptionerError, match="is a 'whisper' model; the blip backend needs a BLIP"):
        build_captioner("blip", str(audio_dir))
    with pytest.raises(CaptionerError, match="unknown parameter\\(s\\) num_frame "):
        build_captioner("blip", str(blip_dir), num_frame=2)
    with pytest.raises(CaptionerError, match="num_frames must be >= 1"):
        build_captioner("blip", str(blip_dir), num_frames=0)
    with pytest.raises(CaptionerError, match="cannot load model 'no-such-org/no-such-blip'.*local cache"):
        build_captioner("blip", "no-such-org/no-such-blip")


# -- audio --------------------------------------------------------------------------------------------------------


def test_audio_captions_wav_files(media, audio_dir):
    root = media["root"]
    wavs = [write_tone(root / "t300.wav", 300, 1.5, 16000), write_tone(root / "t900.wav", 900, 1.0, 22050),
            write_tone(root / "t2k.wav", 2000, 2.5, 44100, channels=2)]
    broken = root / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt garbage")
    cap = build_captioner("audio", str(audio_dir), **FAST)
    assert cap.sample_rate == 16000  # taken from the saved processor, inputs are resampled to it
    paths = [str(w) for w in wavs] + [str(broken), str(root / "absent.wav")]
    out = cap(_batch(audio_id=["a", "b", "c", "broken", "absent"], audio_path=paths, video_path=[None] * 5,
                     start_time=[math.nan] * 5, split=["train"] * 5, captions=[["x"]] * 5))
    _check_columns(out, 5, "audio", audio_dir)
    assert list(out["error"][:3]) == ["", "", ""]
    assert all(c.strip() for c in out["generated_caption"][:3])
    assert "cannot decode audio" in out["error"][3] and str(broken) in out["error"][3]
    assert out["error"][4] == f"{root / 'absent.wav'}: audio file not found"
    # batching does not change a clip's caption: alone == in the batch
    alone = cap(_batch(audio_id=["c"], audio_path=[paths[2]]))
    assert alone["generated_caption"][0] == out["generated_caption"][2]
    assert json.loads(out["params"][0])["max_new_tokens"] == 8


def test_audio_setup_errors(blip_dir, tmp_path):
    with pytest.raises(CaptionerError, match="needs a model"):
        build_captioner("audio")
    with pytest.raises(CaptionerError, match="not an audio-to-text sequence-to-sequence model"):
        build_captioner("audio", str(blip_dir))
    with pytest.raises(CaptionerError, match="model directory .*gone not found"):
        build_captioner("audio", str(tmp_path / "gone"))


# -- registry -----------------------------------------------------------------------------------------------------


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(CaptionerError, match="unknown captioner 'gpt'; choose one of: blip, audio, nearest"):
        build_captioner("gpt", "x")
    assert captioner_class("blip") is BlipCaptioner
    assert {captioner_class(n).name for n in ("blip", "audio", "nearest")} == {"blip", "audio", "nearest"}


def test_empty_batch_gives_empty_columns(blip_dir):
    out = build_captioner("blip", str(blip_dir), **FAST)(_batch(audio_id=[], video_path=[], start_time=[]))
    assert tuple(out) == OUTPUT_COLUMNS and all(len(v) == 0 for v in out.values())




# -- nearest ------------------------------------------------------------------------------------------------------

TRAIN_TONES = {"t0": 250.0, "t1": 500.0, "t2": 1000.0, "t3": 2000.0, "t4": 4000.0}


@pytest.fixture(scope="module")
def nearest_setup(tmp_path_factory, tiny_text_dir):
    """A tiny saved HciAtrModel, five training clips (tones, two distinct captions each) as feature shards, and a
    validation clip that is an exact copy of training clip t2's audio."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from hci_atr.config import Config
    from hci_atr.data.audio import clip_features
    from hci_atr.models.model import HciAtrModel

    root = tmp_path_factory.mktemp("nearest")
    cfg = Config().override({"audio.sample_rate": 16000, "audio.n_fft": 512, "audio.win_length": 512,
                             "audio.hop_length": 160, "audio.n_mels": 32, "audio.f_max": 8000.0,
                             "audio.duration": 1.0, "model.text_encoder": str(tiny_text_dir),
                             "model.embed_dim": 32, "model.audio_width": 8})
    torch.manual_seed(0)
    model_dir = HciAtrModel(cfg).save_pretrained(root / "model")
    rows = []
    for i, (aid, freq) in enumerate(TRAIN_TONES.items()):
        wav = write_tone(root / f"{aid}.wav", freq, 1.0, 16000)
        mel = clip_features(wav, cfg.audio)
        rows.append({"audio_id": aid, "split": "train", "audio_path": str(wav),
                     "captions": [f"tone {aid} first caption", f"tone {aid} second caption"], "duration": 1.0,
                     "n_frames": mel.shape[0], "n_mels": mel.shape[1], "mel": mel.reshape(-1).tolist()})
    # a validation row in the same shards: it must never be used as a caption source (split filter)
    val_wav = write_tone(root / "v_other.wav", 1000.0, 1.0, 16000)
    mel = clip_features(val_wav, cfg.audio)
    rows.append({"audio_id": "v_other", "split": "val", "audio_path": str(val_wav), "captions": ["validation only"],
                 "duration": 1.0, "n_frames": mel.shape[0], "n_mels": mel.shape[1], "mel": mel.reshape(-1).tolist()})
    feats = root / "features"
    feats.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), feats / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), feats / "part-00001.parquet")
    dup = root / "v_dup.wav"
    shutil.copy(root / "t2.wav", dup)
    return {"root": root, "model": model_dir, "features": feats, "cfg": cfg, "rows": rows, "dup": str(dup)}


def _expected_neighbours(setup):
    """Independent reference: clip embeddings of the training mels, argmax cosine excluding the clip itself."""
    import torch

    from hci_atr.models.model import HciAtrModel

    model = HciAtrModel.from_pretrained(setup["model"])
    train = [r for r in setup["rows"] if r["split"] == "train"]
    mel = torch.tensor(np.stack([np.reshape(r["mel"], (r["n_frames"], r["n_mels"])) for r in train]),
                       dtype=torch.float32)  # [N, T, M]
    with torch.no_grad():
        clip = model.encode_audio(mel, torch.ones(mel.shape[:2], dtype=torch.bool)).clip  # [N, D]
    sims = clip @ clip.T
    sims.fill_diagonal_(-2.0)
    return {r["audio_id"]: train[int(j)]["audio_id"] for r, j in zip(train, sims.argmax(1))}


def _expected_confidence(setup):
    """The same reference's cosine of each training clip and its nearest other training clip."""
    import torch

    from hci_atr.models.model import HciAtrModel

    model = HciAtrModel.from_pretrained(setup["model"])
    train = [r for r in setup["rows"] if r["split"] == "train"]
    mel = torch.tensor(np.stack([np.reshape(r["mel"], (r["n_frames"], r["n_mels"])) for r in train]),
                       dtype=torch.float32)
    with torch.no_grad():
        clip = model.encode_audio(mel, torch.ones(mel.shape[:2], dtype=torch.bool)).clip
    sims = clip @ clip.T
    sims.fill_diagonal_(-2.0)
    return {r["audio_id"]: float(v) for r, v in zip(train, sims.max(1).values)}


def test_nearest_never_returns_the_clips_own_captions(nearest_setup):
    s = nearest_setup
    cap = build_captioner("nearest", str(s["model"]), features=str(s["features"]))
    assert cap.bank_ids == list(TRAIN_TONES)  # only the train split, in shard order
    train = [r for r in s["rows"] if r["split"] == "train"]
    out = cap(_batch(audio_id=[r["audio_id"] for r in train], audio_path=[r["audio_path"] for r in train],
                     video_path=[None] * len(train), start_time=[math.nan] * len(train),
                     split=["train"] * len(train), captions=[r["captions"] for r in train]))
    _check_columns(out, len(train), "nearest", s["model"])
    assert list(out["error"]) == [""] * len(train)
    neighbours = _expected_neighbours(s)
    for r, caption in zip(train, out["generated_caption"]):
        assert caption not in r["captions"]
        neighbour = neighbours[r["audio_id"]]
        assert neighbour != r["audio_id"]
        assert caption in next(t["captions"] for t in train if t["audio_id"] == neighbour)
    # the confidence that travels with each caption: the clip-level cosine to the neighbour it came from
    conf = _expected_confidence(s)
    assert out["confidence"].dtype == np.float32
    np.testing.assert_allclose(out["confidence"], [conf[r["audio_id"]] for r in train], atol=1e-5)


def test_nearest_finds_an_identical_clip_and_drops_own_caption_text(nearest_setup):
    s = nearest_setup
    cap = build_captioner("nearest", str(s["model"]), features=str(s["features"]))
    t2_caps = ["tone t2 first caption", "tone t2 second caption"]
    out = cap(_batch(audio_id=["v_dup", "v_dup_same_text", "v_dup_one_text", "v_missing"],
                     audio_path=[s["dup"], s["dup"], s["dup"], str(s["root"] / "absent.wav")],
                     captions=[["unrelated"], t2_caps, [t2_caps[1].upper() + "."], ["x"]]))
    # the same audio under another id: the neighbour is t2 (cosine 1)
    assert out["generated_caption"][0] in t2_caps and out["error"][0] == ""
    # a row whose own captions are t2's (a duplicate clip) must not get them back: next-nearest clip instead
    assert out["generated_caption"][1] not in t2_caps and out["generated_caption"][1].startswith("tone t")
    # only one of t2's captions is the row's own (case/punctuation-insensitive): the other one is returned
    assert out["generated_caption"][2] == t2_caps[0]
    assert out["error"][3].endswith("absent.wav: audio file not found") and out["generated_caption"][3] == ""
    assert abs(out["confidence"][0] - 1.0) < 1e-5 and np.isnan(out["confidence"][3])  # same audio; no caption
    assert json.loads(out["params"][0])["features"] == str(s["features"])


def test_nearest_setup_errors(nearest_setup, tmp_path):
    s = nearest_setup
    with pytest.raises(CaptionerError, match="needs features=<dir>"):
        build_captioner("nearest", str(s["model"]))
    with pytest.raises(CaptionerError, match="model directory .*nomodel not found"):
        build_captioner("nearest", str(tmp_path / "nomodel"), features=str(s["features"]))
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(CaptionerError, match="cannot load the hci-atr model .*missing model.safetensors"):
        build_captioner("nearest", str(tmp_path / "notmodel"), features=str(s["features"]))
    with pytest.raises(CaptionerError, match="features directory .*nofeat not found"):
        build_captioner("nearest", str(s["model"]), features=str(tmp_path / "nofeat"))
    with pytest.raises(CaptionerError, match="no rows with split 'development'"):
        build_captioner("nearest", str(s["model"]), features=str(s["features"]), split="development")


def test_bank_built_in_parts_equals_the_backends_own_bank(nearest_setup, tmp_path):
    """What caption-all does for nearest: embed_bank_rows on slices of the feature rows (any order), parts joined by
    NearestBank.from_tables, handed to the backend, which then never reads the features directory; the pipeline's
    BankEmbedder actor reads shard files and gives the same bank."""
    import pyarrow as pa
    import torch

    from hci_atr.captioners.nearest import NearestBank, embed_bank_rows, load_hci_model
    from workflows.caption import BankEmbedder

    s = nearest_setup
    own = build_captioner("nearest", str(s["model"]), features=str(s["features"]))
    net = load_hci_model(str(s["model"]))
    embed = BankEmbedder(str(s["model"]), split="train", embed_batch_size=2)
    table = pa.Table.from_pylist(s["rows"])

    def embed_rows(rows, source):
        return embed_bank_rows(net, rows, "train", 2, source=source)

    parts = [embed_rows(table.slice(4, 2), "rows 4-5"), embed_rows(table.slice(0, 4), "rows 0-3")]
    assert [p.num_rows for p in parts] == [1, 4]  # the val row is dropped; order does not matter
    bank = NearestBank.from_tables(parts)
    assert bank.ids == own.bank_ids == list(TRAIN_TONES)
    assert bank.captions == own.bank_captions
    torch.testing.assert_close(bank.audio, own.bank_audio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bank.text, own.bank_text, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bank.audio.norm(dim=1), torch.ones(len(bank)), atol=1e-5)
    # a round trip through the table form keeps everything
    again = NearestBank.from_tables([bank.to_table()])
    assert again.ids == bank.ids and torch.equal(again.audio, bank.audio) and torch.equal(again.text, bank.text)

    given = build_captioner("nearest", str(s["model"]), features=str(tmp_path / "never_read"), bank=bank)
    rows = dict(audio_id=["v_dup", "t0"], audio_path=[s["dup"], s["rows"][0]["audio_path"]],
                captions=[["unrelated"], s["rows"][0]["captions"]])
    assert list(given(_batch(**rows))["generated_caption"]) == list(own(_batch(**rows))["generated_caption"])

    # what the pipeline calls: a batch of shard file paths, read by the actor
    files = embed(pa.table({"path": sorted(str(f) for f in s["features"].glob("part-*.parquet"))}))
    from_files = NearestBank.from_tables([files])
    assert from_files.ids == bank.ids and torch.allclose(from_files.audio, bank.audio, atol=1e-6)

    with pytest.raises(CaptionerError, match="caption bank is empty"):
        NearestBank.from_tables([embed_rows(table.slice(5, 1), "val row")])  # only the val row: nothing to lend
    bad = table.slice(0, 1).set_column(table.schema.get_field_index("n_frames"), "n_frames",
                                       pa.array([3], pa.int64()))
    with pytest.raises(CaptionerError, match="bad rows, audio_id t0: mel has .* values, expected n_frames"):
        embed_rows(bad, "bad rows")
    # the actor reports an unreadable file as data (workflows.runner.returns_failures); the driver raises it
    from workflows.runner import FAILURE_COLUMN, failure_error

    failed = embed(pa.table({"path": [str(tmp_path / "absent.parquet")]}))
    assert failed.column_names == [FAILURE_COLUMN]
    with pytest.raises(CaptionerError, match="cannot read feature shard .*absent.parquet"):
        raise failure_error(failed[FAILURE_COLUMN][0].as_py())


def test_nearest_reuses_bank_embeddings_only_when_the_front_end_matches(nearest_setup, tmp_path, monkeypatch):
    """A training clip captioned against its own bank is not decoded again when the features' manifest shows the
    model's audio config; same captions as decoding it. Another config, another path or reuse off: decoded."""
    import dataclasses

    import hci_atr.captioners.nearest as caps_mod

    s = nearest_setup
    feats = tmp_path / "features"
    shutil.copytree(s["features"], feats)
    audio = dataclasses.asdict(s["cfg"].audio)
    train = [r for r in s["rows"] if r["split"] == "train"]
    rows = dict(audio_id=[r["audio_id"] for r in train] + ["v_dup", "t1"],
                audio_path=[r["audio_path"] for r in train] + [s["dup"], s["dup"]],  # t1 under another path
                captions=[r["captions"] for r in train] + [["unrelated"], ["x"]])
    decoded = []
    real = caps_mod.clip_features
    monkeypatch.setattr(caps_mod, "clip_features", lambda path, cfg: decoded.append(path) or real(path, cfg))

    def run(manifest_audio, **params):
        (feats / "_SUCCESS").write_text(json.dumps({"audio": manifest_audio}))
        cap = build_captioner("nearest", str(s["model"]), features=str(feats), **params)
        decoded.clear()
        out = cap(_batch(**rows))
        assert list(out["error"]) == [""] * len(rows["audio_id"])
        return cap.reuse, list(out["generated_caption"]), list(decoded)

    reuse, got, paths = run(audio)
    assert reuse and paths == [s["dup"], s["dup"]]  # only the clips that are not (id, path) of the bank
    for other in ({**audio, "duration": 2.0}, None):
        reuse_o, got_o, paths_o = run(other)
        assert not reuse_o and len(paths_o) == len(rows["audio_id"]) and got_o == got
    reuse_off, got_off, paths_off = run(audio, reuse_bank_embeddings=False)
    assert not reuse_off and len(paths_off) == len(rows["audio_id"]) and got_off == got


# -- each backend's own setup checks and identity (nothing loaded) ------------------------------------------------


def test_importing_the_package_loads_no_backend():
    """The registry names the backends; their modules (torch, transformers, PyAV) load only when asked for."""
    import subprocess
    import sys

    code = ("import sys, hci_atr.captioners as c; heavy = [m for m in ('torch', 'transformers', 'av', "
            "'hci_atr.captioners.blip', 'hci_atr.captioners.audio', 'hci_atr.captioners.nearest') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert c.captioner_class('audio').__module__ == 'hci_atr.captioners.audio'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_setup_is_each_backends_own_and_loads_no_model(tmp_path, blip_dir, nearest_setup, monkeypatch):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("check_setup must not load a model")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_load)
    s = nearest_setup
    blip, audio, nearest = (captioner_class(n) for n in ("blip", "audio", "nearest"))
    blip.check_setup(None, {})  # the default HF id
    blip.check_setup(str(blip_dir), {"num_frames": 2})
    audio.check_setup(str(blip_dir), {"num_beams": 1})  # the kind of model is only known once it loads
    nearest.check_setup(str(s["model"]), {"features": str(s["features"])})
    for cls, model, params, message in [
        (blip, str(blip_dir), {"num_frame": 2}, "captioner 'blip': unknown parameter\\(s\\) num_frame "),
        (blip, str(blip_dir), {"num_frames": 0}, "num_frames must be >= 1"),
        (blip, str(blip_dir), {"clip_seconds": 0}, "clip_seconds must be > 0"),
        (blip, str(blip_dir), {"merge": "vote"}, "merge rule 'vote'"),
        (blip, str(tmp_path / "nope"), {}, "model directory .*nope not found"),
        (audio, None, {}, "captioner 'audio' needs a model"),
        (audio, str(tmp_path), {}, "no config.json"),
        (audio, "x/y", {"beams": 3}, "unknown parameter\\(s\\) beams"),
        (nearest, None, {"features": str(s["features"])}, "needs --model"),
        (nearest, str(tmp_path / "m"), {"features": str(s["features"])}, "m not found"),
        (nearest, str(s["model"]), {}, "needs --features DIR"),
        (nearest, str(s["model"]), {"features": str(tmp_path / "f")}, "f not found"),
    ]:
        with pytest.raises(CaptionerError, match=message):
            cls.check_setup(model, params)
    with pytest.raises(CaptionerError, match="merge rule 'vote'"):  # the constructor checks it before loading
        build_captioner("blip", str(blip_dir), merge="vote")


def test_identity_is_what_changes_a_row(tmp_path, blip_dir, nearest_setup, monkeypatch):
    """Model and file parameters resolved to absolute paths, defaults filled in, operational parameters left out."""
    s = nearest_setup
    blip, audio, nearest = (captioner_class(n) for n in ("blip", "audio", "nearest"))
    assert blip.identity(None, {}) == {
        "captioner": "blip", "model": "Salesforce/blip-image-captioning-base",
        "params": {"num_frames": 3, "clip_seconds": 10.0, "max_new_tokens": 20, "num_beams": 3, "merge": "join"}}
    assert audio.identity("org/name", {"allow_download": True})["model"] == "org/name"  # an HF id stays as given
    monkeypatch.chdir(blip_dir.parent)
    rel = blip.identity(blip_dir.name, {"allow_download": True, "num_beams": 1})
    assert rel == {**blip.identity(str(blip_dir), {}), "params": {**blip.identity(None, {})["params"], "num_beams": 1}}
    monkeypatch.chdir(s["features"].parent)
    ident = nearest.identity(str(s["model"]), {"features": s["features"].name, "embed_batch_size": 2,
                                                "reuse_bank_embeddings": False})
    assert ident == {"captioner": "nearest", "model": str(s["model"]),
                     "params": {"features": str(s["features"]), "split": "train", "exclude_own_captions": True}}
    assert nearest.identity(str(s["model"]), {"features": str(s["features"]), "split": "val"}) != ident


def test_audio_decodes_only_the_kept_seconds(media, audio_dir, monkeypatch):
    """A long file is decoded up to max_seconds (the front end's bounded read), not whole and then cut."""
    import hci_atr.captioners.audio as audio_mod

    seen = []
    real = audio_mod.load_audio
    monkeypatch.setattr(audio_mod, "load_audio",
                        lambda path, sr, max_seconds=None: seen.append(max_seconds) or real(path, sr, max_seconds))
    wav = write_tone(media["root"] / "long.wav", 440, 3.0, 16000)
    cap = build_captioner("audio", str(audio_dir), max_seconds=1.0, **FAST)
    out = cap(_batch(audio_id=["long"], audio_path=[str(wav)]))
    assert seen == [1.0] and out["error"][0] == "" and out["generated_caption"][0]


# -- caption-all resume with other settings -----------------------------------------------------------------------


def _file_hashes(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.mark.ray
def test_caption_all_refuses_to_resume_with_other_settings(ray_session, nearest_setup, tmp_path):
    """A finished caption folder re-run with another captioner, model or row-changing parameter: one-line DataError,
    every file of the folder byte-for-byte as it was. The same settings (operational ones aside) resume it."""
    from workflows.caption import caption_all
    from workflows.settings import Settings

    s = nearest_setup
    train = [r for r in s["rows"] if r["split"] == "train"]
    data = tmp_path / "manifest.jsonl"
    data.write_text("\n".join(json.dumps({"id": r["audio_id"], "audio": r["audio_path"], "caption": r["captions"][0],
                                          "split": "train"}) for r in train), encoding="utf-8")
    cfg = Settings().override({"pipeline.num_workers": 1, "pipeline.batch_size": 2, "pipeline.rows_per_shard": 2})
    out = tmp_path / "captions"
    params = {"features": str(s["features"])}
    first = caption_all(data, out, captioner="nearest", model=str(s["model"]), params=params, cfg=cfg,
                        progress=False)
    assert first["rows"] == len(train) and first["computed_shards"] == 3
    assert first["identity"]["captioner"] == "nearest" and first["identity"]["model"] == str(s["model"])
    before = _file_hashes(out)
    assert {"part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "_SUCCESS"} <= set(before)

    other_model = tmp_path / "model_copy"
    shutil.copytree(s["model"], other_model)
    for k, (captioner, model, extra, changed) in enumerate([
        ("nearest", str(s["model"]), {"exclude_own_captions": False}, "params.exclude_own_captions"),
        ("nearest", str(s["model"]), {"split": "val"}, "params.split"),
        ("nearest", str(other_model), {}, "model"),
        ("blip", None, {}, "captioner"),  # refused before any model is loaded
    ]):
        # each case on its own byte-identical copy of the finished folder (a refused run's directory lock is only
        # released when its ShardedOutput is collected)
        folder = tmp_path / f"captions_{k}"
        shutil.copytree(out, folder)
        with pytest.raises(DataError, match=f"written with other settings \\(.*{changed}.*\\); .*start afresh") as e:
            caption_all(data, folder, captioner=captioner, model=model,
                        params={**(params if captioner == "nearest" else {}), **extra}, cfg=cfg, progress=False)
        assert "\n" not in str(e.value)
        assert _file_hashes(folder) == before, f"{captioner} {extra}: the folder changed"

    again = caption_all(data, out, captioner="nearest", model=str(s["model"]), cfg=cfg, progress=False,
                        params={**params, "embed_batch_size": 4, "reuse_bank_embeddings": False})
    assert again["computed_shards"] == 0 and again["rows"] == len(train)
    assert {k: v for k, v in _file_hashes(out).items() if k.startswith("part-")} == \
        {k: v for k, v in before.items() if k.startswith("part-")}


def test_read_captions_ignores_captions_below_the_models_confidence_threshold(tmp_path):
    """model.ac_min_confidence: a caption under the threshold is left out (the clip then has no AC); an unknown
    confidence (NaN: a backend without one) and shards written before the column are always kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hci_atr.data.shards import CAPTION_SCHEMA, read_captions

    out = tmp_path / "captions"
    out.mkdir()
    n = 4
    pq.write_table(pa.table({"audio_id": ["a", "b", "c", "d"], "generated_caption": ["ca", "cb", "cc", ""],
                             "captioner": ["nearest"] * n, "model": ["m"] * n, "params": ["{}"] * n,
                             "seconds": [0.0] * n, "confidence": [0.9, 0.2, math.nan, 0.95]}, schema=CAPTION_SCHEMA),
                   out / "part-00000.parquet")
    pq.write_table(pa.table({"audio_id": ["e"], "generated_caption": ["ce"]}), out / "part-00001.parquet")  # older
    assert read_captions(out) == {"a": "ca", "b": "cb", "c": "cc", "e": "ce"}  # "" never counts
    assert read_captions(out, 0.5) == {"a": "ca", "c": "cc", "e": "ce"}
    assert read_captions(out, 0.95) == {"c": "cc", "e": "ce"}


def test_nearest_bank_without_a_fold_never_lends_its_captions(nearest_setup):
    """Cross-fitting's bank: NearestBank.without(fold) drops the fold's clips and their caption embeddings; a
    captioner using it never returns a caption of a dropped clip."""
    import torch

    s = nearest_setup
    cap = build_captioner("nearest", str(s["model"]), features=str(s["features"]))
    full = cap.bank
    drop = full.ids[:2]
    part = full.without(drop)
    assert part.ids == full.ids[2:] and part.captions == full.captions[2:] and part.paths == full.paths[2:]
    torch.testing.assert_close(part.audio, full.audio[2:])
    n_drop = sum(len(c) for c in full.captions[:2])
    torch.testing.assert_close(part.text, full.text[n_drop:])
    cap.use_bank(part)
    train = [r for r in s["rows"] if r["split"] == "train"]
    out = cap({"audio_id": np.array([r["audio_id"] for r in train], dtype=object),
               "audio_path": np.array([r["audio_path"] for r in train], dtype=object),
               "captions": np.array([None] * len(train), dtype=object)})
    lent = {c for caps in full.captions[2:] for c in caps}
    assert all(c in lent for c in out["generated_caption"] if c)
    assert not {c for caps in full.captions[:2] for c in caps} & set(out["generated_caption"]) - lent

