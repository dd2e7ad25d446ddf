"""Hard-negative captions: the same words in another order, or one attribute flipped.

A caption's hard negatives describe a sound its clip is not, while sharing almost every word with the caption, so
a model must hear order and attributes to tell them apart (the CompA / T-CLAP idea). They are negatives for their
own clip only, never positives for any clip (:func:`hci_atr.losses.hard_negative_loss`).

- :func:`order_swapped`: the caption's events in reverse order. Events are runs of the phrase chunker's phrases
  (:func:`hci_atr.data.text.chunk_phrases`) separated by a sequence marker (:data:`SEQUENCE_MARKERS`: "then",
  "and then", "followed by", "after", "before", "and finally"; a comma separates events too once the caption has
  a marker); the events are reversed and the markers stay where they were, so "a dog barks, then a car passes" ->
  "a car passes then a dog barks" and "a dog barks after a car passes" -> "a car passes after a dog barks". A
  leading "after X, Y" reads as "Y after X"; what frames the whole sequence stays in place (a leading "first", an
  opening "over a hum," and a closing "while a hum continues", "with a hum throughout"). None when the caption
  has no marker between two events. The result is the caption's words, lower case, without punctuation.
- :func:`attribute_flipped`: every attribute word (:data:`ATTRIBUTE_FLIPS`: loudness, pitch, length, rate, count,
  weight, size) replaced by its opposite, the rest of the caption untouched. None when there is none.

Both are deterministic. :func:`hard_negative_texts` builds a batch's hard negatives and which caption each came from.
:data:`CONCURRENCY_WORDS` (phrases that happen together, so their order means nothing) and :data:`SEQUENCE_WORDS`
are the order vocabulary the order-aware score (:mod:`hci_atr.models.order`) uses too.
"""

from __future__ import annotations

import re

from hci_atr.data.text import chunk_phrases, split_words

# words that put two events in sequence (each is a function word of the chunker, so it starts a phrase)
SEQUENCE_WORDS = frozenset({"then", "after", "before", "followed", "finally"})
SEQUENCE_MARKERS = ("then", "and then", "followed by", "after", "before", "and finally")
# words that make a phrase's events concurrent with the rest of the caption: its place in the caption is no order
CONCURRENCY_WORDS = frozenset({"while", "whilst", "over", "throughout", "during", "as", "with", "meanwhile",
                               "simultaneously", "background"})

# attribute word -> its opposite (one direction per entry; both directions are listed where both are words)
ATTRIBUTE_FLIPS: dict[str, str] = {
    # loudness
    "loud": "quiet", "quiet": "loud", "faint": "loud", "soft": "loud", "loudly": "quietly", "quietly": "loudly",
    "softly": "loudly", "faintly": "loudly", "louder": "quieter", "quieter": "louder", "softer": "louder",
    # pitch
    "high": "low", "low": "high", "higher": "lower", "lower": "higher", "shrill": "deep", "deep": "shrill",
    # length
    "short": "long", "long": "short", "brief": "long", "shorter": "longer", "longer": "shorter",
    # rate
    "fast": "slow", "slow": "fast", "quick": "slow", "quickly": "slowly", "slowly": "quickly", "rapid": "slow",
    "rapidly": "slowly", "faster": "slower", "slower": "faster",
    # count
    "two": "three", "three": "two", "four": "five", "five": "four", "once": "twice", "twice": "once",
    # weight and size
    "heavy": "light", "light": "heavy", "heavily": "lightly", "lightly": "heavily", "large": "small",
    "small": "large", "big": "small",
    # change
    "increasing": "decreasing", "decreasing": "increasing",
}
_ATTRIBUTE_RE = re.compile(r"\b(" + "|".join(sorted(ATTRIBUTE_FLIPS, key=len, reverse=True)) + r")\b",
                           re.IGNORECASE)

HARD_NEGATIVE_KINDS = ("none", "order", "attribute", "both")


_CLAUSE_PUNCT = re.compile(r"[,;:.!?]+")


