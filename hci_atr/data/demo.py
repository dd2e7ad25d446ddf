"""Procedural demo dataset: synthetic sound scenes with captions that describe exactly what is in the audio.

Each clip holds 2–4 sound events drawn from 14 synthesized types (beeps, rising / falling chirps, a siren, white-noise
hiss, a low rumble, ticking, knocking, hum, a buzzy tone, a mellow tone, a voice-like vowel, a bell and crackling).
Events carry attributes that are really in the signal:

* ``loudness`` loud / quiet: the event is scaled so its loudest 10 ms frame has RMS 0.2 (loud) or 0.03 (quiet)
  (background events 0.05 / 0.012);
* ``pitch`` high / low: the fundamental lies in disjoint ranges (see ``_PITCH``);
* ``length`` short / long: 0.2 s vs at least 0.5 s (offered only where the clip has room);
* ``rate`` fast / slow (ticking, siren modulation) and ``count`` 2–4 (repeated beeps, knocks).

Foreground events follow each other in time ("then", "followed by", "after"); an optional background event (hum,
hiss, rumble, crackling) spans the clip ("while", "over", "throughout"). About a third of the clips are variations of
the previous clip (same event types in reverse order, or one attribute / count changed), so telling clips apart needs
order, count and attributes, not only which sounds occur. Five captions per clip come from varied templates and
synonyms; the first names every attribute, the others may leave some out (never state something false).

Output (Clotho v2 layout, readable by :func:`hci_atr.data.formats.read_dataset`)::

    out_dir/development/*.wav  validation/*.wav  evaluation/*.wav          (PCM 16-bit, mono)
    out_dir/clotho_captions_{development,validation,evaluation}.csv        (file_name, caption_1..caption_5)
    out_dir/demo_metadata.json    events per clip (type, role, attributes, onset, offset, pulses): for inspection
                                  and tests only; nothing in the pipeline reads it
    out_dir/demo_pairs.json       the hard-negative pairs (a clip and its variation, both in one split), in the
                                  format of :mod:`hci_atr.data.pairs`: ``hci-atr evaluate --pairs`` scores them

The folder is built under a temporary name beside ``out_dir`` and renamed into place at the end, so an interrupted
run never leaves a dataset that looks complete. The same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from hci_atr.data.pairs import write_pairs
from hci_atr.files import replace_dir
from hci_atr.errors import ConfigError, DataError

FRAME_S = 0.010  # loudness is measured on 10 ms frames (peak frame RMS)
LEVELS = {("foreground", "loud"): 0.2, ("foreground", "quiet"): 0.03,
          ("background", "loud"): 0.05, ("background", "quiet"): 0.012}
NOISE_FLOOR_RMS = 0.0015  # light background noise under every clip (about -56 dBFS)
SHORT_S = 0.2
LONG_MIN_S = 0.5
PULSE_PERIOD_S = 0.16  # spacing of repeated beeps / knocks: the decay of one is > 40 dB down before the next
TICK_RATES = {"fast": 12.0, "slow": 3.0}  # ticks per second
SIREN_RATES = {"fast": 8.0, "slow": 2.0}  # frequency-modulation cycles per second
# fundamental frequency ranges (Hz) per pitch-bearing type: every "high" range lies above every "low" range
_PITCH = {
    "beep": {"high": (1800, 2400), "low": (300, 450)},
    "buzzy_tone": {"high": (800, 1000), "low": (110, 165)},
    "mellow_tone": {"high": (900, 1200), "low": (200, 300)},
    "vocal": {"high": (210, 260), "low": (95, 125)},
    "bell": {"high": (1200, 1600), "low": (300, 450)},
}
SPLIT_FOLDERS = (("train", "development"), ("val", "validation"), ("test", "evaluation"))


@dataclass(frozen=True)
class EventType:
    name: str
    forms: tuple[str, ...]  # noun-phrase templates: {adj} {cw} {ct} {rate} {rate_adv} {vowel}
    count_forms: tuple[str, ...] = ()  # used when count > 1
    pitch: bool = False
    length: bool = False
    rate: bool = False
    count: bool = False
    background: bool = False  # may run under the whole clip
    foreground: bool = True


EVENT_TYPES: dict[str, EventType] = {e.name: e for e in [
    EventType("beep", ("a {adj} beep", "a {adj} electronic beep", "a {adj} beeping tone"),
              count_forms=("{cw} {adj} beeps", "a {adj} beep repeated {ct}", "{cw} {adj} electronic beeps"),
              pitch=True, length=True, count=True),
    EventType("chirp_up", ("a {adj} rising chirp", "a {adj} upward sweep", "a {adj} tone sweeping upward"),
              length=True),
    EventType("chirp_down", ("a {adj} falling chirp", "a {adj} downward sweep", "a {adj} tone sweeping downward"),
              length=True),
    EventType("siren", ("a {adj} siren wailing {rate_adv}", "a {adj} {rate} siren",
                        "a {adj} siren-like wail that wavers {rate_adv}"), rate=True),
    EventType("hiss", ("a {adj} burst of white noise", "a {adj} hiss", "a {adj} hissing noise"),
              length=True, background=True),
    EventType("rumble", ("a {adj} low rumble", "a {adj} rumbling noise", "a {adj} deep rumble"),
              length=True, background=True),
    EventType("ticking", ("{adj} {rate} ticking", "{adj} clicks repeating {rate_adv}",
                          "a {adj} clock-like ticking going {rate_adv}"), rate=True),
    EventType("knocking", ("{adj} knocking",),
              count_forms=("{cw} {adj} knocks", "{adj} knocking {ct}", "a {adj} knock repeated {ct}"), count=True),
    EventType("hum", ("a {adj} hum", "a {adj} electrical hum", "a {adj} steady drone"),
              background=True, foreground=False),
    EventType("buzzy_tone", ("a {adj} buzzy tone", "a {adj} buzzing note", "a {adj} harsh tone"),
              pitch=True, length=True),
    EventType("mellow_tone", ("a {adj} mellow tone", "a {adj} flute-like note", "a {adj} smooth tone"),
              pitch=True, length=True),
    EventType("vocal", ("a {adj} voice-like '{vowel}'", "a {adj} sung '{vowel}' vowel",
                        "a {adj} vocal '{vowel}' sound"), pitch=True, length=True),
    EventType("bell", ("a {adj} bell", "a {adj} chime", "a {adj} ringing bell"), pitch=True),
    EventType("crackle", ("{adj} crackling", "a {adj} crackle", "{adj} popping and crackling"),
              background=True, foreground=False),
]}
FOREGROUND_TYPES = tuple(n for n, e in EVENT_TYPES.items() if e.foreground)
BACKGROUND_TYPES = tuple(n for n, e in EVENT_TYPES.items() if e.background)

_WORDS = {
    "loud": ("loud",), "quiet": ("quiet", "soft", "faint"),
    "high": ("high", "high-pitched", "shrill"), "low": ("low", "low-pitched", "deep"),
    "short": ("short", "brief"), "long": ("long", "sustained", "drawn-out"),
    "fast": ("fast", "rapid", "quick"), "slow": ("slow", "leisurely"),
}
_RATE_ADV = {"fast": ("quickly", "rapidly"), "slow": ("slowly",)}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
_COUNT_TIMES = {2: "twice", 3: "three times", 4: "four times"}
_SEQ2 = ("{0}, then {1}", "{0} followed by {1}", "{0} and then {1}", "first {0}, then {1}", "{1} after {0}",
         "{0} is heard before {1}")
_SEQ3 = ("{0}, then {1}, then {2}", "{0}, followed by {1} and then {2}", "first {0}, then {1}, and finally {2}",
         "{0}, {1} and then {2}")
_WITH_BG = ("{seq} while {bg} continues in the background", "{seq}, with {bg} throughout", "over {bg}, {seq}")


# ---------------------------------------------------------------------------------------------------------------
# scene specification
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Event:
    type: str
    role: str  # "foreground" | "background"
    attributes: dict = field(default_factory=dict)
    onset: float = 0.0
    offset: float = 0.0
    pulses: list = field(default_factory=list)  # onsets (s) of the pulses of a repeated event

    def to_json(self) -> dict:
        return {"type": self.type, "role": self.role, "attributes": dict(sorted(self.attributes.items())),
                "onset": round(self.onset, 4), "offset": round(self.offset, 4),
                "pulses": [round(p, 4) for p in self.pulses]}


def _slot_width(duration: float, k: int) -> float:
    return (duration - 0.2) / k


def _max_count(slot: float) -> int:
    return min(4, int((0.85 * slot - 0.1) // PULSE_PERIOD_S) + 1)


def _draw_attributes(rng: np.random.Generator, etype: EventType, role: str, slot: float) -> dict:
    attrs = {"loudness": str(rng.choice(["loud", "quiet"]))}
    if etype.pitch:
        attrs["pitch"] = str(rng.choice(["high", "low"]))
    if etype.rate:
        attrs["rate"] = str(rng.choice(["fast", "slow"]))
    if etype.count and role == "foreground" and _max_count(slot) >= 2 and (etype.name == "knocking" or rng.random() < 0.4):
        attrs["count"] = int(rng.integers(2, _max_count(slot) + 1))
    if etype.length and role == "foreground" and "count" not in attrs and 0.85 * slot >= LONG_MIN_S:
        attrs["length"] = str(rng.choice(["short", "long"]))
    if etype.name == "vocal":
        attrs["vowel"] = str(rng.choice(["ah", "ee"]))
    return attrs


def _draw_scene(rng: np.random.Generator, duration: float) -> tuple[list[Event], Event | None]:
    n_events = int(rng.integers(2, 5))
    use_bg = rng.random() < 0.35
    k = n_events - 1 if use_bg else n_events
    k = min(k, 3)  # at most three foreground events: each needs room for its attributes to be audible
    slot = _slot_width(duration, k)
    types = rng.choice(FOREGROUND_TYPES, size=k, replace=True)
    fg = [Event(str(t), "foreground", _draw_attributes(rng, EVENT_TYPES[str(t)], "foreground", slot)) for t in types]
    bg = None
    if use_bg:
        # a background never repeats a foreground type (a hiss over a hiss would not be heard as two events)
        t = str(rng.choice([b for b in BACKGROUND_TYPES if b not in {e.type for e in fg}]))
        bg = Event(t, "background", _draw_attributes(rng, EVENT_TYPES[t], "background", duration))
    return fg, bg


def _vary_scene(rng: np.random.Generator, prev: tuple[list[Event], Event | None], duration: float):
    """A near-twin of the previous scene: reversed order, or one attribute / count changed; and what changed,
    ``(pair type, attribute or None, index of the changed foreground event or None)``."""
    fg = [Event(e.type, e.role, dict(e.attributes)) for e in prev[0]]
    bg = Event(prev[1].type, prev[1].role, dict(prev[1].attributes)) if prev[1] else None
    slot = _slot_width(duration, len(fg))
    distinct_order = len(fg) > 1 and [e.type for e in fg] != [e.type for e in fg[::-1]]
    choice = rng.integers(0, 3)
    if choice == 0 and distinct_order:
        fg = fg[::-1]
        return fg, bg, ("order", None, None)
    k = int(rng.integers(0, len(fg)))
    e = fg[k]
    flips = [a for a in ("pitch", "loudness", "rate", "length") if a in e.attributes]
    if "count" in e.attributes and _max_count(slot) >= 3:
        flips.append("count")
    a = flips[int(rng.integers(0, len(flips)))]
    if a == "count":
        options = [c for c in range(2, _max_count(slot) + 1) if c != e.attributes["count"]]
        e.attributes["count"] = int(rng.choice(options))
    else:
        other = {"pitch": ("high", "low"), "loudness": ("loud", "quiet"), "rate": ("fast", "slow"),
                 "length": ("short", "long")}[a]
        e.attributes[a] = other[1] if e.attributes[a] == other[0] else other[0]
    return fg, bg, ("count", None, k) if a == "count" else ("attribute", a, k)


def _layout(rng: np.random.Generator, fg: list[Event], bg: Event | None, duration: float) -> None:
    """Give every event its onset/offset (and pulse onsets): foreground events in consecutive slots."""
    slot = _slot_width(duration, len(fg))
    for i, e in enumerate(fg):
        a = e.attributes
        if "count" in a:
            length = (a["count"] - 1) * PULSE_PERIOD_S + 0.1
        elif a.get("length") == "short":
            length = SHORT_S
        elif a.get("length") == "long":
            length = min(0.85 * slot, 1.5)
        elif e.type == "bell":
            length = min(0.85 * slot, 1.2)
        else:
            length = min(0.7 * slot, 1.2)
        start = 0.1 + i * slot + float(rng.uniform(0.0, max(0.0, 0.85 * slot - length)))
        e.onset, e.offset = start, start + length
        if "count" in a:
            e.pulses = [start + j * PULSE_PERIOD_S for j in range(a["count"])]
        elif e.type == "ticking":
            period = 1.0 / TICK_RATES[a["rate"]]
            e.pulses = list(start + 0.01 + np.arange(0.0, length - 0.02, period))
    if bg is not None:
        bg.onset, bg.offset = 0.05, duration - 0.05


# ---------------------------------------------------------------------------------------------------------------
# synthesis
# ---------------------------------------------------------------------------------------------------------------


def _fade(n: int, sr: int, attack: float = 0.005, release: float = 0.01) -> np.ndarray:
    env = np.ones(n)
    na, nr = min(n, max(1, int(attack * sr))), min(n, max(1, int(release * sr)))
    env[:na] *= np.linspace(0.0, 1.0, na)
    env[n - nr:] *= np.linspace(1.0, 0.0, nr)
    return env


def _harmonics(phase: np.ndarray, amps: list[float], f0: float, sr: int) -> np.ndarray:
    out = np.zeros_like(phase)
    for k, amp in enumerate(amps, start=1):
        if k * f0 < 0.45 * sr and amp > 0:
            out += amp * np.sin(k * phase)
    return out


def _shaped_noise(rng: np.random.Generator, n: int, sr: int, gain) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    return np.fft.irfft(spec * gain(f), n)


def _pulse_train(n: int, sr: int, onsets: list[float], pulse: np.ndarray) -> np.ndarray:
    out = np.zeros(n)
    for p in onsets:
        i = int(round(p * sr))
        j = min(n, i + len(pulse))
        if i < n:
            out[i:j] += pulse[: j - i]
    return out


def _synth(rng: np.random.Generator, e: Event, sr: int) -> np.ndarray:
    """The event's waveform, ``[round((offset - onset) * sr)]``, before loudness scaling."""
    n = max(1, int(round((e.offset - e.onset) * sr)))
    t = np.arange(n) / sr
    a = e.attributes
    f0 = float(rng.uniform(*_PITCH[e.type][a["pitch"]])) if "pitch" in a else 0.0
    rel = [p - e.onset for p in e.pulses]
    if e.type == "beep":
        if "count" in a:
            m = int(0.08 * sr)
            pulse = np.sin(2 * np.pi * f0 * np.arange(m) / sr) * _fade(m, sr)
            return _pulse_train(n, sr, rel, pulse)
        return np.sin(2 * np.pi * f0 * t) * _fade(n, sr)
    if e.type in ("chirp_up", "chirp_down"):
        lo, hi = float(rng.uniform(350, 500)), float(rng.uniform(2000, 2800))
        f_start, f_end = (lo, hi) if e.type == "chirp_up" else (hi, lo)
        dur = n / sr
        r = f_end / f_start  # exponential sweep: phase = 2π f_start dur (r^(t/dur) - 1) / ln r
        phase = 2 * np.pi * f_start * dur * (np.power(r, t / dur) - 1.0) / np.log(r)
        return np.sin(phase) * _fade(n, sr, 0.01, 0.02)
    if e.type == "siren":
        fc, dev = float(rng.uniform(800, 1000)), 300.0
        inst = fc + dev * np.sin(2 * np.pi * SIREN_RATES[a["rate"]] * t)
        phase = 2 * np.pi * np.cumsum(inst) / sr
        return _harmonics(phase, [1.0, 0.3, 0.15], fc + dev, sr) * _fade(n, sr, 0.03, 0.05)
    if e.type == "hiss":
        return rng.standard_normal(n) * _fade(n, sr, 0.01, 0.03)
    if e.type == "rumble":  # brown-ish noise below ~250 Hz
        gain = lambda f: np.where(f > 20, 1.0 / np.maximum(f, 20), 0.0) * (1.0 / (1.0 + (f / 250.0) ** 4))
        return _shaped_noise(rng, n, sr, gain) * _fade(n, sr, 0.05, 0.08)
    if e.type == "ticking":
        m = int(0.004 * sr)
        pulse = rng.standard_normal(m) * np.exp(-np.arange(m) / (0.0008 * sr))
        return _pulse_train(n, sr, rel, pulse)
    if e.type == "knocking":
        m = int(0.12 * sr)
        tk = np.arange(m) / sr
        fk = float(rng.uniform(120, 220))
        pulse = np.sin(2 * np.pi * fk * tk) * np.exp(-tk / 0.03)
        pulse[: int(0.004 * sr)] += 0.3 * rng.standard_normal(int(0.004 * sr))  # the impact transient
        return _pulse_train(n, sr, rel, pulse)
    if e.type == "hum":
        f = float(rng.uniform(55, 65))
        phase = 2 * np.pi * f * t
        return _harmonics(phase, [1.0, 0.6, 0.4, 0.2], f, sr) * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t)) * \
            _fade(n, sr, 0.1, 0.1)
    if e.type == "buzzy_tone":  # band-limited sawtooth: harmonic k at 1/k
        return _harmonics(2 * np.pi * f0 * t, [1.0 / k for k in range(1, 41)], f0, sr) * _fade(n, sr, 0.01, 0.03)
    if e.type == "mellow_tone":
        phase = 2 * np.pi * f0 * t + 0.005 * f0 / 5.0 * np.sin(2 * np.pi * 5.0 * t)  # gentle vibrato
        return _harmonics(phase, [1.0, 0.15, 0.05], f0, sr) * _fade(n, sr, 0.04, 0.05)
    if e.type == "vocal":  # additive glottal source shaped by three formant resonances
        formants = {"ah": ((730, 90, 1.0), (1090, 110, 0.5), (2440, 160, 0.25)),
                    "ee": ((270, 60, 1.0), (2290, 120, 0.4), (3010, 200, 0.25))}[a["vowel"]]
        amps = []
        for k in range(1, 60):
            fk = k * f0
            g = sum(w / (1.0 + ((fk - fc) / bw) ** 2) for fc, bw, w in formants)
            amps.append((0.2 + g) / k)
        phase = 2 * np.pi * f0 * t + 0.01 * f0 / 5.5 * np.sin(2 * np.pi * 5.5 * t)
        return _harmonics(phase, amps, f0, sr) * _fade(n, sr, 0.04, 0.06)
    if e.type == "bell":  # inharmonic partials, each with its own decay; the fundamental is the strongest
        out = np.zeros(n)
        for ratio, amp, tau in ((1.0, 1.0, 0.5), (2.76, 0.5, 0.25), (5.40, 0.3, 0.12), (8.93, 0.2, 0.08)):
            if ratio * f0 < 0.45 * sr:
                out += amp * np.sin(2 * np.pi * ratio * f0 * t) * np.exp(-t / tau)
        return out * _fade(n, sr, 0.002, 0.02)
    if e.type == "crackle":
        onsets = np.sort(rng.uniform(0, n / sr, size=max(1, int(30 * n / sr))))
        m = int(0.003 * sr)
        out = np.zeros(n)
        for p in onsets:
            i = int(p * sr)
            j = min(n, i + m)
            out[i:j] += rng.uniform(0.2, 1.0) * rng.standard_normal(j - i) * np.exp(-np.arange(j - i) / (0.0007 * sr))
        return out * _fade(n, sr, 0.05, 0.05)
    raise ValueError(f"unknown event type {e.type}")


