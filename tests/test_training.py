"""Training core: batches, AC augmentation pairs, loss decreases, determinism, gather path, evaluation."""

import pytest
import torch

from hci_atr.metrics import retrieval_metrics
from hci_atr.models.model import HciAtrModel
from hci_atr.data.audio import n_frames
from hci_atr.training import audio_key, embed_split, evaluate, iter_batches, make_batch, train_epoch
from model_helpers import tiny_cfg, tiny_rows


def _setup(text_dir, **over):
    cfg = tiny_cfg(text_dir, **over)
    torch.manual_seed(0)
    model = HciAtrModel(cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    return cfg, model, opt


def test_make_batch_crops_and_picks_captions(tiny_text_dir):
    cfg, model, _ = _setup(tiny_text_dir, **{"model.ac_augment": True, "model.ac_fusion": True})
    rows = tiny_rows(4, n_frames=80, generated=True)
    n = n_frames(cfg.audio)
    assert n == 65
    b = make_batch(rows, cfg, model, train=True, generator=torch.Generator().manual_seed(0))
    assert b.mel.shape == (4, 65, 16) and bool(b.mel_mask.all())
    # augmentation: 4 real + 4 generated texts; clip0 and clip3 have no generated caption -> weight 0
    assert len(b.text) == 8 and b.pair_weight.tolist() == [1, 1, 1, 1, 0, 0.5, 0.5, 0]
    assert torch.equal(b.text_keys[4:], b.audio_keys) and b.audio_keys[0].item() == audio_key("clip0")
    assert b.text.word_mask.shape[1] == cfg.model.max_words  # fixed L for all-gathers
    assert b.aux_mask.tolist() == [False, True, True, False]
    e = make_batch(rows, cfg, model, train=False)
    assert len(e.text) == 4 and e.text.texts[0] == rows[0]["captions"][0]
    torch.testing.assert_close(e.mel[0], torch.tensor(rows[0]["mel"]).view(80, 16)[:65])
    short = make_batch(tiny_rows(2, n_frames=30), cfg, model, train=True, generator=torch.Generator())
    assert short.mel_mask.sum(1).tolist() == [30, 30] and torch.all(short.mel[:, 30:] == 0)


def _run(text_dir, epochs, **over):
    cfg, model, opt = _setup(text_dir, **{"train.batch_size": 8, **over})
    rows = tiny_rows(8, generated=True)
    g = torch.Generator().manual_seed(cfg.train.seed)
    hist = [train_epoch(model, opt, list(iter_batches(rows, cfg, model, True, g)), cfg) for _ in range(epochs)]
    return model, cfg, rows, hist


def test_loss_decreases_and_is_deterministic(tiny_text_dir):
    model, cfg, rows, hist = _run(tiny_text_dir, 12)
    totals = [h["loss_total"] for h in hist]
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < 0.9 * totals[0]
    assert {"loss_clip", "loss_segment", "loss_frame", "loss_total", "tau_clip"} <= set(hist[0])
    _, _, _, hist2 = _run(tiny_text_dir, 2)
    assert [h["loss_total"] for h in hist2] == totals[:2]  # same seed, same CPU numbers
    m = evaluate(model, rows, cfg)
    assert m["n_audio"] == 8 and m["n_text"] == 16
    emb = embed_split(model, rows, cfg)
    assert m["rsum"] == retrieval_metrics(model.score(emb.audio, emb.text).fused, emb.text_to_audio)["rsum"]
    assert {"clip_rsum", "segment_rsum", "frame_rsum"} <= set(m)


def test_ac_uses_train_and_switch_losses(tiny_text_dir):
    _, _, _, hist = _run(tiny_text_dir, 3, **{"model.ac_fusion": True, "model.ac_branch": True,
                                               "model.ac_augment": True, "model.use_segment": False})
    assert "loss_ac_branch" in hist[0] and "loss_segment" not in hist[0]
    assert hist[-1]["loss_total"] < hist[0]["loss_total"]


_ALL_AC = {"model.ac_branch": True, "model.ac_fusion": True, "model.ac_augment": True,
           "model.learn_level_weights": True}


@pytest.mark.parametrize("over,n", [({}, 6), (_ALL_AC, 6), (_ALL_AC, 10)])
def test_sharded_loss_is_the_global_batch_loss(tiny_text_dir, over, n):
    """Two simulated workers (threads sharing one autograd graph, gathering each other's texts): the mean of their
    losses is the loss of the whole batch at every level, each worker scored only its own audio rows, and the
    gradient DDP would apply (the mean of the workers' gradients) is the whole-batch gradient. With 10 clips, clips
    0 and 8 (1 and 9) share their captions, one on each worker: the identical-text positives cross the gather."""
    from model_helpers import ThreadGather

    cfg, model, _ = _setup(tiny_text_dir, **over)
    model.eval()  # no dropout: the two computations must see the same network
    # one caption per clip and exactly the target frames: training batches without any random choice
    rows = tiny_rows(n, n_frames=n_frames(cfg.audio), captions_per_clip=1, generated=True)
    whole = make_batch(rows, cfg, model, train=True, generator=torch.Generator())
    h = n // 2
    halves = [make_batch(rows[:h], cfg, model, train=True, generator=torch.Generator()),
              make_batch(rows[h:], cfg, model, train=True, generator=torch.Generator())]
    params = [p for p in model.parameters() if p.requires_grad]

    ref = model(**whole.forward_kwargs()).losses
    ref_grad = torch.autograd.grad(ref["total"], params, allow_unused=True)
    outs = ThreadGather(2).run(lambda r, g: model(**halves[r].forward_kwargs(), gather=g))
    assert [tuple(o.scores.fused.shape) for o in outs] == [(h, len(whole.text))] * 2  # own rows x global texts
    for name, value in ref.items():
        torch.testing.assert_close((outs[0].losses[name] + outs[1].losses[name]) / 2, value, atol=1e-5, rtol=1e-5)
    assert abs(outs[0].losses["total"].item() - ref["total"].item()) > 1e-3  # a worker alone is not the global loss
    objective = (outs[0].losses["total"] + outs[1].losses["total"]) / 2  # what DDP's gradient averaging applies
    got_grad = torch.autograd.grad(objective, params, allow_unused=True)
    for p, a, b in zip(params, got_grad, ref_grad):
        if b is None:
            assert a is None or torch.all(a == 0)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_embed_split_covers_all_captions(tiny_text_dir):
    cfg, model, _ = _setup(tiny_text_dir)
    rows = tiny_rows(5)
    emb = embed_split(model, rows, cfg, batch_size=2)
    assert len(emb.audio) == 5 and len(emb.text) == 10
    assert emb.text_to_audio.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert model.training  # mode restored


def test_warmup_factor_is_linear_then_constant():
    from hci_atr.training import warmup_factor

    assert [warmup_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(7, 0) == 1.0
    assert warmup_factor(0.5, 3) == pytest.approx(0.5)  # fractional progress (per-step schedules)


def test_train_refuses_a_missing_panns_checkpoint_before_starting_ray(tmp_path):
    # checked on the driver, before the features are read: the workers would otherwise fail max_failures times
    # before the user hears of it (the features directory does not even exist here)
    from hci_atr.config import Config
    from hci_atr.errors import ConfigError
    from workflows.train import train

    cfg = Config().override({"model.audio_encoder": "cnn14", "model.audio_checkpoint": str(tmp_path / "nope.pth")})
    with pytest.raises(ConfigError, match="audio_checkpoint.*not a file"):
        train(cfg, tmp_path / "features")


@pytest.mark.parametrize("over", [
    {},
    {"model.use_clip": False},
    {"model.use_segment": False, "model.use_frame": False},
    {"model.ac_fusion": True, "model.ac_branch": True, "model.ac_augment": True, "model.learn_level_weights": True},
    {"model.ac_branch": True, "model.use_clip": False},
])
def test_every_trainable_parameter_gets_a_gradient(tiny_text_dir, over):
    """What lets DDP run without find_unused_parameters: whatever the switches, a training step reaches every
    parameter left trainable (switched-off parts and the text transformer's pooler head are frozen)."""
    cfg, model, _ = _setup(tiny_text_dir, **{"model.freeze_text": False, **over})
    batch = make_batch(tiny_rows(4, generated=True), cfg, model, train=True, generator=torch.Generator().manual_seed(0))
    model(**batch.forward_kwargs()).losses["total"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("text.transformer.") for n in trainable)
    assert not any(".pooler." in n for n in trainable)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_restore_optimizer_state_or_say_why_not():
    from hci_atr.training import restore_optimizer

    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    old = torch.optim.AdamW([a, b, c], lr=0.1)
    (a.sum() + b.sum() + c.sum()).backward()
    old.step()
    state = old.state_dict()

    same = torch.optim.AdamW([a, b, c], lr=0.1)
    assert restore_optimizer(same, state) is None
    assert torch.equal(same.state_dict()["state"][1]["exp_avg"], state["state"][1]["exp_avg"])

    fewer = torch.optim.AdamW([a, b], lr=0.1)  # e.g. a checkpoint from before a tensor was frozen
    why = restore_optimizer(fewer, state)
    assert why is not None and "does not fit this model's trainable parameters" in why and "\n" not in why
    assert fewer.state_dict()["state"] == {}  # left fresh, and still usable
    (a.sum() + b.sum()).backward()
    fewer.step()
    assert set(fewer.state_dict()["state"]) == {0, 1}


# -- the fit loop -------------------------------------------------------------------------------------------------


def _fit(text_dir, epochs, resume=None, model=None, **over):
    from hci_atr.training import InProcess, fit, seeded_model

    cfg = tiny_cfg(text_dir, **{"train.batch_size": 4, "train.epochs": epochs, "train.warmup_epochs": 2, **over})
    rows, val = tiny_rows(8, generated=True), tiny_rows(4, seed=1)
    model = model or seeded_model(cfg)
    hooks = InProcess(cfg, rows, val)
    ends = []
    hooks.on_epoch_end = lambda end, keep=hooks.on_epoch_end: (keep(end), ends.append(
        {"optimizer": end.optimizer.state_dict(), "state": end.state.to_dict(),
         "weights": {k: v.clone() for k, v in end.model.state_dict().items()}}))
    return fit(model, cfg, hooks, resume=resume), ends, hooks, model, cfg


def test_fit_resumed_replays_the_uninterrupted_run(tiny_text_dir):
    """Same seed: 3 epochs in one go == 1 epoch, then a fresh process resuming from that epoch's state (weights,
    optimizer, FitState) for 2 more: the same losses and the warm-up's learning rate decided by the epoch alone."""
    import copy

    from hci_atr.training import FitState, Resume, seeded_model

    whole, _, _, _, cfg = _fit(tiny_text_dir, 3)
    lrs = [h["lr"] for h in whole.state.history]
    assert lrs == pytest.approx([cfg.train.lr * 0.5, cfg.train.lr, cfg.train.lr])
    first, ends, _, _, _ = _fit(tiny_text_dir, 1)
    saved = copy.deepcopy(ends[-1])
    model = seeded_model(cfg)
    model.load_state_dict(saved["weights"])
    resume = Resume(FitState.from_dict(saved["state"]), saved["optimizer"])
    rest, _, _, _, _ = _fit(tiny_text_dir, 3, resume=resume, model=model)
    assert rest.start_epoch == 1 and [int(h["epoch"]) for h in rest.state.history] == [0, 1, 2]
    assert [h["start_epoch"] for h in rest.state.history] == [0, 1, 1]
    for a, b in zip(rest.state.history, whole.state.history):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-6) and a["lr"] == b["lr"]
        assert a["val_rsum"] == pytest.approx(b["val_rsum"])
    # an optimizer state that does not fit: the weights resume, AdamW restarts, and the lr is still the epoch's
    resume = Resume(FitState.from_dict(saved["state"]), {"state": {}, "param_groups": []})
    odd, _, _, _, _ = _fit(tiny_text_dir, 2, resume=resume, model=model)
    assert odd.state.history[-1]["lr"] == pytest.approx(cfg.train.lr)


def test_fit_keeps_the_best_epoch_and_stops_early(tiny_text_dir):
    from hci_atr.training import InProcess, fit, seeded_model

    cfg = tiny_cfg(tiny_text_dir, **{"train.epochs": 10, "train.early_stopping_patience": 2})
    scores = iter([10.0, 30.0, 20.0, 25.0, 40.0])

    class Scripted(InProcess):
        def validate(self, model):
            return {"rsum": next(scores)}

    model = seeded_model(cfg)
    hooks = Scripted(cfg, tiny_rows(8), [])
    res = fit(model, cfg, hooks)
    assert [h["val_rsum"] for h in res.state.history] == [10.0, 30.0, 20.0, 25.0]  # 2 epochs without a better one
    assert res.stopped_early and res.state.best_epoch == 1 and res.state.bad_epochs == 2
    assert [h["early_stopped"] for h in res.state.history] == [0, 0, 0, 1]
    hooks.restore_best(model)  # the epoch-1 weights again (trainable ones; frozen ones never changed)
    assert hooks.best_state and all(torch.equal(model.state_dict()[k], v) for k, v in hooks.best_state.items())


def test_checkpoint_round_trip_checksums_and_weights_only(tiny_text_dir, tmp_path):
    """A checkpoint written by the train workflow loads back with torch.load(weights_only=True); a truncated file
    fails its checksum; a train_state.pt that pickles code (an old, checksum-less checkpoint) is refused without
    running it; a resume passes over the broken newest checkpoint to the previous one."""
    import json
    import pickle

    from workflows.checkpoints import (checkpoint_problem, read_checkpoint, resume_checkpoint, resume_note,
                                       write_checkpoint)

    from hci_atr.training import param_groups

    res, ends, _, model, cfg = _fit(tiny_text_dir, 2)
    opt = torch.optim.AdamW(param_groups(model, cfg))  # the groups fit() trained with
    opt.load_state_dict(ends[-1]["optimizer"])
    run = tmp_path / "run"
    old, new = run / "checkpoint_2020-01-01_00-00-00.000000", run / "checkpoint_2020-01-01_00-00-01.000000"
    for d, e in ((old, 0), (new, 1)):
        write_checkpoint(d, model, opt, res.state, {"epoch": e, "val_rsum": 1.0, "mlflow_run_id": "r"})
    state = torch.load(new / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["history"] == res.state.history
    weights, resume = read_checkpoint(new)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert resume.state == res.state and resume.optimizer["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    assert resume_checkpoint(new, run) == (new, [])

    data = (new / "train_state.pt").read_bytes()
    (new / "train_state.pt").write_bytes(data[:len(data) // 2])  # truncated
    assert checkpoint_problem(new) == "train_state.pt does not match its checksum"
    chosen, skipped = resume_checkpoint(new, run)
    assert chosen == old and [p for p, _ in skipped] == [new]
    note = resume_note(chosen, skipped)
    assert "\n" not in note and new.name in note and f"{old.name} (epoch 0)" in note

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))  # older format
    (old / "train_state.pt").write_bytes(pickle.dumps({"epoch": 0, "x": Payload()}, protocol=2))
    why = checkpoint_problem(old)
    assert why is not None and why.startswith("train_state.pt:") and not marker.exists()
    assert resume_checkpoint(new, run) == (None, [(new, "train_state.pt does not match its checksum"), (old, why)])


# -- hard negatives in training batches ---------------------------------------------------------------------------

HARD = {"model.hard_negatives": "attribute", "model.hard_negative_weight": 0.5}


def test_training_batches_carry_hard_negatives_of_their_own_captions(tiny_text_dir):
    from hci_atr.data.negatives import attribute_flipped

    over = {"model.ac_augment": True, "model.ac_fusion": True}
    cfg, model, _ = _setup(tiny_text_dir, **over, **HARD)
    rows = tiny_rows(4, generated=True)  # captions "a <x> loudly" (flips to "quietly") / "the <x> nearby" (none)
    b = make_batch(rows, cfg, model, train=True, generator=torch.Generator().manual_seed(0))
    real = b.text.texts[:4]
    assert b.hard_text is not None and len(b.hard_text) == len(b.hard_source) > 0
    expect = [(attribute_flipped(c), j) for j, c in enumerate(real) if attribute_flipped(c)]
    assert list(zip(b.hard_text.texts, b.hard_source.tolist())) == expect
    assert all(s < len(rows) for s in b.hard_source.tolist())  # real captions only, never the generated ones
    assert b.forward_kwargs()["hard_text"] is b.hard_text and b.forward_kwargs()["hard_source"] is b.hard_source
    e = make_batch(rows, cfg, model, train=False)
    assert e.hard_text is None and e.hard_source is None  # evaluation: none

    # off: the same batch as before (nothing drawn from the generator), without hard negatives
    cfg_off, model_off, _ = _setup(tiny_text_dir, **over)
    off = make_batch(rows, cfg_off, model_off, train=True, generator=torch.Generator().manual_seed(0))
    assert off.hard_text is None and off.hard_source is None
    assert off.text.texts == b.text.texts and torch.equal(off.mel, b.mel) and torch.equal(off.mel_mask, b.mel_mask)
    model.eval(), model_off.eval()
    on_losses = model(**b.forward_kwargs()).losses
    off_losses = model_off(**off.forward_kwargs()).losses
    assert "hard" not in off_losses and on_losses["hard"].item() > 0
    for name, v in off_losses.items():
        want = v + (0.5 * on_losses["hard"] if name == "total" else 0)
        torch.testing.assert_close(on_losses[name], want)


def test_a_training_epoch_with_hard_negatives_reports_loss_hard(tiny_text_dir):
    _, _, _, hist = _run(tiny_text_dir, 2, **HARD)
    assert all(h["loss_hard"] > 0 and torch.isfinite(torch.tensor(h["loss_total"])) for h in hist)
    _, _, _, off = _run(tiny_text_dir, 2)
    assert "loss_hard" not in off[0]


# -- parameter groups: pretrained parts at their own rates ----------------------------------------------------------


def _groups(cfg):
    from hci_atr.training import param_groups, seeded_model

    model = seeded_model(cfg)
    return model, param_groups(model, cfg)


def _assert_partition(model, groups):
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}  # every trainable one, no frozen one


def test_param_groups_give_the_text_tower_its_own_rate(tiny_text_dir):
    cfg = tiny_cfg(tiny_text_dir, **{"train.text_lr": 1e-4})
    model, groups = _groups(cfg)
    _assert_partition(model, groups)
    by = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["heads", "text"] and by["heads"]["lr"] == cfg.train.lr
    assert by["text"]["lr"] == 1e-4
    assert {id(p) for p in by["text"]["params"]} == {id(p) for p in model.text.transformer.parameters()
                                                      if p.requires_grad}
    assert id(model.text.proj.weight) in {id(p) for p in by["heads"]["params"]}  # new projection: a head
    frozen = tiny_cfg(tiny_text_dir, **{"model.freeze_text": True})
    model, groups = _groups(frozen)
    _assert_partition(model, groups)
    assert [g["name"] for g in groups] == ["heads"]


def test_text_train_layers_trains_only_the_top_layers(tiny_text_dir):
    cfg = tiny_cfg(tiny_text_dir, **{"train.text_train_layers": 1})  # the tiny BERT has 2 layers
    model, groups = _groups(cfg)
    _assert_partition(model, groups)
    tower = dict(model.text.transformer.named_parameters())
    trained = {n for n, p in tower.items() if p.requires_grad}
    assert trained and all(n.startswith("encoder.layer.1.") for n in trained)
    assert {n for n in tower if n.startswith("encoder.layer.1.")} == trained
    assert not any(p.requires_grad for n, p in tower.items() if n.startswith(("embeddings.", "encoder.layer.0.")))
    text_group = next(g for g in groups if g["name"] == "text")
    assert {id(p) for p in text_group["params"]} == {id(tower[n]) for n in trained}
    model.train()  # the frozen lower part applies no dropout; the layer that trains does
    layers = model.text.transformer.encoder.layer
    assert not model.text.transformer.embeddings.training and not layers[0].training and layers[1].training
    # what DDP without find_unused_parameters needs: every trainable parameter gets a gradient
    batch = make_batch(tiny_rows(4), cfg, model, train=True, generator=torch.Generator().manual_seed(0))
    model(**batch.forward_kwargs()).losses["total"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    # 0 layers: the tower is frozen as a whole; all layers (-1, or more than it has): every layer trains
    model0, _ = _groups(tiny_cfg(tiny_text_dir, **{"train.text_train_layers": 0}))
    assert model0.text.tower_frozen
    full, _ = _groups(tiny_cfg(tiny_text_dir))
    assert all(p.requires_grad for n, p in full.text.transformer.named_parameters() if ".pooler." not in f".{n}")
    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import param_groups

    with pytest.raises(ValueError, match="seeded_model"):  # a model built around seeded_model would train them all
        param_groups(HciAtrModel(cfg), cfg)


def test_param_groups_give_a_panns_checkpoint_its_own_rate(tiny_text_dir, tmp_path):
    from hci_atr.models.audio_encoder import AudioEncoder

    cfg = tiny_cfg(tiny_text_dir, **{"train.audio_pretrained_lr": 5e-5})
    enc = AudioEncoder("cnn-small", cfg.audio.n_mels, cfg.model.audio_width)
    ckpt = tmp_path / "panns.pth"  # a PANNs-style checkpoint holding the first conv block only
    torch.save({"model": {k: v for k, v in enc.state_dict().items() if k.startswith("conv_block1.")}}, ckpt)
    model, groups = _groups(cfg.override({"model.audio_checkpoint": str(ckpt)}))
    _assert_partition(model, groups)
    by = {g["name"]: g for g in groups}
    assert by["audio_pretrained"]["lr"] == 5e-5
    assert {id(p) for p in by["audio_pretrained"]["params"]} == {
        id(p) for n, p in model.audio.named_parameters() if n.startswith("conv_block1.")}
    model, groups = _groups(cfg)  # no checkpoint: the audio encoder trains from scratch at the heads' rate
    assert "audio_pretrained" not in {g["name"] for g in groups}


def test_warmup_applies_to_every_group(tiny_text_dir):
    res, _, _, _, cfg = _fit(tiny_text_dir, 3, **{"train.text_lr": 1e-4})
    assert [h["lr"] for h in res.state.history] == pytest.approx([cfg.train.lr * 0.5, cfg.train.lr, cfg.train.lr])
    assert [h["lr_text"] for h in res.state.history] == pytest.approx([5e-5, 1e-4, 1e-4])


# -- a frozen text tower's outputs, once per caption ----------------------------------------------------------------


def test_frozen_tower_cache_gives_the_same_embeddings(tiny_text_dir):
    from hci_atr.models.text_encoder import TowerCache

    cfg, model, _ = _setup(tiny_text_dir, **{"model.freeze_text": True})
    model.train()
    assert not model.text.transformer.training  # frozen: eval mode (no dropout) even in training, so a cache is exact
    batch = model.tokenize(["a dog barks loudly", "rain falls on a tin roof then thunder", "a bell"],
                           pad_words_to=cfg.model.max_words)
    ref = model.encode_text(batch)
    assert model.text.enable_cache(cfg.train.text_cache_mb)
    first = model.encode_text(batch)  # misses: the batch runs through the transformer as it would without a cache
    again = model.encode_text(batch)  # hits: the stored outputs
    cache = model.text.cache
    assert len(cache) == 3 and (cache.hits, cache.misses) == (3, 3)
    for got in (first, again):
        for a, b in zip(got._values(), ref._values()):
            if a is not None:
                assert torch.equal(a, b)
    # another batch: two kept captions (computed in another padding), a repeated new one computed once
    mixed = model.tokenize(["a bell", "a dog barks loudly", "wind blows", "wind blows"])
    cached = model.encode_text(mixed)
    assert len(cache) == 4 and (cache.hits, cache.misses) == (5, 4)
    model.text.disable_cache()
    plain = model.encode_text(mixed)
    for a, b in zip(cached._values(), plain._values()):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # equal up to float rounding
    # a tower that trains is never cached; the size bound holds
    _, trains, _ = _setup(tiny_text_dir)
    assert not trains.text.enable_cache(100) and trains.text.cache is None
    small = TowerCache(100 / 2**20)  # 100 bytes
    small.put(b"a", torch.zeros(5, 4))  # 80 bytes: kept
    small.put(b"b", torch.zeros(5, 4))  # would pass the bound: not kept
    assert len(small) == 1 and small.bytes == 80


def test_fit_runs_a_frozen_tower_once_per_distinct_caption(tiny_text_dir):
    """Two epochs of 8 clips (one caption each) and validation on 4 clips (2 captions each, 4 of them also training
    captions): the transformer sees each of the 12 distinct captions once, and the numbers are those without it (to
    float rounding)."""
    from hci_atr.training import InProcess, fit, seeded_model

    def run(cache_mb):
        cfg = tiny_cfg(tiny_text_dir, **{"model.freeze_text": True, "train.epochs": 2, "train.text_cache_mb": cache_mb})
        model = seeded_model(cfg)
        seen = []
        model.text.transformer.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
        rows, val = tiny_rows(8, captions_per_clip=1), tiny_rows(4, seed=1)
        res = fit(model, cfg, InProcess(cfg, rows, val))
        assert model.text.cache is None  # dropped once fit returns
        return res.state.history, sum(seen)

    cached, n_cached = run(64)
    plain, n_plain = run(0)
    assert n_cached == 12 and n_plain == 2 * (8 + 8)
    for a, b in zip(cached, plain):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-5) and a["val_rsum"] == b["val_rsum"]


def _layer_rows(model, seen):
    """Count the captions (rows) that pass through the text tower's lowest layer."""
    model.text._layers()[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))


def test_partial_cache_runs_the_frozen_layers_once_and_changes_nothing(tiny_text_dir):
    """Only the top layer of the 2-layer tower trains: the cache keeps the lower layer's output per caption and each
    step runs the top layer on it. The words, sentences and the top layer's gradients are those of the whole tower
    (same dropout draws), and a kept caption skips the lower layer."""
    cfg, model, _ = _setup(tiny_text_dir, **{"train.text_train_layers": 1})
    model.text.train_top_layers(1)
    model.train()
    texts = ["a dog barks loudly", "rain falls on a tin roof then thunder", "a bell"]
    batch = model.tokenize(texts, pad_words_to=cfg.model.max_words)
    top = list(model.text._layers()[1].parameters())

    def encode():
        for q in model.parameters():
            q.grad = None
        torch.manual_seed(3)  # the top layer's dropout: the same draws on both paths
        out = model.encode_text(batch)
        (out.sentence.sum() + out.words.square().sum()).backward()
        return out, [q.grad.clone() for q in top]

    ref, ref_grads = encode()
    assert model.text.enable_cache(cfg.train.text_cache_mb) and model.text.cache_from == 1
    seen = []
    _layer_rows(model, seen)
    for _ in range(2):  # first: the one-time check and the misses; then: every caption kept
        got, grads = encode()
        for a, b in zip(got._values(), ref._values()):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    cache = model.text.cache
    assert len(cache) == 3 and (cache.hits, cache.misses) == (3, 3)
    assert seen == [3, 3, 3]  # the check's whole tower, the check's frozen part, the misses; nothing the second time
    # a kept caption in another batch (other padding) reads its kept states
    model.text.disable_cache()
    model.eval()
    plain = model.encode_text(model.tokenize(["a bell", "wind blows"]))
    assert model.text.enable_cache(64)
    model.encode_text(batch)
    cached = model.encode_text(model.tokenize(["a bell", "wind blows"]))
    for a, b in zip(cached._values(), plain._values()):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_partial_cache_is_off_where_it_cannot_be_exact(tiny_text_dir, monkeypatch):
    """No cache when every layer trains or the embeddings train; one that disagrees with the whole tower on its
    first batch turns itself off, and that batch is encoded by the whole tower."""
    _, every, _ = _setup(tiny_text_dir)
    assert not every.text.enable_cache(64)  # all layers and the embeddings train
    _, top2, _ = _setup(tiny_text_dir)
    top2.text.train_top_layers(2)  # both layers train: nothing frozen below them but the embeddings
    assert not top2.text.enable_cache(64)
    _, model, _ = _setup(tiny_text_dir)
    model.text.train_top_layers(1)
    model.text.transformer.embeddings.word_embeddings.weight.requires_grad_(True)  # a part below the top trains
    assert not model.text.enable_cache(64)
    model.text.train_top_layers(1)
    model.eval()
    batch = model.tokenize(["a dog barks loudly", "a bell"])
    ref = model.encode_text(batch)
    assert model.text.enable_cache(64)
    real = type(model.text)._top_hidden
    # a model whose layers do not compose: starting at the top layer gives something else
    monkeypatch.setattr(type(model.text), "_top_hidden", lambda self, *a: real(self, *a) + 1.0)
    got = model.encode_text(batch)
    assert model.text.cache is None
    for a, b in zip(got._values(), ref._values()):
        if a is not None:
            assert torch.equal(a, b)


def test_fit_runs_the_frozen_lower_layers_once_per_distinct_caption(tiny_text_dir):
    """As the frozen-tower test, with only the top layer training: the lower layer sees each of the 12 distinct
    captions once (plus the first batch twice for the one-time check), and the numbers are those without it."""
    from hci_atr.training import InProcess, fit, seeded_model

    def run(cache_mb):
        cfg = tiny_cfg(tiny_text_dir, **{"train.text_train_layers": 1, "train.epochs": 2,
                                         "train.text_cache_mb": cache_mb})
        model = seeded_model(cfg)
        seen = []
        _layer_rows(model, seen)
        rows, val = tiny_rows(8, captions_per_clip=1), tiny_rows(4, seed=1)
        res = fit(model, cfg, InProcess(cfg, rows, val))
        assert model.text.cache is None
        return res.state.history, sum(seen), cfg

    cached, n_cached, cfg = run(64)
    plain, n_plain, _ = run(0)
    assert n_cached == 12 + 2 * cfg.train.batch_size and n_plain == 2 * (8 + 8)
    for a, b in zip(cached, plain):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-5) and a["val_rsum"] == b["val_rsum"]