def clause_breaks(caption: str) -> set[int]:
    """Word indices that follow clause punctuation (``, ; : . ! ?``; not a hyphen or an apostrophe)."""
    out: set[int] = set()
    n = 0
    for part in _CLAUSE_PUNCT.split(caption):
        w = split_words(part)[0]
        if w and n:
            out.add(n)
        n += len(w)
    return out


class _Word(str):
    """A word that remembers its index in the caption; it compares, hashes and joins as the plain word."""

    index: int


def _indexed(words: list[str]) -> list[str]:
    out = []
    for i, w in enumerate(words):
        x = _Word(w)
        x.index = i
        out.append(x)
    return out


def _events(caption: str, indexed: bool = False) -> tuple[list[str], list[list[str]], list[str], list[str]] | None:
    """A caption -> (opening, events, markers, closing): ``len(markers) == len(events) - 1``, marker k between event
    k and k + 1, in the caption's order of mention ("" where only punctuation separates two events); ``opening`` /
    ``closing``: words that frame the whole sequence and stay in place ("first", "over a hum," / "while a hum
    continues in the background"). None when the caption has no sequence marker between two events. ``indexed``:
    every word is a :class:`_Word` that knows its index in ``split_words(caption)``."""
    words, breaks = split_words(caption)
    if indexed:
        words = _indexed(words)
    if not words:
        return None
    clause = clause_breaks(caption)
    ph = [[words[i] for i in p] for p in chunk_phrases(words, breaks, max_len=len(words))]
    starts = [p[0] for p in chunk_phrases(words, breaks, max_len=len(words))]
    opening: list[str] = []
    k = 0
    if ph[0][0] in CONCURRENCY_WORDS:  # "over a hum, a beep then a knock": the framing clause stays first
        k = next((i for i in range(1, len(ph)) if starts[i] in clause), 0)
        if k == 0:
            return None
        opening = [w for p in ph[:k] for w in p]
    if ph[k][0] == "first" and len(ph[k]) > 1:
        opening.append("first")
        ph[k] = ph[k][1:]
    events: list[list[list[str]]] = [[]]  # events as lists of phrases
    markers: list[str] = []
    leading: str | None = None
    while k < len(ph):
        p, marker, rest = ph[k], None, ph[k][1:]
        head = p[0]
        if head == "then":
            marker = "then"
            if events[-1] and events[-1][-1] == ["and"]:  # "a and then b": the "and" belongs to the marker
                events[-1].pop()
                marker = "and then"
        elif head == "and" and len(p) > 1 and p[1] == "finally":
            marker, rest = "and finally", p[2:]
        elif head == "followed" and len(p) == 1 and k + 1 < len(ph) and ph[k + 1][0] == "by":
            marker, rest = "followed by", ph[k + 1][1:]
            k += 1
        elif head in ("after", "before"):
            marker = head
        elif starts[k] in clause and events[-1] and head not in CONCURRENCY_WORDS:
            marker, rest = "", p  # "a beep, a knock and then a bell": a comma separates events too
        if marker is not None and not events[-1] and not markers and marker in ("after", "before"):
            leading = marker  # "after a beep, a knock"
            events[-1].append(rest)
        elif marker is not None:
            markers.append(marker)
            events.append([rest] if rest else [])
        else:
            events[-1].append(p)
        k += 1
    if leading is not None:  # "after X, Y" reads "Y after X"
        cut = [i for i, m in enumerate(markers) if m == ""]
        if not cut or any(m for m in markers):
            return None
        first, second = events[: cut[0] + 1], events[cut[0] + 1:]
        events = [[p for e in second for p in e], [p for e in first for p in e]]
        markers = [leading]
    closing: list[str] = []
    last = events[-1]
    tail = next((i for i in range(1, len(last)) if last[i] and last[i][0] in CONCURRENCY_WORDS), None)
    if tail is not None and markers:  # "... then a knock while a hum continues": the hum spans the sequence
        closing = [w for p in last[tail:] for w in p]
        events[-1] = last[:tail]
    flat = [[w for p in e for w in p] for e in events]
    for i in range(1, len(flat)):  # "then finally a bell": "finally" belongs to the marker
        if flat[i] and flat[i][0] == "finally":
            markers[i - 1] = (markers[i - 1] + " finally").strip()
            flat[i] = flat[i][1:]
    if not any(markers) or any(not e for e in flat):
        return None  # only commas between clauses state no order
    return opening, flat, markers, closing


