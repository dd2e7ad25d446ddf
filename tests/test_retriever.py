"""Retriever + index (library, no Ray): index round trip, exact scan, rerank order = the model's own full score,
audio search, errors. The tiny model is trained a few steps on the demo data through the model's own loss and loaded
back through ``HciAtrModel.from_pretrained``, the path users take."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workflows.settings import Settings
from hci_atr.data.audio import wave_features
from hci_atr.errors import ConfigError, DataError, ModelLoadError, NotFoundError, QueryError
from hci_atr.search.embed import embed_items
from hci_atr.search.index import Index, IndexWriter, write_index
from hci_atr.search.items import items_from_audio_dir, items_from_records
from hci_atr.search.retriever import Retriever
from hci_atr.search.scan import Scanner, set_threads, top_k_exact


def tiny_config(text_dir, ac: bool = True) -> Settings:
    return Settings().override({
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
    mels, masks = zip(*(wave_features(load_audio(r.audio_path, cfg.audio.sample_rate), cfg.audio) for r in train))
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
    emb = embed_items(model, items, batch_size=8)
    assert not emb.errors and len(emb.items) == len(items)
    write_index(root / "index", model, emb.arrays, emb.items, model_dir=str(model_dir))
    return model_dir, root / "index", model, records, generated


def test_index_layout_and_round_trip(built):
    model_dir, index_dir, model, records, generated = built
    idx = Index.load(index_dir)
    n = len(records)
    assert len(idx) == n and idx.clip.shape == (n, 32) and idx.clip.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(idx.clip, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((idx.path / "manifest.json").read_text())
    assert manifest["n_captions"] == sum(len(r.captions) + 1 for r in records)
    assert idx.caption_emb.shape == (manifest["n_captions"], 32)
    assert set(idx.metadata.columns) >= {"id", "path", "duration", "captions", "generated_caption"}
    assert abs(float(idx.metadata["duration"].iloc[0]) - 2.0) < 1e-3
    # version 2: unit-level tensors (segments, frames) stored float16 by default, per-clip vectors float32
    assert manifest["version"] == 2 and manifest["unit_dtype"] == "float16"
    stored = {k: np.load(idx.path / f, mmap_mode="r").dtype for k, f in manifest["files"].items()}
    assert stored["frames"] == np.float16 and stored["segments"] == np.float16
    assert stored["clip"] == np.float32 and stored["aux_sentence"] == np.float32 and stored["frame_mask"] == bool
    # stored embeddings of 3 rows == the model's encode_audio on those files, computed now (float16 rounding:
    # at most half a float16 step, 2**-12, for values in [-1, 1])
    rows = [5, 0, 17]
    a = idx.audio_embeddings(rows)
    assert a.frames.dtype == torch.float32 and a.segments.dtype == torch.float32
    r = Retriever(model, idx)
    for i, row in enumerate(rows):
        rec = records[row]
        direct = r.encode_audio(rec.audio_path, generated[rec.audio_id])
        torch.testing.assert_close(a.frames[i], direct.frames[0], atol=2.5e-4, rtol=0)
        torch.testing.assert_close(a.segments[i], direct.segments[0], atol=2.5e-4, rtol=0)
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
    with pytest.raises(QueryError, match="empty"):
        r.search_text("   ", 5)
    with pytest.raises(QueryError, match="top_k"):
        r.search_text("a beep", 0)
    with pytest.raises(NotFoundError, match="not in the index"):
        r.clip_path("../../etc/passwd")
    with pytest.raises(QueryError, match="no words"):  # the library refuses a word-less query as the HTTP edge does
        r.search_text("\u200b\u200b", 5)
    with pytest.raises(DataError, match="not an index"):
        Index.load(tmp_path)
    with pytest.raises(DataError, match="decode"):
        r.search_audio(b"not audio at all", 3)
    with pytest.raises(ModelLoadError, match="not found"):
        Retriever.from_pretrained(tmp_path / "nope", index_dir)
    with pytest.raises(DataError, match="no audio files"):
        items_from_audio_dir(tmp_path)


def test_batched_writer_and_float32_units(built, tmp_path):
    """IndexWriter fed in uneven batches == write_index in one go; float32 units are stored exactly; a batch with
    fewer frames is zero-padded with the padding masked out; a bad batch leaves nothing behind."""
    model_dir, index_dir, model, records, generated = built
    items = items_from_records(records, generated)
    emb = embed_items(model, items, batch_size=8)
    arrays, kept = emb.arrays, emb.items
    write_index(tmp_path / "one", model, arrays, kept, unit_dtype="float32")
    cut = arrays["frames"].shape[1] - 3
    with IndexWriter(tmp_path / "many", model, unit_dtype="float32") as w:
        for lo, hi in ((0, 5), (5, 19), (19, len(kept))):
            part = {k: v[lo:hi] for k, v in arrays.items()}
            if lo == 5:  # this batch's clips have 3 frames fewer
                part["frames"], part["frame_mask"] = part["frames"][:, :cut], part["frame_mask"][:, :cut]
            w.add(part, kept[lo:hi])
    one, many = Index.load(tmp_path / "one"), Index.load(tmp_path / "many")
    for k, v in arrays.items():
        np.testing.assert_array_equal(one.audio[k], v)  # float32: stored exactly
    for k in arrays:
        if k not in ("frames", "frame_mask"):
            np.testing.assert_array_equal(many.audio[k], one.audio[k])
    outside = np.r_[0:5, 19:len(kept)]
    np.testing.assert_array_equal(many.audio["frames"][outside], one.audio["frames"][outside])
    np.testing.assert_array_equal(many.audio["frames"][5:19, :cut], one.audio["frames"][5:19, :cut])
    assert not many.audio["frames"][5:19, cut:].any() and not many.audio["frame_mask"][5:19, cut:].any()
    np.testing.assert_array_equal(many.clip, one.clip)
    np.testing.assert_allclose(many.caption_emb, one.caption_emb, atol=1e-6)
    assert many.ids == one.ids and many.captions["text"].tolist() == one.captions["text"].tolist()
    # the padded frames do not count: the full score of a cut clip equals the model's score on the cut embeddings
    text = model.encode_text(model.tokenize([records[7].captions[0]]))
    a = many.audio_embeddings([7])
    cut_a = one.audio_embeddings([7])
    cut_a.frames, cut_a.frame_mask = cut_a.frames[:, :cut], cut_a.frame_mask[:, :cut]
    with torch.no_grad():
        assert float(model.score(a, text).fused) == pytest.approx(float(model.score(cut_a, text).fused), abs=1e-6)
    with pytest.raises(DataError, match="different structure"):
        with IndexWriter(tmp_path / "bad", model) as w:
            w.add(arrays, kept)
            w.add({k: v for k, v in arrays.items() if not k.startswith("aux")}, kept)
    with pytest.raises(ConfigError, match="float16 or float32"):
        IndexWriter(tmp_path / "bad", model, unit_dtype="int8")
    assert not (tmp_path / "bad").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # float16 and float32 unit storage rank the same candidates with scores within float16 rounding
    r16, r32 = Retriever(model, Index.load(index_dir)), Retriever(model, one)
    for rec in records[:6]:
        h16, h32 = r16.search_text(rec.captions[0], top_k=10), r32.search_text(rec.captions[0], top_k=10)
        assert {h.id for h in h16} == {h.id for h in h32}
        s32 = {h.id: h.score for h in h32}
        assert max(abs(h.score - s32[h.id]) for h in h16) < 2e-3


def test_index_warm_advises_every_array_file(built):
    import os

    idx = Index.load(built[1])
    files = idx.files()
    assert {f.name for f in files} >= {"clip.npy", "caption_emb.npy"} and len(files) == 2 + len(idx.audio)
    expected = sum(f.stat().st_size for f in files) if hasattr(os, "posix_fadvise") else 0
    assert idx.warm() == expected > 0 or not hasattr(os, "posix_fadvise")


def test_index_versions(built, tmp_path):
    """A version-1 index (all float32, no unit_dtype) still loads; an unknown version is refused in one line."""
    import shutil

    model_dir, index_dir, model, records, generated = built
    v1 = tmp_path / "v1"
    shutil.copytree(Index.load(index_dir).path, v1)  # one version's files: the unversioned layout
    manifest = json.loads((v1 / "manifest.json").read_text())
    for f in manifest["files"].values():
        arr = np.load(v1 / f)
        np.save(v1 / f, arr.astype(np.float32) if arr.dtype == np.float16 else arr)
    manifest["version"] = 1
    del manifest["unit_dtype"]
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    old, new = Index.load(v1), Index.load(index_dir)
    assert old.audio["frames"].dtype == np.float32
    torch.testing.assert_close(old.audio_embeddings([3, 1]).frames, new.audio_embeddings([3, 1]).frames)
    manifest["version"] = 3
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"v3 is not hci-atr-index v1, v2; rebuild the index"):
        Index.load(v1)


def test_search_text_batch_equals_per_query(built):
    model_dir, index_dir, model, records, generated = built
    r = Retriever.from_pretrained(model_dir, index_dir, retrieve_k=12)
    test = [x for x in records if x.split == "test"]
    queries = [test[0].captions[0], "a beep", test[1].captions[2], test[2].captions[1] + " and then silence",
               test[3].captions[0], "rain"]
    ks, reranks = [3, 10, 5, 12, 1, 7], [True, True, False, True, False, True]
    batch = r.search_text_batch(queries, top_k=ks, rerank=reranks)
    assert len(batch) == len(queries)
    for q, k, rr, res in zip(queries, ks, reranks, batch):
        one = r.search_text(q, top_k=k, rerank=rr)
        assert res.reranked is rr and len(res) == k
        assert [(h.rank, h.id) for h in res] == [(h.rank, h.id) for h in one]
        np.testing.assert_allclose([h.score for h in res], [h.score for h in one], atol=1e-5)
        np.testing.assert_allclose([h.clip_score for h in res], [h.clip_score for h in one], atol=1e-5)
        for a, b in zip(res, one):
            assert a.levels.keys() == b.levels.keys() and a.captions == b.captions
            np.testing.assert_allclose(list(a.levels.values()), list(b.levels.values()), atol=1e-5)
        assert set(res.timings) >= {"encode_ms", "retrieve_ms", "rerank_ms", "hits_ms", "total_ms"}
    # one top_k for all; the shared stages are timed once for the batch
    same = r.search_text_batch(queries[:3], top_k=4)
    assert [len(x) for x in same] == [4, 4, 4] and len({x.timings["retrieve_ms"] for x in same}) == 1
    assert r.search_text_batch([]) == []
    with pytest.raises(QueryError, match="2 values for 3 queries"):
        r.search_text_batch(queries[:3], top_k=[1, 2])
    with pytest.raises(QueryError, match="empty"):
        r.search_text_batch(["a beep", "  "])


def test_scan_backends():
    """numpy and FAISS exact agree; faiss-fp16 finds rows whose true scores are the exact top within 1e-3; IVF
    visiting every list is exact, fewer lists is approximate and may return fewer rows (-1)."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((3000, 32)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = rng.standard_normal((5, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact_rows, exact_scores = top_k_exact(m, q, 20)
    assert Scanner(m, "numpy").backend == "numpy"
    with pytest.raises(ConfigError, match="serve.scan"):
        Scanner(m, "hnsw")
    pytest.importorskip("faiss")
    flat = Scanner(m, "faiss")
    assert flat.backend == "faiss" and flat.exact and Scanner(m, "auto").backend == "faiss"
    rows, scores = flat.search(q, 20)  # 5 queries: one BLAS product
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    for i in range(len(q)):  # one query: FAISS's own scan
        rows, scores = flat.search(q[i], 20)
        np.testing.assert_array_equal(rows[0], exact_rows[i])
        np.testing.assert_allclose(scores[0], exact_scores[i], atol=1e-5)
    fp16 = Scanner(m, "faiss-fp16")
    rows, scores = fp16.search(q, 20)
    assert not fp16.exact
    np.testing.assert_allclose(scores, exact_scores, atol=1e-3)
    true = np.take_along_axis(q @ m.T, rows, axis=1)
    np.testing.assert_allclose(np.sort(true, axis=1), np.sort(exact_scores, axis=1), atol=2e-3)
    every = Scanner(m, "ivf", nlist=16, nprobe=16)
    rows, scores = every.search(q, 20)
    np.testing.assert_array_equal(rows, exact_rows)
    some = Scanner(m, "ivf", nlist=16, nprobe=2)
    rows, scores = some.search(q, 20)
    assert some.backend == "ivf" and not some.exact and some.nlist == 16
    np.testing.assert_allclose(scores, np.take_along_axis(q @ m.T, rows, axis=1), atol=1e-5)  # true scores
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(rows, exact_rows)])
    assert 0.2 < recall < 1.0
    few = Scanner(m[:40], "ivf", nlist=8, nprobe=1)
    rows, _ = few.search(q, 30)
    assert (rows == -1).any() and ((rows >= 0) & (rows < 40) | (rows == -1)).all()


