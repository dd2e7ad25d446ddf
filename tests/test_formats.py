"""Dataset readers on small fixture folders written by the tests: every format, every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hci_atr.data.formats import Record, detect_format, read_dataset
from hci_atr.errors import DataError


def _wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(160, dtype=np.float32), 16000)
    return path


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


CLOTHO_HEADER = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"


def _clotho(root: Path) -> Path:
    for folder, names in (("development", ["a.wav", "b.wav"]), ("validation", ["c.wav"]), ("evaluation", ["d.wav"])):
        lines = [CLOTHO_HEADER]
        for n in names:
            _wav(root / folder / n)
            lines.append(f'{n},"{n} one, with comma",{n} two,{n} three,{n} four,{n} five\n')
        _write(root / f"clotho_captions_{folder}.csv", "".join(lines))
    return root


def test_clotho_reads_all_splits(tmp_path):
    root = _clotho(tmp_path / "clotho")
    assert detect_format(root) == "clotho"
    recs = read_dataset(root)
    assert [(r.audio_id, r.split) for r in recs] == [("a.wav", "train"), ("b.wav", "train"), ("c.wav", "val"),
                                                      ("d.wav", "test")]
    assert recs[0].captions == ("a.wav one, with comma", "a.wav two", "a.wav three", "a.wav four", "a.wav five")
    assert recs[0].audio_path == str((root / "development" / "a.wav").absolute())
    assert all(isinstance(r, Record) and r.video_path is None for r in recs)
    assert [r.audio_id for r in read_dataset(root, splits=["val", "test"])] == ["c.wav", "d.wav"]
    assert [r.audio_id for r in read_dataset(root, format="clotho", splits="test")] == ["d.wav"]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: (r / "clotho_captions_validation.csv").unlink(), "clotho_captions_validation.csv: file not found"),
    (lambda r: _write(r / "clotho_captions_validation.csv", "file_name,caption_1\nc.wav,x\n"),
     "missing column(s) caption_2"),
    (lambda r: _write(r / "clotho_captions_validation.csv", CLOTHO_HEADER + "c.wav,ok,ok,   ,ok,ok\n"),
     "row 1: field 'caption_3': empty caption"),
    (lambda r: _write(r / "clotho_captions_validation.csv", CLOTHO_HEADER + "c.wav,ok,ok,ok,ok,ok\nx.wav,é,a,b,c,d\n",
                      "latin-1"), "line 3: not valid UTF-8"),
    (lambda r: _write(r / "clotho_captions_validation.csv", CLOTHO_HEADER + "a.wav,ok,ok,ok,ok,ok\n"),
     "row 1: field 'file_name': duplicate id 'a.wav'"),
    (lambda r: (r / "validation" / "c.wav").unlink(), "row 1: field 'file_name': audio file 'c.wav' not found"),
])
def test_clotho_bad_input(tmp_path, mutate, message):
    root = _clotho(tmp_path / "clotho")
    mutate(root)
    with pytest.raises(DataError) as err:
        read_dataset(root, splits=["train", "val"])
    assert message in str(err.value)
    assert "clotho" in str(err.value)  # names the file


def test_unknown_split_and_format(tmp_path):
    root = _clotho(tmp_path / "clotho")
    with pytest.raises(DataError, match="unknown split 'training'"):
        read_dataset(root, splits=["training"])
    with pytest.raises(DataError, match="unknown dataset format 'kaldi'"):
        read_dataset(root, format="kaldi")
    with pytest.raises(DataError, match="dataset path not found"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        read_dataset(tmp_path)


AC_HEADER = "audiocap_id,youtube_id,start_time,caption\n"


def _audiocaps(root: Path) -> Path:
    _wav(root / "train" / "Yaaa.wav")
    _wav(root / "audio" / "val" / "bbb_30.flac")
    _wav(root / "test" / "ccc.ogg")
    _write(root / "videos" / "bbb.mp4", "not decoded")  # readers only check that the file is there
    _write(root / "train.csv", AC_HEADER + "1,aaa,0,a dog barks\n")
    _write(root / "val.csv", AC_HEADER + "2,bbb,30,rain falls\n3,bbb,30,it rains\n4,bbb,30.0,rain on a roof\n")
    _write(root / "test.csv", AC_HEADER + "5,ccc,10.5,a car passes\n")
    return root


def test_audiocaps_groups_captions_and_finds_files(tmp_path):
    root = _audiocaps(tmp_path / "ac")
    assert detect_format(root) == "audiocaps"
    recs = {r.audio_id: r for r in read_dataset(root)}
    assert set(recs) == {"aaa", "bbb", "ccc"}
    assert recs["bbb"].captions == ("rain falls", "it rains", "rain on a roof")
    assert recs["bbb"].split == "val" and recs["bbb"].start_time == 30.0
    assert recs["bbb"].audio_path.endswith("audio/val/bbb_30.flac")
    assert recs["bbb"].video_path.endswith("videos/bbb.mp4")
    assert recs["aaa"].audio_path.endswith("train/Yaaa.wav") and recs["aaa"].video_path is None
    assert recs["ccc"].audio_path.endswith("test/ccc.ogg") and recs["ccc"].start_time == 10.5


def test_audiocaps_explicit_audio_and_video_columns(tmp_path):
    root = tmp_path / "ac"
    _wav(root / "clips" / "x1.wav")
    _write(root / "v" / "x1.mp4", "not decoded")
    _write(root / "train.csv", "audiocap_id,youtube_id,start_time,caption,audio_path,video\n"
                               "1,xyz,0,a bird sings,clips/x1.wav,v/x1.mp4\n")
    (rec,) = read_dataset(root)
    assert rec.audio_path.endswith("clips/x1.wav") and rec.video_path.endswith("v/x1.mp4")


@pytest.mark.parametrize("csv_text, message", [
    ("audiocap_id,youtube_id,caption\n1,aaa,x\n", "missing column(s) start_time"),
    (AC_HEADER + "1,aaa,0,a dog\n2,aaa,0,\n", "row 2: field 'caption': empty caption"),
    (AC_HEADER + "1,aaa,0,a dog\n1,aaa,0,again\n", "row 2: field 'audiocap_id': duplicate id '1'"),
    (AC_HEADER + "1,aaa,0,a dog\n2,aaa,20,other clip\n", "row 2: field 'youtube_id': duplicate id 'aaa'"),
    (AC_HEADER + "1,aaa,zero,a dog\n", "row 1: field 'start_time'"),
    (AC_HEADER + "1,zzz,0,a dog\n", "row 1: field 'youtube_id': no audio file for 'zzz'"),
])
def test_audiocaps_bad_input(tmp_path, csv_text, message):
    root = _audiocaps(tmp_path / "ac")
    _write(root / "train.csv", csv_text)
    with pytest.raises(DataError) as err:
        read_dataset(root, splits=["train"])
    assert message in str(err.value) and "train.csv" in str(err.value)


def test_audiocaps_missing_split_file(tmp_path):
    root = _audiocaps(tmp_path / "ac")
    (root / "test.csv").unlink()
    assert {r.split for r in read_dataset(root)} == {"train", "val"}
    with pytest.raises(DataError, match="test.csv: file not found"):
        read_dataset(root, splits=["test"])


def test_manifest_jsonl_and_csv(tmp_path):
    _wav(tmp_path / "sub" / "one.wav")
    _wav(tmp_path / "two.flac")
    _write(tmp_path / "vid.mp4", "not decoded")
    m = _write(tmp_path / "sub" / "m.jsonl", "\n".join([
        json.dumps({"audio": "one.wav", "caption": "  a   bell rings "}),
        "",
        json.dumps({"audio": str(tmp_path / "two.flac"), "captions": ["x", "y"], "split": "validation",
                    "id": "second", "video": "../vid.mp4"}),
    ]) + "\n")
    recs = read_dataset(m)
    assert [(r.audio_id, r.split, r.captions) for r in recs] == [("one", "train", ("a bell rings",)),
                                                                ("second", "val", ("x", "y"))]
    assert recs[1].video_path == str((tmp_path / "vid.mp4").absolute())
    c = _write(tmp_path / "m.csv", "audio,captions,split\nsub/one.wav,first|second,test\ntwo.flac,only,train\n")
    recs = read_dataset(c, splits=["test"])
    assert [(r.audio_id, r.split, r.captions) for r in recs] == [("one", "test", ("first", "second"))]
    # a folder holding manifest.csv reads as a manifest
    _write(tmp_path / "d" / "manifest.csv", "audio,caption\n../two.flac,a hiss\n")
    assert detect_format(tmp_path / "d") == "manifest"
    assert read_dataset(tmp_path / "d")[0].captions == ("a hiss",)


@pytest.mark.parametrize("name, text, message", [
    ("m.jsonl", '{"audio": "a.wav", "caption": "ok"}\n{"audio": "a.wav", "caption": "dup"}\n',
     "line 2: field 'id': duplicate id 'a'"),
    ("m.jsonl", '{"audio": "a.wav", "caption": "ok"}\n\n{"audio": "b.wav", "captions": ["x", " "]}\n',
     "line 3: field 'captions': empty caption"),
    ("m.jsonl", '{"audio": "a.wav"}\n', "line 1: field 'caption' is missing"),
    ("m.jsonl", '{"audio": "a.wav", "caption": "ok"\n', "line 1: not valid JSON"),
    ("m.jsonl", '{"audio": "nothere.wav", "caption": "ok"}\n', "line 1: field 'audio': audio file 'nothere.wav'"),
    ("m.jsonl", '{"audio": "a.wav", "caption": "ok", "split": "holdout"}\n', "line 1: field 'split': unknown split"),
    ("m.csv", "audio,caption\na.wav,ok\nb.wav,\n", "row 2: field 'caption': empty caption"),
    ("m.csv", "audio,text\na.wav,ok\n", "missing column caption"),
    ("m.csv", "path,caption\na.wav,ok\n", "missing column(s) audio"),
    ("m.csv", "audio,caption,id\na.wav,ok,k\nb.wav,ok,k\n", "row 2: field 'id': duplicate id 'k'"),
])
def test_manifest_bad_input(tmp_path, name, text, message):
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav")
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        read_dataset(path)
    assert message in str(err.value) and name in str(err.value)


def test_manifest_non_utf8_and_missing(tmp_path):
    _wav(tmp_path / "a.wav")
    path = _write(tmp_path / "m.csv", "audio,caption\na.wav,ok\na.wav,caf\xe9\n", "latin-1")
    with pytest.raises(DataError, match=r"m.csv: line 3: not valid UTF-8"):
        read_dataset(path)
    with pytest.raises(DataError, match="dataset path not found"):
        read_dataset(tmp_path / "missing.jsonl")
    good = _write(tmp_path / "g.jsonl", '{"audio": "a.wav", "caption": "ok"}\n')
    with pytest.raises(DataError, match="no rows in requested split"):
        read_dataset(good, splits=["test"])


def test_reading_is_fast_enough_for_large_csv(tmp_path):
    """A 3000-clip Clotho folder parses without decoding audio: each audio file is listed, not opened."""
    root = tmp_path / "big"
    (root / "development").mkdir(parents=True)
    lines = [CLOTHO_HEADER]
    for i in range(3000):
        (root / "development" / f"{i}.wav").write_bytes(b"")  # never decoded by the reader
        lines.append(f"{i}.wav,a,b,c,d,e\n")
    _write(root / "clotho_captions_development.csv", "".join(lines))
    recs = read_dataset(root)
    assert len(recs) == 3000 and recs[-1].audio_id == "2999.wav"


def test_features_with_another_front_end_are_refused(tmp_path):
    """A cnn14 (PANNs front end) model must not train on / be evaluated with HTK log-mels."""
    import json

    from hci_atr.config import AudioConfig
    from hci_atr.data.shards import audio_config_dict, check_features_match
    from hci_atr.errors import ConfigError

    feats = tmp_path / "features"
    feats.mkdir()
    (feats / "_SUCCESS").write_text(json.dumps({"stage": "features", "audio": audio_config_dict(AudioConfig())}))
    check_features_match(feats, AudioConfig())  # same front end: fine
    check_features_match(feats, AudioConfig(duration=10.0))  # a crop length is not a front end
    with pytest.raises(ConfigError, match=r"another audio front end.*frontend 'htk' vs 'panns'"):
        check_features_match(feats, AudioConfig(frontend="panns"))
    with pytest.raises(ConfigError, match="sample_rate"):
        check_features_match(feats, AudioConfig(sample_rate=16000))
    old = {k: v for k, v in audio_config_dict(AudioConfig()).items() if k != "frontend"}  # before front ends had names
    (feats / "_SUCCESS").write_text(json.dumps({"stage": "features", "audio": old}))
    check_features_match(feats, AudioConfig())
    with pytest.raises(ConfigError, match="frontend"):
        check_features_match(feats, AudioConfig(frontend="panns"))


def test_features_identity_covers_splits_and_captions():
    from hci_atr.data.formats import Record
    from workflows.features import records_digest

    a = [Record("x", "/a/x.wav", "train", ("a dog",)), Record("y", "/a/y.wav", "test", ("rain",))]
    assert records_digest(a) == records_digest(list(reversed(a)))  # the order a dataset lists its rows in: same
    assert records_digest(a) != records_digest([a[0], Record("y", "/a/y.wav", "val", ("rain",))])
    assert records_digest(a) != records_digest([a[0], Record("y", "/a/y.wav", "test", ("rain falls",))])