def test_identical_texts_are_positives_of_every_clip_that_owns_them(tiny_text_dir):
    """tiny_rows(10): clips 0 and 8 have the same captions (so do 1 and 9). A training batch names every text's
    identity and every clip's own texts; the positives are then each clip's texts plus the identical texts of the
    other clip, never its negatives; the ids of a generated caption that ac_augment adds count for its clip."""
    from hci_atr.losses import positives_mask

    cfg, model, _ = _setup(tiny_text_dir, **{"model.ac_augment": True})
    rows = tiny_rows(10, n_frames=n_frames(cfg.audio), captions_per_clip=1, generated=True)
    b = make_batch(rows, cfg, model, train=True, generator=torch.Generator())
    assert b.text_ids.shape == (20,) and b.audio_text_ids.shape[0] == 10 and b.text_generated.tolist() == \
        [False] * 10 + [bool(r.get("generated_caption")) for r in rows]
    plain = positives_mask(b.audio_keys, b.text_keys)
    pos = positives_mask(b.audio_keys, b.text_keys, b.audio_text_ids, b.text_ids)
    assert bool((pos >= plain).all())  # only ever adds positives
    added = sorted((int(i), int(j)) for i, j in (pos & ~plain).nonzero().tolist())
    # real captions 0<->8, 1<->9; generated "dog barks" of clip 8 (i % 3 != 0) is not clip 0's (clip 0 has none)
    want = {(0, 8), (8, 0), (1, 9), (9, 1)}
    gens = {i: r.get("generated_caption") for i, r in enumerate(rows)}
    for i in range(10):
        for j in range(10):
            if i != j and gens[j] and gens[i] == gens[j]:  # the same generated text on two clips
                want.add((i, 10 + j))
    assert set(added) == want
    ev = make_batch(rows, cfg, model, train=False)
    assert ev.text_ids is None and ev.audio_text_ids is None  # evaluation scores by text_to_audio alone