def peak_frame_rms(x: np.ndarray, sr: int) -> float:
    """RMS of the loudest 10 ms frame (the loudness measure events are scaled by)."""
    m = max(1, int(FRAME_S * sr))
    k = max(1, len(x) // m)
    frames = np.asarray(x[: k * m], dtype=np.float64).reshape(k, m) if len(x) >= m else np.asarray(x)[None, :]
    return float(np.sqrt((frames ** 2).mean(axis=1)).max())


def _render(rng: np.random.Generator, events: list[Event], duration: float, sr: int) -> np.ndarray:
    n = int(round(duration * sr))
    mix = rng.standard_normal(n) * NOISE_FLOOR_RMS
    for e in events:
        w = _synth(rng, e, sr)
        w *= LEVELS[(e.role, e.attributes["loudness"])] / max(peak_frame_rms(w, sr), 1e-12)
        i = int(round(e.onset * sr))
        j = min(n, i + len(w))
        mix[i:j] += w[: j - i]
    return np.clip(mix, -0.99, 0.99).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(0, len(options)))])


def _phrase(rng: np.random.Generator, e: Event, full: bool, named: set | None = None) -> str:
    """A noun phrase for one event; ``full`` names every attribute, otherwise each may be left out. The attributes
    the phrase names are added to ``named``."""
    named = set() if named is None else named
    etype = EVENT_TYPES[e.type]
    a = e.attributes
    keep = lambda: full or rng.random() < 0.75
    adj = []
    for key in ("loudness", "length", "pitch"):
        if key in a and keep():
            adj.append(_pick(rng, _WORDS[a[key]]))
            named.add(key)
    count = a.get("count")
    template = _pick(rng, etype.count_forms if count else etype.forms)
    values = {"adj": " ".join(adj), "vowel": a.get("vowel", "")}
    if "rate" in a:
        values["rate"] = _pick(rng, _WORDS[a["rate"]])
        values["rate_adv"] = _pick(rng, _RATE_ADV[a["rate"]])
    if count:
        values["cw"], values["ct"] = _COUNT_WORDS[count], _COUNT_TIMES[count]
    named.update(key for key, field_ in (("rate", "{rate"), ("count", "{c")) if key in a and field_ in template)
    text = template.format(**values)
    text = re.sub(r"\ba (?=[aeiou])", "an ", " ".join(text.split()))
    return text


