"""The paper-scale recipes (configs/*.yaml) load, and run end to end on tiny copies of the datasets they are for.

For Clotho and AudioCaps a tiny folder in the real layout is written (a few short wavs), the recipe is loaded and only
its sizes are shrunk (tiny text encoder, cnn-small instead of CNN14, 1 s crops, 1 epoch, tiny batches, CPU), and the
documented commands run in-process through the CLI: extract-features -> caption-all -> train (Ray Train) -> evaluate.
Everything else (HCI levels, AC uses, learning rate, temperature, segment sizes ...) is the recipe's own.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from workflows.cli import main
from workflows.settings import Settings, load_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SR = 32000
_WORDS = ["beep", "hum", "buzz", "chirp", "whistle", "tone", "drone", "ring"]


def _wave(k: int, seconds: float) -> np.ndarray:
    """Clip ``k``: a tone at its own pitch plus a little noise, so clips differ audibly."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(k)
    return (0.3 * np.sin(2 * np.pi * (220.0 * (1.25 ** k)) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _captions(k: int, n: int) -> list[str]:
    w = _WORDS[k % len(_WORDS)]
    return [f"a {w} sound number {k} variant {j}" if j else f"a steady {w} sound at pitch {k}" for j in range(n)]


def write_tiny_clotho(root: Path) -> dict[str, int]:
    """Clotho v2 layout: development/ validation/ evaluation/ wavs (0.6-1.5 s) + clotho_captions_<folder>.csv."""
    sizes = {"development": 8, "validation": 3, "evaluation": 4}
    k = 0
    for folder, n in sizes.items():
        (root / folder).mkdir(parents=True)
        with open(root / f"clotho_captions_{folder}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
            for _ in range(n):
                name = f"clip {k:02d}.wav"  # Clotho file names have spaces
                sf.write(root / folder / name, _wave(k, 0.6 + 0.9 * (k % 3) / 2), SR)
                w.writerow([name] + _captions(k, 5))
                k += 1
    return {"train": 8, "val": 3, "test": 4}


def write_tiny_audiocaps(root: Path) -> dict[str, int]:
    """AudioCaps layout: {train,val,test}.csv (audiocap_id,youtube_id,start_time,caption; one caption per training
    clip, five rows per val/test clip) and audio/<split>/Y<youtube_id>.wav (1.2 s instead of 10 s)."""
    sizes = {"train": 8, "val": 3, "test": 4}
    k, cap_id = 0, 1000
    for split, n in sizes.items():
        (root / "audio" / split).mkdir(parents=True)
        with open(root / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            for _ in range(n):
                yid = f"yt{k:03d}AbC_d"
                sf.write(root / "audio" / split / f"Y{yid}.wav", _wave(k, 1.2), SR)
                for cap in _captions(k, 1 if split == "train" else 5):
                    w.writerow([cap_id, yid, 30, cap])
                    cap_id += 1
                k += 1
    return sizes


# the only keys the test changes: sizes (and CPU instead of GPU, since tests have no GPU)
def _tiny(recipe: Settings, text_dir: Path, work: Path, workers: int) -> Settings:
    data = recipe.to_dict()
    data["model"]["audio_checkpoint"] = None  # no CNN14 weights for cnn-small (override() skips None values)
    return Settings.from_dict(data).override({
        "audio.duration": 1.0, "model.audio_encoder": "cnn-small", "model.audio_width": 4,
        "model.text_encoder": str(text_dir), "model.embed_dim": 32,
        "model.max_words": 16, "train.epochs": 1, "train.batch_size": 8 // workers, "run.num_workers": workers,
        "run.use_gpu": False, "run.storage_path": str(work / "ray_results"), "train.early_stopping_patience": 0,
        "run.features_dir": str(work / "features"), "pipeline.num_workers": 1, "pipeline.batch_size": 8,
        "pipeline.rows_per_shard": 8, "serve.model_dir": str(work / "model"), "serve.index_dir": str(work / "index"),
    })


def _set_fields(path: Path) -> list[tuple[str, str]]:
    """(section, field) pairs the recipe file sets explicitly (so they must reach the trained model unchanged)."""
    import yaml

    data = yaml.safe_load(path.read_text())
    return [(s, f) for s, vals in data.items() for f in vals]


def test_recipes_load_and_say_what_they_promise():
    for name in ("demo", "audiocaps", "clotho"):
        cfg = load_settings(CONFIGS / f"{name}.yaml")
        assert isinstance(cfg, Settings)
    assert load_settings(CONFIGS / "demo.yaml") == Settings()  # demo.yaml spells out the defaults
    # compositional.yaml is the preset's settings with the switches of the row that measured best, nothing else
    from workflows.variants import VARIANTS, get_preset, variant_config

    preset = get_preset("compositional")
    best = variant_config(Settings().override(preset.overrides), VARIANTS["hci_order_text2"], 0)
    assert load_settings(CONFIGS / "compositional.yaml") == best
    for name, seconds, lr in (("audiocaps", 10.0, 1e-4), ("clotho", 30.0, 5e-5)):
        cfg = load_settings(CONFIGS / f"{name}.yaml")
        assert cfg.audio.sample_rate == 32000 and cfg.audio.n_mels == 64 and cfg.audio.duration == seconds
        assert cfg.model.audio_encoder == "cnn14" and cfg.model.audio_checkpoint.endswith(".pth")
        assert cfg.model.text_encoder == "bert-base-uncased"
        assert 64 <= cfg.train.batch_size * cfg.run.num_workers <= 128
        assert cfg.train.lr == pytest.approx(lr) and cfg.train.warmup_epochs > 0 and cfg.run.use_gpu
        assert cfg.model.use_clip and cfg.model.use_segment and cfg.model.use_frame
        assert cfg.model.ac_fusion and cfg.model.ac_branch and cfg.model.ac_augment
        # CNN14 sees exactly what PANNs was trained on, and trains as the Mei et al. / WavCaps recipes do
        assert cfg.audio.frontend == "panns" and cfg.model.audio_clip_pooling == "panns"
        assert cfg.model.audio_spec_augment and cfg.model.audio_dropout > 0 and cfg.model.audio_fc_dropout > 0


@pytest.mark.ray
@pytest.mark.parametrize("dataset,workers", [("clotho", 2), ("audiocaps", 1)])
def test_recipe_end_to_end_on_a_tiny_copy(ray_session, tmp_path, tiny_text_dir, capsys, dataset, workers):
    from tiny_models import build_tiny_audio_captioner

    data = tmp_path / dataset
    sizes = (write_tiny_clotho if dataset == "clotho" else write_tiny_audiocaps)(data)
    recipe_path = CONFIGS / f"{dataset}.yaml"
    recipe = load_settings(recipe_path)
    cfg = _tiny(recipe, tiny_text_dir, tmp_path, workers)
    tiny_yaml = tmp_path / f"{dataset}_tiny.yaml"
    cfg.save(tiny_yaml)
    feats, caps = tmp_path / "features", tmp_path / "captions"
    captioner = build_tiny_audio_captioner(tmp_path / "captioner")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    main(["extract-features", "--data", str(data), "--out", str(feats), "--config", str(tiny_yaml)])
    main(["caption-all", "--data", str(data), "--out", str(caps), "--config", str(tiny_yaml), "--captioner", "audio",
          "--model", str(captioner), "--param", "max_new_tokens=6", "--param", "num_beams=1"])
    main(["train", "--features", str(feats), "--captions", str(caps), "--config", str(tiny_yaml),
          "--tracking-uri", uri, "--run-name", f"{dataset}-tiny"])
    model_dir = tmp_path / "ray_results" / f"{dataset}-tiny" / "best_model"
    capsys.readouterr()
    main(["evaluate", "--model", str(model_dir), "--features", str(feats), "--split", "test", "--captions", str(caps),
          "--json"])
    metrics = json.loads(capsys.readouterr().out)

    # the reader found every clip in its split, with the right number of captions (AudioCaps train: 1, else 5)
    from hci_atr.data.shards import read_captions, read_split_rows

    for split, n in sizes.items():
        rows = read_split_rows(feats, split)
        assert len(rows) == n
        per_clip = 1 if (dataset == "audiocaps" and split == "train") else 5
        assert all(len(r["captions"]) == per_clip for r in rows)
        assert all(r["n_frames"] == 101 and r["n_mels"] == 64 for r in rows)  # 1 s at the recipe's 10 ms hop
    assert len(read_captions(caps)) == sum(sizes.values())  # every clip has an auxiliary caption

    # the trained model carries the recipe's settings except the shrunk sizes
    trained = load_settings(model_dir / "config.yaml")
    shrunk = {k for k in cfg.flat() if cfg.flat()[k] != recipe.flat()[k]}
    for section, name in _set_fields(recipe_path):
        key = f"{section}.{name}"
        if section in ("model", "audio") and key not in shrunk:
            assert trained.flat()[key] == recipe.flat()[key], key
    assert trained.model.ac_fusion and trained.model.ac_branch and trained.model.ac_augment
    assert trained.model.segment_size == recipe.model.segment_size and not trained.model.freeze_text

    # evaluation: every test clip and caption ranked; numbers are percentages and consistent
    assert metrics["n_audio"] == sizes["test"] and metrics["n_text"] == sizes["test"] * 5
    for d in ("t2a", "a2t"):
        vals = [metrics[f"{d}_R1"], metrics[f"{d}_R5"], metrics[f"{d}_R10"]]
        assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in vals)
        assert vals == sorted(vals)
    assert metrics["t2a_R5"] == 100.0  # 4 test clips: the true clip is always within the top 5
    for level in ("clip", "segment", "frame", "ac_branch"):
        assert f"{level}_rsum" in metrics


def test_override_null_clears_an_optional_field_and_none_means_not_given(tmp_path):
    from hci_atr.config import NULL
    from hci_atr.errors import ConfigError

    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  audio_checkpoint: /weights/cnn14.pth\ntrain:\n  epochs: 3\n")
    assert load_settings(path).model.audio_checkpoint == "/weights/cnn14.pth"
    cfg = load_settings(path, {"model.audio_checkpoint": NULL, "train.epochs": None})
    assert cfg.model.audio_checkpoint is None and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="train.epochs"):
        Settings().override({"train.epochs": NULL})  # not optional: a one-line error, not a silent skip
