"""Retriever + index (library, no Ray): index round trip, exact scan, rerank order = the model's own full score,
audio search, errors. The tiny model is trained a few steps on the demo data through the model's own loss and loaded
back through ``HciAtrModel.from_pretrained``, the path users take."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hci_atr.config import Config
from hci_atr.errors import DataError, ModelLoadError, RequestError
from hci_atr.index import Index, embed_items, items_from_audio_dir, items_from_records, mel_from_wave, write_index
from hci_atr.retriever import Retriever, top_k_exact


def tiny_config(text_dir, ac: bool = True) -> Config:
    return Config().override({
        "audio.sample_rate": 16000, "audio.duration": 2.0, "model.audio_width": 8, "model.embed_dim": 32,
        "model.text_encoder": str(text_dir), "model.freeze_text": False, "model.ac_branch": ac,
        "model.ac_fusion": ac, "model.segment_size": 4, "model.segment_stride": 2})


def build_trained_model(demo_root, text_dir, out_dir, steps: int = 50, ac: bool = True, seed: int = 0):
    """A tiny HciAtrModel trained ``steps`` Adam steps on the demo train split; saved and loaded back.

    Generated captions (AC) come from an 'oracle' captioner: each clip's last reference caption. Returns
    (model_dir, records, generated {audio_id: caption})."""
    from hci_atr.data.audio import load_audio
    from hci_atr.data.formats import read_dataset
    from hci_atr.models.model import HciAtrModel

    records = read_dataset(demo_root)
    generated = {r.audio_id: r.captions[-1] for r in records}
    if (out_dir / "model.safetensors").exists():  # shared by the test files of one session (save is atomic)
        return out_dir, records, generated
    torch.manual_seed(seed)
    cfg = tiny_config(text_dir, ac)
    train = [r for r in records if r.split == "train"]
    mels, masks = zip(*(mel_from_wave(load_audio(r.audio_path, cfg.audio.sample_rate), cfg.audio) for r in train))
    mel, mask = torch.from_numpy(np.stack(mels)), torch.from_numpy(np.stack(masks))
    model = HciAtrModel(cfg)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    keys = torch.arange(len(train), dtype=torch.float64)
    aux = model.tokenize([generated[r.audio_id] for r in train]) if ac else None
    for _ in range(steps):
        caps = [r.captions[int(torch.randint(0, len(r.captions) - 1, (1,), generator=g))] for r in train]
        loss = model(mel, mask, model.tokenize(caps), keys, keys, aux=aux).losses["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out_dir)
    return out_dir, records, generated


def shared_model_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny_trained_hci_ac"


@pytest.fixture(scope="module")
def built(demo_root, tiny_text_dir, tmp_path_factory):
    from hci_atr.models.model import HciAtrModel

    root = tmp_path_factory.mktemp("retr")
    model_dir, records, generated = build_trained_model(demo_root, tiny_text_dir, shared_model_dir(tmp_path_factory))
    model = HciAtrModel.from_pretrained(model_dir)
    items = items_from_records(records, generated)
    spec, arrays, kept, errors = embed_items(model, items, batch_size=8)
    assert not errors and len(kept) == len(items)
    write_index(root / "index", model, spec, arrays, kept, model_dir=str(model_dir))
    return model_dir, root / "index", model, records, generated


def test_index_layout_and_round_trip(built):
    model_dir, index_dir, model, records, generated = built
    idx = Index.load(index_dir)
    n = len(records)
    assert len(idx) == n and idx.clip.shape == (n, 32) and idx.clip.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(idx.clip, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["n_captions"] == sum(len(r.captions) + 1 for r in records)
    assert idx.caption_emb.shape == (manifest["n_captions"], 32)
    assert set(idx.metadata.columns) >= {"id", "path", "duration", "captions", "generated_caption"}
    assert abs(float(idx.metadata["duration"].iloc[0]) - 2.0) < 1e-3
    # stored embeddings of 3 rows == the model's encode_audio on those files, computed now
    rows = [5, 0, 17]
    a = idx.audio_embeddings(rows)
    r = Retriever(model, idx)
    for i, row in enumerate(rows):
        rec = records[row]
        direct = r.encode_audio(rec.audio_path, generated[rec.audio_id])
        torch.testing.assert_close(a.frames[i], direct.frames[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.segments[i], direct.segments[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.aux_sentence[i], direct.aux_sentence[0], atol=1e-5, rtol=1e-4)
        assert bool(a.aux_mask[i])
    # no temp dirs left beside the index
    assert [p.name for p in index_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_top_k_exact_matches_full_sort():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1000, 16)).astype(np.float32)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    rows, scores = top_k_exact(m, q, 7)
    full = q @ m.T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :7], rtol=1e-6)
    assert top_k_exact(m, q[0], 5000)[0].shape == (1, 1000)


def test_rerank_order_is_the_models_full_score(built):
    model_dir, index_dir, model, records, generated = built
    r = Retriever.from_pretrained(model_dir, index_dir, retrieve_k=12)
    query = [x for x in records if x.split == "test"][0].captions[0]
    plain = r.search_text(query, top_k=12, rerank=False)
    rer = r.search_text(query, top_k=12, rerank=True)
    assert rer.reranked and not plain.reranked
    assert set(rer.timings) >= {"encode_ms", "retrieve_ms", "rerank_ms", "total_ms"}
    assert all(v >= 0 for v in rer.timings.values())
    # same candidate set (top 12 by clip score), order by the full score computed directly from the audio files
    assert {h.id for h in plain} == {h.id for h in rer}
    by_id = {x.audio_id: x for x in records}
    a = [r.encode_audio(by_id[h.id].audio_path, generated[h.id]) for h in rer]
    with torch.no_grad():
        t = model.encode_text(model.tokenize([query]))
        direct = [float(model.score(x, t).fused[0, 0]) for x in a]
    np.testing.assert_allclose([h.score for h in rer], direct, atol=1e-4)
    assert all(direct[i] >= direct[i + 1] - 1e-6 for i in range(len(direct) - 1))
    assert set(rer[0].levels) == {"clip", "segment", "frame", "ac_branch"}
    # stage-1 scores are sorted and equal the cosine of the query with the clip embedding
    assert [h.clip_score for h in plain] == sorted((h.clip_score for h in plain), reverse=True)
    q = r.embed_text([query])[0]
    np.testing.assert_allclose(plain[0].clip_score, float(r.index.clip[r.index.row_of[plain[0].id]] @ q), atol=1e-5)
    # the two orders differ on this query (otherwise the test would not show reranking does anything)
    assert [h.id for h in plain] != [h.id for h in rer]


def test_search_audio_finds_itself_and_its_captions(built):
    model_dir, index_dir, model, records, generated = built
    r = Retriever.from_pretrained(model_dir, index_dir)
    rec = records[3]
    raw = open(rec.audio_path, "rb").read()
    hits = r.search_audio(raw, top_k=3)
    # the query has no generated caption (AC fusion off for it), so the match is near 1, not exactly 1
    assert hits[0].id == rec.audio_id and hits[0].score > max(0.9, hits[1].score)
    q = r.embed_audio(raw)
    assert hits[0].score == pytest.approx(float(r.index.clip[r.index.row_of[rec.audio_id]] @ q), abs=1e-5)
    caps = r.search_audio(rec.audio_path, top_k=5, target="captions")
    assert len(caps) == 5 and all(h.kind == "caption" and h.text for h in caps)
    assert [h.score for h in caps] == sorted((h.score for h in caps), reverse=True)
    emb = r.embed_audio(rec.audio_path)
    assert emb.shape == (32,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5


def test_errors(built, tmp_path):
    model_dir, index_dir, model, records, generated = built
    r = Retriever(model, Index.load(index_dir))
    with pytest.raises(RequestError, match="empty"):
        r.search_text("   ", 5)
    with pytest.raises(RequestError, match="top_k"):
        r.search_text("a beep", 0)
    with pytest.raises(RequestError, match="not in the index") as e:
        r.clip_path("../../etc/passwd")
    assert e.value.status_code == 404
    with pytest.raises(DataError, match="not an index"):
        Index.load(tmp_path)
    with pytest.raises(DataError, match="decode"):
        r.search_audio(b"not audio at all", 3)
    with pytest.raises(ModelLoadError, match="not found"):
        Retriever.from_pretrained(tmp_path / "nope", index_dir)
    with pytest.raises(DataError, match="no audio files"):
        items_from_audio_dir(tmp_path)