def test_the_ac_branch_never_scores_a_generated_caption_against_itself(tiny_text_dir):
    """With ac_branch and ac_augment, an added (clip, generated caption) pair would be scored by the branch as the
    caption against itself (cosine 1). The branch score of those texts is 0 and the branch loss is the InfoNCE
    over the real captions only; the other levels still train on the added pairs."""
    from hci_atr.losses import info_nce, positives_mask

    cfg, model, _ = _setup(tiny_text_dir, **{"model.ac_branch": True, "model.ac_augment": True,
                                            "model.use_segment": False})
    model.eval()
    rows = tiny_rows(6, n_frames=n_frames(cfg.audio), captions_per_clip=1, generated=True)
    b = make_batch(rows, cfg, model, train=True, generator=torch.Generator())
    out = model(**b.forward_kwargs())
    gen = b.text_generated
    assert bool(gen.any()) and bool((out.scores.levels["ac_branch"][:, gen] == 0).all())
    with torch.no_grad():
        a = model.encode_audio(b.mel, b.mel_mask, b.aux, b.aux_mask)
        raw = model.score(a, model.encode_text(b.text)).levels["ac_branch"]
    own = b.text_to_audio[gen]
    assert torch.allclose(raw[own, gen.nonzero().squeeze(1)], torch.ones(int(gen.sum())), atol=1e-5)  # the trap
    pos = positives_mask(b.audio_keys, b.text_keys, b.audio_text_ids, b.text_ids)
    real = ~gen
    want = info_nce(raw[:, real], pos[:, real], model.temps.tau("ac_branch"), b.pair_weight[real])
    torch.testing.assert_close(out.losses["ac_branch"], want, atol=1e-5, rtol=1e-5)
    assert out.losses["clip"].item() != pytest.approx(
        info_nce(out.scores.levels["clip"][:, real], pos[:, real], model.temps.tau("clip"), b.pair_weight[real]).item())