def test_ivf_retriever_returns_only_real_clips(built, monkeypatch):
    model_dir, index_dir, model, records, generated = built
    pytest.importorskip("faiss")
    r = Retriever(model, Index.load(index_dir), retrieve_k=20, scan_backend="ivf", ivf_nlist=8, ivf_nprobe=1)
    res = r.search_text(records[0].captions[0], top_k=20)
    assert 0 < len(res) < 20 and all(h.id in r.index.row_of for h in res)
    caps = r.search_audio(records[0].audio_path, top_k=20, target="captions")
    assert all(h.kind == "caption" for h in caps)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # as if FAISS were not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'hci-atr\[faiss\]'"):
        Retriever(model, Index.load(index_dir), scan_backend="faiss")
    assert Retriever(model, Index.load(index_dir), scan_backend="auto").clip_scanner.backend == "numpy"


def test_set_threads():
    import contextlib

    try:
        import faiss
    except ImportError:
        faiss = None
    try:  # restores the BLAS thread counts on exit
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(limits=None)
    except ImportError:
        blas = contextlib.nullcontext()
    before = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    with blas:
        try:
            set_threads(1)
            assert torch.get_num_threads() == 1 and (faiss is None or faiss.omp_get_max_threads() == 1)
            set_threads(0)  # 0 leaves the settings alone
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before[0])
            if faiss:
                faiss.omp_set_num_threads(before[1])


