"""`hci-atr evaluate`: the compositional pairs (--pairs) on a tiny demo with pairs in its test split, and the
evaluation's audio batches bounded by seconds of audio with the same embeddings. No Ray: the features are written by
the extract-features backend called directly."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hci_atr.config import Config
from hci_atr.data.shards import FEATURE_SCHEMA


@pytest.fixture(scope="module")
def pair_demo(tmp_path_factory, tiny_text_dir):
    """(model dir, features dir, pair file, test pairs in the file) of a 24-clip demo made with pairs_in_split."""
    from hci_atr.data.demo import make_demo
    from hci_atr.data.formats import read_dataset
    from hci_atr.models.model import HciAtrModel
    from workflows.features import FeatureExtractor

    root = tmp_path_factory.mktemp("pair_demo")
    make_demo(root / "data", seed=1, size=24, duration=2.0, sample_rate=16000, progress=False, pairs_in_split=True)
    cfg = Config().override({"audio.sample_rate": 16000, "audio.duration": 2.0, "model.text_encoder": str(tiny_text_dir),
                             "model.audio_width": 4, "model.embed_dim": 16, "model.max_words": 16,
                             "train.batch_size": 8})
    recs = read_dataset(root / "data")
    table = pa.table({"audio_id": [r.audio_id for r in recs], "audio_path": [r.audio_path for r in recs],
                      "split": [r.split for r in recs], "captions": [list(r.captions) for r in recs]})
    feats = FeatureExtractor(cfg.audio)(table)
    assert set(feats.column("error").to_pylist()) == {""}
    (root / "features").mkdir()
    pq.write_table(feats.select(FEATURE_SCHEMA.names).cast(FEATURE_SCHEMA), root / "features" / "part-00000.parquet")
    torch.manual_seed(0)
    HciAtrModel(cfg).save_pretrained(root / "model")
    pairs_file = root / "data" / "demo_pairs.json"
    test_pairs = [p for p in json.loads(pairs_file.read_text()) if p["split"] == "test"]
    assert test_pairs, "the demo's test split should hold pairs with pairs_in_split"
    return root / "model", root / "features", pairs_file, test_pairs


def test_evaluate_pairs_adds_pair_accuracy_per_type(pair_demo, capsys):
    from hci_atr.data.pairs import read_pairs
    from hci_atr.data.shards import read_split_rows
    from hci_atr.metrics import pair_accuracy
    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import embed_split
    from workflows.cli import main
    from workflows.evaluate import evaluate, format_table

    model_dir, feats, pairs_file, test_pairs = pair_demo
    plain = evaluate(model_dir, feats, "test").metrics
    res = evaluate(model_dir, feats, "test", pairs_file=pairs_file)
    m = res.metrics
    # the retrieval metrics are untouched; only pairs_* keys are added
    assert {k: v for k, v in m.items() if not k.startswith("pairs_")} == plain
    assert m["pairs_n"] == len(test_pairs)
    types = {p["type"] for p in test_pairs}
    for t in types:
        assert m[f"pairs_{t}_n"] == sum(p["type"] == t for p in test_pairs)
        assert 0.0 <= m[f"pairs_{t}_acc"] <= 1.0
    assert 0.0 <= m["pairs_acc"] <= 1.0
    # the same numbers as the library's pair accuracy on the full fused score
    model = HciAtrModel.from_pretrained(model_dir).eval()
    rows = read_split_rows(feats, "test")
    with torch.no_grad():
        emb = embed_split(model, rows, model.cfg)
        fused = model.score(emb.audio, emb.text).fused
    want = pair_accuracy(fused, emb.text_to_audio, read_pairs(pairs_file, emb.audio_ids))
    assert {k: v for k, v in m.items() if k.startswith("pairs_")} == pytest.approx(want)
    # reranking does not change the pair scores (a pair is two clips' full scores for one caption)
    rr = evaluate(model_dir, feats, "test", rerank_k=3, pairs_file=pairs_file).metrics
    assert {k: v for k, v in rr.items() if k.startswith("pairs_")} == pytest.approx(want)
    table = format_table(res)
    assert "pair accuracy (chance 0.50): all " in table and f"(n={len(test_pairs)})" in table

    # the command: --pairs FILE -> the metrics JSON carries them
    main(["evaluate", "--model", str(model_dir), "--features", str(feats), "--pairs", str(pairs_file), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["pairs_acc"] == pytest.approx(m["pairs_acc"]) and printed["pairs_n"] == len(test_pairs)


def test_evaluate_malformed_pairs_is_one_line(pair_demo, tmp_path, capsys):
    from workflows.cli import main

    model_dir, feats, _, _ = pair_demo
    bad = tmp_path / "pairs.json"
    for text, says in (('[{"a": "x.wav", "b": "y.wav", "type": "colour"}]', "field 'type'"),
                       ("{not json", "not a readable JSON pair file"),
                       ('{"a": "x.wav"}', "expected a JSON list of pairs")):
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            main(["evaluate", "--model", str(model_dir), "--features", str(feats), "--pairs", str(bad)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err and str(bad) in err


def test_embed_split_audio_batches_are_bounded_by_seconds_with_the_same_embeddings(tiny_text_dir):
    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import embed_split
    from hci_atr.training.evaluation import audio_batch_size
    from model_helpers import tiny_cfg, tiny_rows

    cfg = tiny_cfg(tiny_text_dir, **{"model.temporal_context": "gru"})  # 0.64 s clips
    assert audio_batch_size(cfg, 32, 160.0) == 32  # 250 clips would fit: the batch size decides
    assert audio_batch_size(cfg.override({"audio.duration": 30.0}), 32, 160.0) == 5
    assert audio_batch_size(cfg.override({"audio.duration": 5.0}), 32, 160.0) == 32
    assert audio_batch_size(cfg.override({"audio.duration": 30.0}), 32, 10.0) == 1  # never below one clip
    torch.manual_seed(0)
    model = HciAtrModel(cfg).eval()
    rows = tiny_rows(7)
    seen: list[int] = []
    encode = model.encode_audio

    def spy(mel, *args, **kwargs):
        seen.append(mel.shape[0])
        return encode(mel, *args, **kwargs)

    model.encode_audio = spy
    bounded = embed_split(model, rows, cfg, batch_size=8, audio_seconds=1.3)  # 2 clips of 0.64 s per forward
    assert seen == [2, 2, 2, 1]
    seen.clear()
    one = embed_split(model, rows, cfg, batch_size=1)
    assert seen == [1] * 7
    seen.clear()
    whole = embed_split(model, rows, cfg, batch_size=7)
    assert seen == [7]
    for a in (bounded, one):
        for x, y in zip(whole.audio._values(), a.audio._values()):  # clip, segments, frames and their masks
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.text.sentence, whole.text.sentence, atol=1e-5, rtol=1e-5)
        assert a.text_to_audio.tolist() == whole.text_to_audio.tolist() and a.captions == whole.captions


def test_evaluate_refuses_features_of_another_front_end(pair_demo, tmp_path, capsys):
    """A cnn14-style model (PANNs front end) evaluated on HTK log-mels is a one-line error, never a silent mismatch."""
    import shutil

    from hci_atr.data.shards import audio_config_dict
    from hci_atr.models.model import HciAtrModel
    from workflows.cli import main

    model_dir, feats, _, _ = pair_demo
    mine = tmp_path / "features"
    shutil.copytree(feats, mine)
    model = HciAtrModel.from_pretrained(model_dir)
    (mine / "_SUCCESS").write_text(json.dumps({"stage": "features", "audio": audio_config_dict(model.cfg.audio)}))
    panns = tmp_path / "panns_model"
    from dataclasses import replace

    HciAtrModel(type(model.cfg)(audio=replace(model.cfg.audio, frontend="panns"), model=model.cfg.model,
                                train=model.cfg.train)).save_pretrained(panns)
    capsys.readouterr()  # what building the models printed
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", str(panns), "--features", str(mine)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another audio front end" in err and "frontend 'htk' vs 'panns'" in err