@pytest.mark.parametrize("audio", ["unfused", "fused"])
def test_a_generated_caption_is_a_positive_of_its_clip_without_itself_fused_in(tiny_text_dir, audio):
    """With ac_fusion and ac_augment, a generated caption added as a positive would be scored against audio that
    already holds that caption (fused in), a pair the fusion wins by copying the caption through. With
    ac_augment_audio="unfused" those columns are scored against the clips encoded without their captions (and the
    fusion gets no gradient from them); "fused" keeps the old scoring. The real captions' columns are the fused
    audio's either way."""
    cfg, model, _ = _setup(tiny_text_dir, **{"model.ac_fusion": True, "model.ac_augment": True,
                                            "model.ac_augment_audio": audio})
    model.eval()
    with torch.no_grad():  # a fusion that visibly moves the frames (the gate starts near closed)
        for p in model.fusion.parameters():
            p.add_(0.5 * torch.randn_like(p))
    rows = tiny_rows(6, n_frames=n_frames(cfg.audio), captions_per_clip=1, generated=True)
    b = make_batch(rows, cfg, model, train=True, generator=torch.Generator())
    gen = b.text_generated
    assert bool(gen.any()) and bool((~gen).any())
    out = model(**b.forward_kwargs())
    with torch.no_grad():
        t = model.encode_text(b.text)
        fused = model.score(model.encode_audio(b.mel, b.mel_mask, b.aux, b.aux_mask), t).levels
        plain = model.score(model.encode_audio(b.mel, b.mel_mask), t).levels
    for level in ("clip", "segment", "frame"):
        got = out.scores.levels[level]
        assert not torch.allclose(fused[level][:, gen], plain[level][:, gen], atol=1e-4)  # the fusion matters
        torch.testing.assert_close(got[:, ~gen], fused[level][:, ~gen], atol=1e-5, rtol=1e-5)
        want = plain if audio == "unfused" else fused
        torch.testing.assert_close(got[:, gen], want[level][:, gen], atol=1e-5, rtol=1e-5)
    # the generated captions' loss terms reach the fusion only when they are scored against fused audio
    model.zero_grad()
    only_gen = b.forward_kwargs()
    only_gen["pair_weight"] = b.pair_weight * gen.to(b.pair_weight.dtype)
    model(**only_gen).losses["total"].backward()
    grads = [p.grad for p in model.fusion.parameters() if p.grad is not None]
    moved = any(float(g.abs().max()) > 0 for g in grads)
    assert moved == (audio == "fused")