# ---------------------------------------------------------------------------------------------------------------
# the index folder: refusing a wrong --out, versions and the atomic swap, concurrent writers, model binding
# ---------------------------------------------------------------------------------------------------------------


def _versions(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v-"))


def test_index_out_that_is_not_an_index_is_refused_before_any_work(built, demo_root, tmp_path, capsys):
    """`hci-atr index --out DIR` on a folder holding other files: one line naming it, exit 2, nothing deleted, no Ray
    started (the old code replaced the folder)."""
    from workflows.cli import main

    model_dir = built[0]
    out = tmp_path / "my_sounds"
    out.mkdir()
    (out / "birds.wav").write_bytes(b"RIFF....WAVE")
    with pytest.raises(SystemExit) as e:
        main(["index", "--model", str(model_dir), "--data", str(demo_root), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(out) in err[0] and "not an hci-atr index" in err[0], err
    assert (out / "birds.wav").read_bytes() == b"RIFF....WAVE"
    assert sorted(p.name for p in out.iterdir()) == ["birds.wav"]
    with pytest.raises(DataError, match="not an hci-atr index"):
        IndexWriter(out, built[2])
    assert sorted(p.name for p in out.iterdir()) == ["birds.wav"]


def test_versions_swap_atomically_and_a_retriever_reloads(built, tmp_path):
    """Each write is a new version folder named by CURRENT; the version before stays (a server may still read it),
    older ones go; a Retriever sees the change cheaply and swaps in the new index; an unversioned (older) index folder
    still loads and is converted by the next write."""
    import shutil

    from hci_atr.search.index import current_version, is_index

    model_dir, index_dir, model, records, generated = built
    emb = embed_items(model, items_from_records(records, generated), batch_size=8)
    out = tmp_path / "index"
    assert current_version(out) is None and not is_index(out)
    write_index(out, model, emb.arrays, emb.items)
    first = current_version(out)
    r = Retriever(model, Index.load(out))
    assert r.index.version == first and r.index.root == out and r.reload_if_changed() is False
    held = r.index  # a replica's mapped arrays, kept across the next writes
    before = held.clip[:5].copy()
    half = len(emb.items) // 2
    write_index(out, model, {k: v[:half] for k, v in emb.arrays.items()}, emb.items[:half])
    second = current_version(out)
    assert second != first and _versions(out) == sorted([first, second])
    assert (out / "CURRENT").read_text().strip() == second
    assert r.reload_if_changed() is True and len(r.index) == half and r.index.version == second
    assert r.reload_if_changed() is False
    assert [h.id for h in r.search_text(records[0].captions[0], top_k=50)] and \
        all(r.index.row_of[h.id] < half for h in r.search_text(records[0].captions[0], top_k=50))
    write_index(out, model, emb.arrays, emb.items)
    third = current_version(out)
    assert _versions(out) == sorted([second, third])  # the first version is gone, the one before is kept
    np.testing.assert_array_equal(held.clip[:5], before)  # an index loaded earlier still reads its (mapped) files
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # an unversioned index folder (the older layout): loads as it is, version ""; the next write adds a version and
    # keeps the old files as the previous version, the one after removes them
    legacy = tmp_path / "legacy"
    shutil.copytree(Index.load(out).path, legacy)
    assert Index.load(legacy).version == "" == current_version(legacy) and len(Index.load(legacy)) == len(records)
    write_index(legacy, model, emb.arrays, emb.items)
    assert current_version(legacy).startswith("v-") and (legacy / "clip.npy").is_file()
    write_index(legacy, model, emb.arrays, emb.items)
    assert not (legacy / "clip.npy").exists() and not (legacy / "manifest.json").exists()
    assert len(_versions(legacy)) == 2 and len(Index.load(legacy)) == len(records)


def test_concurrent_writers_leave_one_consistent_index(built, tmp_path):
    """Two writers on the same folder at once: the second is refused in one line (or runs after the first); either
    way one consistent index, no temporary folders left, and a killed run's temporary folder is cleaned up."""
    import threading

    from hci_atr.search.index import current_version

    model_dir, index_dir, model, records, generated = built
    emb = embed_items(model, items_from_records(records, generated), batch_size=8)
    out = tmp_path / "index"
    out.mkdir()
    (out / ".v-20000101T000000-dead00.abc.tmp").mkdir()  # what a killed writer leaves
    (out / ".v-20000101T000000-dead00.abc.tmp" / "clip.npy").write_bytes(b"partial")
    barrier = threading.Barrier(2)
    outcomes: list = [None, None]

    def writer(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = write_index(out, model, emb.arrays, emb.items)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertions
            outcomes[i] = e

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert ok and all(isinstance(e, DataError) and "another run is writing" in str(e) for e in failed), outcomes
    assert len(_versions(out)) == len(ok) and current_version(out) in _versions(out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    idx = Index.load(out)
    assert idx.ids == [it.audio_id for it in emb.items] and idx.clip.shape == (len(records), 32)
    np.testing.assert_array_equal(idx.audio["frame_mask"], emb.arrays["frame_mask"])


def test_index_is_bound_to_the_model_that_built_it(built, tiny_text_dir, tmp_path, caplog):
    """Another model of the same width is refused (by the weights hash in the manifest), with the rebuild command;
    an index without a hash (older) loads with a one-line warning; a reload to a foreign index keeps the old one."""
    import logging
    import shutil

    from hci_atr.models.model import HciAtrModel
    from hci_atr.search.index import weights_hash

    model_dir, index_dir, model, records, generated = built
    assert weights_hash(model) == weights_hash(HciAtrModel.from_pretrained(model_dir))
    assert Index.load(index_dir).weights_hash == weights_hash(model)
    torch.manual_seed(1)
    other = HciAtrModel(tiny_config(tiny_text_dir)).eval()
    assert other.cfg.model.embed_dim == model.cfg.model.embed_dim and weights_hash(other) != weights_hash(model)
    with pytest.raises(ModelLoadError, match=r"built by another model.*hci-atr index --model"):
        Retriever(other, Index.load(index_dir))
    other.save_pretrained(tmp_path / "other_model")
    with pytest.raises(ModelLoadError, match=f"hci-atr index --model {tmp_path / 'other_model'}"):
        Retriever.from_pretrained(tmp_path / "other_model", index_dir)
    # an index written before the hash was kept: loads, says once that it cannot be checked
    old = tmp_path / "old"
    shutil.copytree(Index.load(index_dir).path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["weights_hash"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="hci_atr.search.retriever"):
        r = Retriever(other, Index.load(old))
    warned = [rec.getMessage() for rec in caplog.records if "weights hash" in rec.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and len(r.search_text("a beep", top_k=3)) == 3
    # a new version built by another model: the reload is refused and the version in use stays
    out = tmp_path / "index"
    emb = embed_items(model, items_from_records(records, generated), batch_size=8)
    write_index(out, model, emb.arrays, emb.items)
    r = Retriever(model, Index.load(out))
    in_use = r.index.version
    write_index(out, other, embed_items(other, emb.items, batch_size=8).arrays, emb.items)
    for _ in range(2):  # refused again on the next call, without loading the version again
        with pytest.raises(ModelLoadError, match="built by another model"):
            r.reload_if_changed()
        assert r.index.version == in_use and len(r.search_text("a beep", top_k=3)) == 3


def test_tampered_index_files_are_refused(built, tmp_path):
    """caption_emb.npy with the wrong number of rows, NaN/Inf in clip.npy, an array whose shape is not the manifest's:
    each is refused at load with a one-line 'rebuild' error naming the file."""
    import shutil

    src = Index.load(built[1]).path

    def copy(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = copy("rows")
    np.save(d / "caption_emb.npy", np.load(d / "caption_emb.npy")[:-2])
    with pytest.raises(DataError, match=r"caption_emb\.npy.*rebuild"):
        Index.load(d)
    d = copy("rows_no_shapes")  # older manifests have no shapes: the row count is still checked against captions
    np.save(d / "caption_emb.npy", np.load(d / "caption_emb.npy")[:-2])
    m = json.loads((d / "manifest.json").read_text())
    del m["shapes"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"caption_emb\.npy: has \d+ rows .* captions\.parquet"):
        Index.load(d)
    for bad in (np.nan, np.inf):
        d = copy(f"nonfinite_{bad}")
        clip = np.load(d / "clip.npy")
        clip[3, 5] = bad
        np.save(d / "clip.npy", clip)
        with pytest.raises(DataError, match=r"clip\.npy: contains NaN or Inf"):
            Index.load(d)
    d = copy("shape")
    m = json.loads((d / "manifest.json").read_text())
    frames = np.load(d / m["files"]["frames"])
    np.save(d / m["files"]["frames"], frames[:, :-1])
    with pytest.raises(DataError, match=r"frames\.npy: has shape .* the manifest says"):
        Index.load(d)