def _caption(rng: np.random.Generator, fg: list[Event], bg: Event | None, full: bool) -> tuple[str, list[set]]:
    """A caption of the scene, and the attributes it names of each foreground event."""
    named = [set() for _ in fg]
    parts = [_phrase(rng, e, full, n) for e, n in zip(fg, named)]
    if len(parts) == 1:
        seq = parts[0]
    elif len(parts) == 2:
        seq = _pick(rng, _SEQ2).format(*parts)
    else:
        seq = _pick(rng, _SEQ3).format(*parts)
    if bg is not None:
        bg_text = _phrase(rng, bg, full)
        seq = _pick(rng, _WITH_BG).format(seq=seq, bg=bg_text) if len(parts) > 1 else \
            _pick(rng, ("{seq} while {bg} continues in the background", "{seq} over {bg}",
                        "{seq}, with {bg} throughout")).format(seq=seq, bg=bg_text)
    return seq[0].upper() + seq[1:], named


def _captions(rng: np.random.Generator, fg: list[Event], bg: Event | None,
              n: int = 5) -> tuple[list[str], list[list[set]]]:
    """``n`` distinct captions where the scene allows, and per caption the attributes it names of each event."""
    first = _caption(rng, fg, bg, full=True)
    out, named = [first[0]], [first[1]]
    for _ in range(60):
        if len(out) == n:
            break
        c, c_named = _caption(rng, fg, bg, full=len(out) % 2 == 0 and rng.random() < 0.5)
        if c not in out:
            out.append(c)
            named.append(c_named)
    while len(out) < n:  # tiny scenes with few wordings: repeat rather than invent
        k = len(out) % max(1, len(out))
        out.append(out[k])
        named.append(named[k])
    return out, named


