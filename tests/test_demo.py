"""Procedural demo dataset: determinism, layout, captions that agree with the audio (checked from the waveform), and
the hard-negative pair file (demo_pairs.json) that agrees with the scenes."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from workflows.cli import cli
from hci_atr.data import demo as demo_mod
from hci_atr.data.demo import EVENT_TYPES, make_demo, peak_frame_rms
from hci_atr.data.formats import read_dataset
from hci_atr.data.pairs import Pair, read_pairs
from hci_atr.errors import DataError

SR = 16000


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """120 clips of 4 s: enough scenes of every kind for the audio checks below."""
    root = tmp_path_factory.mktemp("scenes") / "demo"
    make_demo(root, seed=7, size=120, duration=4.0, sample_rate=SR, progress=False)
    meta = json.loads((root / "demo_metadata.json").read_text())
    waves = {}
    for rec in read_dataset(root):
        wave, sr = sf.read(rec.audio_path, dtype="float64")
        assert sr == SR
        waves[rec.audio_id] = wave
    return root, meta, waves


def _window(wave: np.ndarray, onset: float, offset: float, pad: float = 0.0) -> np.ndarray:
    return wave[max(0, int((onset - pad) * SR)): int((offset + pad) * SR)]


def _dominant_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    spec[freqs < 40] = 0
    return float(freqs[spec.argmax()])


def _onsets(x: np.ndarray) -> int:
    """Count note onsets: 5 ms frame RMS crossing 30 % of the window's peak, with hysteresis at 10 %."""
    m = int(0.005 * SR)
    rms = np.sqrt((x[: len(x) // m * m].reshape(-1, m) ** 2).mean(1))
    hi, lo = 0.3 * rms.max(), 0.1 * rms.max()
    count, on = 0, False
    for v in rms:
        if not on and v > hi:
            count, on = count + 1, True
        elif on and v < lo:
            on = False
    return count


def _caption_order(caption: str, words: dict[str, str]) -> list[str]:
    """Attribute words in the order the caption presents events in time (``B after A`` is reversed)."""
    pattern = r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b"
    found = [words[w] for w in re.findall(pattern, caption.lower())]
    return found[::-1] if " after " in caption else found


def _plain_clips(meta):
    """Clips with no background event, so each foreground window holds one event over the noise floor."""
    return [c for c in meta["clips"] if all(e["role"] == "foreground" for e in c["events"])]


# ---------------------------------------------------------------------------------------------------------------
# determinism and layout
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_demo(tmp_path / name, seed=seed, size=8, duration=1.5, sample_rate=8000, progress=False)
    a, b, c = (_digest(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 8 + 3 + 2  # clips, caption CSVs, demo_metadata.json and demo_pairs.json
    assert "demo_pairs.json" in a  # the pair file too is the same for the same seed
    # another seed: other scenes (and another split assignment), so every clip's bytes differ
    wav_a = {Path(k).name: v for k, v in a.items() if k.endswith(".wav")}
    wav_c = {Path(k).name: v for k, v in c.items() if k.endswith(".wav")}
    assert wav_a.keys() == wav_c.keys() and all(wav_a[k] != wav_c[k] for k in wav_a)


def test_demo_reads_as_clotho(demo_root):
    recs = read_dataset(demo_root)
    assert len(recs) == 24
    assert [sum(r.split == s for r in recs) for s in ("train", "val", "test")] == [16, 4, 4]
    for r in recs:
        assert len(r.captions) == 5 and all(c.strip() for c in r.captions)
        info = sf.info(r.audio_path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 32000, "PCM_16")
    meta = json.loads((demo_root / "demo_metadata.json").read_text())
    assert all(2 <= len(c["events"]) <= 4 for c in meta["clips"])


def test_event_variety_and_near_twins(scenes):
    _, meta, _ = scenes
    assert len(EVENT_TYPES) >= 12
    used = {e["type"] for c in meta["clips"] for e in c["events"]}
    assert used == set(EVENT_TYPES)
    captions = [cap for c in meta["clips"] for cap in c["captions"]]
    assert len(set(captions)) > 0.9 * len(captions)  # varied wording
    # fine-grained pairs: same event types, different order or attributes
    by_types = {}
    for c in meta["clips"]:
        by_types.setdefault(tuple(sorted(e["type"] for e in c["events"])), []).append(c)
    twins = [g for g in by_types.values() if len(g) > 1 and
             len({json.dumps([(e["type"], e["attributes"]) for e in c["events"]]) for c in g}) > 1]
    assert len(twins) >= 10
    relations = " ".join(captions)
    for word in (" then ", " followed by ", " after ", " while ", " throughout", " repeated "):
        assert word in relations


# ---------------------------------------------------------------------------------------------------------------
# captions agree with the audio
# ---------------------------------------------------------------------------------------------------------------

PITCH_WORDS = {"high": "high", "high-pitched": "high", "shrill": "high", "low": "low", "low-pitched": "low",
               "deep": "low"}
LOUD_WORDS = {"loud": "loud", "quiet": "quiet", "soft": "quiet", "faint": "quiet"}
COUNT_WORDS = {"two": 2, "twice": 2, "three": 3, "four": 4}
SPECTRAL_PITCH = ("beep", "buzzy_tone", "mellow_tone", "bell")  # types whose strongest partial is the fundamental


def test_pitch_words_match_measured_frequency(scenes):
    """'a high X then a low Y': the event the caption calls high has the higher dominant frequency in its window."""
    _, meta, waves = scenes
    pairs = 0
    for clip in _plain_clips(meta):
        fg = clip["events"]
        pitched = [e for e in fg if "pitch" in e["attributes"]]
        if not pitched or any(e["type"] not in SPECTRAL_PITCH for e in pitched) or \
                any(e["type"] == "rumble" for e in fg) or any(e["attributes"].get("count") for e in pitched):
            continue
        wave = waves[clip["file_name"]]
        freqs = [_dominant_hz(_window(wave, e["onset"] + 0.02, min(e["offset"], e["onset"] + 0.4) - 0.02))
                 for e in pitched]
        said = _caption_order(clip["captions"][0], PITCH_WORDS)  # the first caption names every attribute
        assert len(said) == len(pitched), clip["captions"][0]
        for word, hz in zip(said, freqs):
            assert (hz > 700) if word == "high" else (hz < 500), (clip["captions"][0], said, freqs)
        for i in range(len(said)):
            for j in range(len(said)):
                if said[i] == "high" and said[j] == "low":
                    assert freqs[i] > freqs[j]
                    pairs += 1
    assert pairs >= 5  # enough "high ... low" scenes were checked


def test_loudness_words_match_measured_rms(scenes):
    _, meta, waves = scenes
    loud, quiet = [], []
    for clip in _plain_clips(meta):
        wave = waves[clip["file_name"]]
        said = _caption_order(clip["captions"][0], LOUD_WORDS)
        assert len(said) == len(clip["events"]), clip["captions"][0]
        for word, e in zip(said, clip["events"]):
            level = peak_frame_rms(_window(wave, e["onset"], e["offset"]), SR)
            (loud if word == "loud" else quiet).append(level)
    assert len(loud) >= 20 and len(quiet) >= 20
    assert min(loud) > 3 * max(quiet)


def test_counted_events_match_detected_onsets(scenes):
    """'three knocks' / 'a beep repeated four times': onsets detected in the event's window equal the number."""
    _, meta, waves = scenes
    checked = set()
    for clip in _plain_clips(meta):
        counted = [e for e in clip["events"] if e["attributes"].get("count")]
        if not counted:
            continue
        wave = waves[clip["file_name"]]
        for caption in clip["captions"]:
            said = _caption_order(caption, COUNT_WORDS)
            if len(said) != len(counted):
                continue  # this wording left a count out
            for n, e in zip(said, counted):
                assert _onsets(_window(wave, e["onset"], e["offset"], pad=0.03)) == n == e["attributes"]["count"]
                checked.add(n)
    assert checked >= {2, 3}


def test_fast_ticking_has_more_onsets_per_second(scenes):
    _, meta, waves = scenes
    rates = {"fast": [], "slow": []}
    for clip in _plain_clips(meta):
        for e in clip["events"]:
            if e["type"] == "ticking":
                x = _window(waves[clip["file_name"]], e["onset"], e["offset"], pad=0.01)
                rates[e["attributes"]["rate"]].append(_onsets(x) / (e["offset"] - e["onset"]))
    assert rates["fast"] and rates["slow"]
    assert min(rates["fast"]) > 2 * max(rates["slow"])


def test_chirp_direction(scenes):
    _, meta, waves = scenes
    n = 0
    for clip in _plain_clips(meta):
        for e in clip["events"]:
            if e["type"] in ("chirp_up", "chirp_down"):
                x = _window(waves[clip["file_name"]], e["onset"], e["offset"])
                first, last = _dominant_hz(x[: len(x) // 4]), _dominant_hz(x[-len(x) // 4:])
                assert (last > first) if e["type"] == "chirp_up" else (last < first)
                n += 1
    assert n >= 5


# ---------------------------------------------------------------------------------------------------------------
# hard-negative pairs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """A default-size demo (240 clips of 5 s; 16 kHz to keep it light) and its pair file."""
    root = tmp_path_factory.mktemp("paired") / "demo"
    make_demo(root, seed=7, size=240, sample_rate=SR, progress=False)
    meta = json.loads((root / "demo_metadata.json").read_text())
    pairs = json.loads((root / "demo_pairs.json").read_text())
    return root, meta, pairs


def _foreground(clip) -> list[tuple[str, dict]]:
    return [(e["type"], e["attributes"]) for e in sorted(clip["events"], key=lambda e: e["onset"])
            if e["role"] == "foreground"]


def _background(clip) -> list[tuple[str, dict]]:
    return [(e["type"], e["attributes"]) for e in clip["events"] if e["role"] == "background"]


def test_pair_file_lists_variations_within_one_split(paired):
    root, meta, pairs = paired
    clips = {c["file_name"]: c for c in meta["clips"]}
    split_of = {r.audio_id: r.split for r in read_dataset(root)}
    assert pairs and all(p["a"] in split_of and p["b"] in split_of for p in pairs)
    for p in pairs:
        assert split_of[p["a"]] == split_of[p["b"]] == p["split"]
        assert clips[p["b"]]["variant_of"] == int(p["a"][5:9])  # b is the variation of the clip before it, a
    # every variation whose two clips share a split is listed
    assert len(pairs) == sum(c["variant_of"] is not None and meta["clips"][c["variant_of"]]["split"] == c["split"]
                             for c in meta["clips"])
    assert {p["type"] for p in pairs} >= {"order", "attribute", "count"}
    assert {p["attribute"] for p in pairs if p["type"] == "attribute"} == {"loudness", "pitch", "length", "rate"}
    assert all(p["attribute"] is None for p in pairs if p["type"] != "attribute")
    # each split's reader sees its own pairs, as row indices of that split
    for split in ("train", "val", "test"):
        ids = [a for a, s in split_of.items() if s == split]
        got = read_pairs(root / "demo_pairs.json", ids)
        mine = [p for p in pairs if p["split"] == split]
        assert len(got) == len(mine) and all(isinstance(g, Pair) for g in got)
        assert [(ids[g.i], ids[g.j], g.type) for g in got] == [(p["a"], p["b"], p["type"]) for p in mine]
        assert mine, split  # the test split has pairs of its own


def test_pair_clips_differ_only_in_their_type(paired):
    """Order pairs: the same foreground events reversed; attribute / count pairs: one event's attribute / count
    changed; the background is the same. The captions listed as telling the clips apart are never captions of the
    other clip, and every caption of order, count and rate pairs tells (those always name what changed)."""
    _, meta, pairs = paired
    clips = {c["file_name"]: c for c in meta["clips"]}
    for p in pairs:
        a, b = clips[p["a"]], clips[p["b"]]
        fa, fb = _foreground(a), _foreground(b)
        assert _background(a) == _background(b)
        if p["type"] == "order":
            assert [t for t, _ in fb] == [t for t, _ in fa][::-1] != [t for t, _ in fa]
            assert fb == fa[::-1]
        else:
            assert [t for t, _ in fa] == [t for t, _ in fb]
            changed = [(x, y) for x, y in zip(fa, fb) if x != y]
            assert len(changed) == 1
            (_, attrs_a), (_, attrs_b) = changed[0]
            key = "count" if p["type"] == "count" else p["attribute"]
            assert {k for k in attrs_a if attrs_a[k] != attrs_b.get(k)} == {key} and attrs_a.keys() == attrs_b.keys()
        for mine, other, telling in ((a, b, p["a_captions"]), (b, a, p["b_captions"])):
            assert 0 in telling  # the first caption names every attribute
            assert not {mine["captions"][k] for k in telling} & set(other["captions"])
            if p["type"] in ("order", "count") or p["attribute"] == "rate":
                assert telling == [0, 1, 2, 3, 4]
    assert any(len(p["a_captions"]) < 5 for p in pairs)  # some captions leave the changed attribute out


# ---------------------------------------------------------------------------------------------------------------
# writing and the CLI
# ---------------------------------------------------------------------------------------------------------------


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = sf.write

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(demo_mod.sf, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        make_demo(tmp_path / "d", size=8, duration=1.0, sample_rate=8000, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary folder


def test_rerun_replaces_demo_but_not_other_folders(tmp_path):
    out = tmp_path / "d"
    make_demo(out, seed=1, size=6, duration=1.0, sample_rate=8000, progress=False)
    make_demo(out, seed=2, size=7, duration=1.0, sample_rate=8000, progress=False)
    assert len(read_dataset(out)) == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a demo dataset"):
        make_demo(other, size=6, duration=1.0, sample_rate=8000, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_make_demo_writes_readable_dataset(tmp_path):
    out = tmp_path / "cli_demo"
    result = CliRunner().invoke(cli, ["make-demo", "--out", str(out), "--size", "6", "--duration", "1",
                                      "--sample-rate", "8000", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "Wrote 6 demo clips" in result.output
    recs = read_dataset(out)
    assert len(recs) == 6 and sf.info(recs[0].audio_path).samplerate == 8000


def test_cli_bad_arguments_give_short_errors(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "make-demo", "--out", str(tmp_path / "taken"),
                           "--size", "6", "--duration", "1"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a demo dataset" in lines[0]
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "make-demo", "--out", str(tmp_path / "x"),
                           "--size", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Invalid value for '--size'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_pairs_in_split_keeps_the_audio_and_the_split_sizes_and_fills_every_split(tmp_path):
    import json

    from hci_atr.data.demo import make_demo

    make_demo(tmp_path / "a", seed=3, size=120, duration=1.0, sample_rate=8000, progress=False)
    make_demo(tmp_path / "b", seed=3, size=120, duration=1.0, sample_rate=8000, progress=False, pairs_in_split=True)
    ma = json.loads((tmp_path / "a" / "demo_metadata.json").read_text())["clips"]
    mb = json.loads((tmp_path / "b" / "demo_metadata.json").read_text())["clips"]
    assert [c["events"] for c in ma] == [c["events"] for c in mb]  # same scenes, same captions
    assert [c["captions"] for c in ma] == [c["captions"] for c in mb]
    count = lambda m, s: sum(c["split"] == s for c in m)  # noqa: E731
    assert all(count(ma, s) == count(mb, s) for s in ("train", "val", "test"))
    pairs_a = json.loads((tmp_path / "a" / "demo_pairs.json").read_text())
    pairs_b = json.loads((tmp_path / "b" / "demo_pairs.json").read_text())
    variations = sum(c["variant_of"] is not None for c in mb)
    assert len(pairs_b) > len(pairs_a) and len(pairs_b) >= 0.8 * variations
    assert {p["split"] for p in pairs_b} == {"train", "val", "test"}