# markers after which the next event comes *earlier* in time ("a knock after a beep": the beep is first)
_BACKWARD_MARKERS = frozenset({"after"})


def event_places(caption: str) -> list[float | None]:
    """Per word of ``split_words(caption)``: the place in time of the event the word describes, ``(rank + 1/2) /
    n_events``, with the events ranked by the caption's sequence markers ("a beep, then a knock" and "a knock after
    a beep" both put the beep at 0.25 and the knock at 0.75). None for words outside every event (the markers, a
    framing "first", "over a hum," or "while a hum continues"), and for every word of a caption that states no
    order: one event, or markers that disagree in direction ("a beep then a knock after a bell")."""
    words = split_words(caption)[0]
    out: list[float | None] = [None] * len(words)
    parsed = _events(caption, indexed=True)
    if parsed is None:
        return out
    _, events, markers, _ = parsed
    backward = [m in _BACKWARD_MARKERS for m in markers]
    if any(backward) and not all(backward):
        return out
    ranks = range(len(events) - 1, -1, -1) if all(backward) else range(len(events))
    for rank, event in zip(ranks, events):
        for w in event:
            out[w.index] = (rank + 0.5) / len(events)
    return out


def order_swapped(caption: str) -> str | None:
    """The caption with its events in reverse order (markers in place); None when it has no order to swap."""
    parsed = _events(caption)
    if parsed is None:
        return None
    opening, events, markers, closing = parsed
    if events == events[::-1]:
        return None  # the events read the same either way ("a beep then a beep")
    out = opening + events[-1]
    for m, e in zip(markers, events[-2::-1]):
        out += m.split() + e
    return " ".join(out + closing)


def _match_case(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[0].isupper():
        return word[0].upper() + word[1:]
    return word


def attribute_flipped(caption: str) -> str | None:
    """The caption with every attribute word replaced by its opposite; None when it has no attribute word."""
    out, n = _ATTRIBUTE_RE.subn(lambda m: _match_case(m.group(0), ATTRIBUTE_FLIPS[m.group(0).lower()]), caption)
    return out if n else None


def _key(text: str) -> tuple[str, ...]:
    return tuple(split_words(text)[0])


def hard_negatives(caption: str, kind: str, exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The hard negatives of one caption for ``kind`` ("none" | "order" | "attribute" | "both"): at most one of
    each type, none that reads (word for word) as the caption itself or as one of ``exclude`` (the clip's other
    captions: a negative must never describe its own clip)."""
    if kind not in HARD_NEGATIVE_KINDS:
        raise ValueError(f"hard negatives: unknown kind {kind!r} (use one of {', '.join(HARD_NEGATIVE_KINDS)})")
    makers = {"none": (), "order": (order_swapped,), "attribute": (attribute_flipped,),
              "both": (order_swapped, attribute_flipped)}[kind]
    seen = {_key(caption), *(_key(c) for c in exclude)}
    out = []
    for make in makers:
        neg = make(caption)
        if neg is not None and _key(neg) not in seen:
            seen.add(_key(neg))
            out.append(neg)
    return out


def hard_negative_texts(captions: list[str], kind: str, own_captions: list[list[str]] | None = None
                        ) -> tuple[list[str], list[int]]:
    """A batch's hard negatives: ``(texts, source)`` with ``source[k]`` = index in ``captions`` of the caption text
    ``k`` was built from. ``own_captions[j]``: every caption of caption j's clip (none of them may come back as a
    negative of j). Empty lists when no caption has one."""
    texts: list[str] = []
    source: list[int] = []
    for j, cap in enumerate(captions):
        for neg in hard_negatives(cap, kind, own_captions[j] if own_captions is not None else ()):
            texts.append(neg)
            source.append(j)
    return texts, source