def _telling_captions(change: tuple[str, str | None, int | None], named: list[list[set]]) -> list[int]:
    """Positions of the captions that are false of the other clip of a variation pair: every caption tells a
    reversed order apart; a changed attribute or count only where the caption names it for the changed event."""
    kind, attribute, k = change
    if kind == "order":
        return list(range(len(named)))
    key = "count" if kind == "count" else attribute
    return [c for c, per_event in enumerate(named) if key in per_event[k]]


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------


def _split_sizes(size: int) -> dict[str, int]:
    n_val = max(1, int(round(0.15 * size)))
    n_test = max(1, int(round(0.15 * size)))
    return {"train": size - n_val - n_test, "val": n_val, "test": n_test}


def make_demo(out_dir: str | os.PathLike, seed: int = 0, size: int = 240, duration: float = 5.0,
              sample_rate: int = 32000, progress: bool = True, pairs_in_split: bool = False) -> str:
    """Write the demo dataset to ``out_dir`` (Clotho layout) and return a one-paragraph summary.

    ``pairs_in_split``: a variation goes to the split of the clip it varies (the split sizes stay the same: it swaps
    splits with the next clip that holds the wanted one), so every split, the test split too, holds about a third of
    its clips in pairs: the compositional benchmark. The audio and captions are the same for the same seed."""
    if size < 6:
        raise ConfigError(f"demo size must be at least 6 clips (got {size})")
    if not 1.0 <= duration <= 30.0:
        raise ConfigError(f"demo duration must be between 1 and 30 seconds (got {duration})")
    if sample_rate < 8000:
        raise ConfigError(f"demo sample rate must be at least 8000 Hz (got {sample_rate})")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "demo_metadata.json").is_file())):
        raise DataError(f"{out}: exists and is not a demo dataset; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        summary = _write(tmp, out, seed, size, duration, sample_rate, progress, pairs_in_split)
        replace_dir(tmp, out)  # an older demo is moved aside first, so no mixed folder is ever visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write(tmp: Path, out: Path, seed: int, size: int, duration: float, sr: int, progress: bool,
           pairs_in_split: bool = False) -> str:
    rng = np.random.default_rng(seed)
    sizes = _split_sizes(size)
    splits = np.array(["train"] * sizes["train"] + ["val"] * sizes["val"] + ["test"] * sizes["test"])
    splits = splits[rng.permutation(size)]
    folder_of = dict(SPLIT_FOLDERS)
    for _, folder in SPLIT_FOLDERS:
        (tmp / folder).mkdir()
    rows: dict[str, list[list[str]]] = {s: [] for s, _ in SPLIT_FOLDERS}
    clips_meta = []
    prev = None
    n_variants = 0
    pairs, prev_named = [], None
    for i in tqdm(range(size), desc="make-demo", unit="clip", disable=not progress):
        if prev is not None and rng.random() < 0.35:
            fg, bg, change = _vary_scene(rng, prev, duration)
            variant_of = i - 1
            n_variants += 1
        else:
            fg, bg = _draw_scene(rng, duration)
            variant_of, change = None, None
        prev = (fg, bg)
        fg = [Event(e.type, e.role, dict(e.attributes)) for e in fg]
        bg = Event(bg.type, bg.role, dict(bg.attributes)) if bg else None
        _layout(rng, fg, bg, duration)
        events = ([bg] if bg else []) + fg
        wave = _render(rng, events, duration, sr)
        captions, named = _captions(rng, fg, bg)
        if pairs_in_split and change is not None and splits[i] != splits[i - 1]:
            later = np.nonzero(splits[i + 1:] == splits[i - 1])[0]
            if len(later):  # swap with the next clip of the wanted split: the sizes stay as they were
                j = i + 1 + int(later[0])
                splits[i], splits[j] = splits[j], splits[i]
        split = str(splits[i])
        name = f"demo_{i:04d}.wav"
        if change is not None and splits[i - 1] == split:  # a pair is scored within one split
            pairs.append({"a": f"demo_{i - 1:04d}.wav", "b": name, "type": change[0], "attribute": change[1],
                          "split": split, "a_captions": _telling_captions(change, prev_named),
                          "b_captions": _telling_captions(change, named)})
        prev_named = named
        sf.write(tmp / folder_of[split] / name, wave, sr, subtype="PCM_16", format="WAV")
        rows[split].append([name, *captions])
        clips_meta.append({"file_name": name, "split": split, "variant_of": variant_of,
                           "events": [e.to_json() for e in sorted(events, key=lambda e: (e.onset, e.role))],
                           "captions": captions})
    meta = {"seed": seed, "size": size, "duration": duration, "sample_rate": sr,
            "event_types": sorted(EVENT_TYPES), "levels": {f"{r}/{l}": v for (r, l), v in LEVELS.items()},
            "clips": clips_meta}
    (tmp / "demo_metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    write_pairs(tmp / "demo_pairs.json", pairs)
    for split, folder in SPLIT_FOLDERS:  # caption CSVs last: they are what makes the folder read as a dataset
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        w.writerows(rows[split])
        (tmp / f"clotho_captions_{folder}.csv").write_text(buf.getvalue(), encoding="utf-8")
    used = sorted({e["type"] for c in clips_meta for e in c["events"]})
    return (f"Wrote {size} demo clips to {out} ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test, "
            f"{duration:g} s at {sr} Hz, Clotho layout, 5 captions each). Scenes hold 2-4 of {len(used)} synthesized "
            f"sound-event types with loudness, pitch, length, rate and count attributes and their order in time; "
            f"{n_variants} clips are variations of the previous one (order, count or an attribute changed); "
            f"{len(pairs)} of these pairs lie within one split and are in demo_pairs.json (hci-atr evaluate --pairs). "
            f"Read it with --data {out}; per-clip events are in demo_metadata.json (for inspection only).")
