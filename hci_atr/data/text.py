"""Words and phrases of a caption.

Captions are split into *words* with a simple regular expression (lower-cased runs of letters/digits/apostrophes);
punctuation is kept only as a boundary marker. Phrases are then built from word *indices*, so the model pools phrase
embeddings from word embeddings (see ``hci_atr.models.text_encoder`` for how word pieces become words).

Phrase rule (``mode="chunk"``, documented here because it defines the segment-phrase level):

1. Punctuation ends a phrase (the punctuation itself is not a word).
2. A *function word* (conjunctions and prepositions such as ``and, then, while, with, by, after, before, as, of``)
   starts a new phrase and belongs to it: "a dog barks while a car passes by" ->
   ["a dog barks", "while a car", "passes", "by"] before the length cap.
3. A phrase longer than ``max_len`` words is cut into consecutive pieces of at most ``max_len`` words.

``mode="ngram"`` instead returns every window of ``n`` consecutive words (stride 1; a caption shorter than ``n`` gives
one window with all its words).
"""

from __future__ import annotations

import re

# Words that start a new phrase. Articles and pronouns are *not* here: "a dog" must stay together.
FUNCTION_WORDS = frozenset(
    """
    and or but then while with without by after before as of in on at into onto from to over under through
    during until near behind above below along across against around between followed when whilst than
    """.split()
)

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")


def split_words(text: str) -> tuple[list[str], set[int]]:
    """Split a caption into words and the set of word indices that follow punctuation.

    Returns ``(words, breaks)``: ``breaks`` holds ``i`` when punctuation sits between word ``i-1`` and word ``i``.
    """
    words: list[str] = []
    breaks: set[int] = set()
    for tok in _TOKEN.findall(text.lower()):
        if tok[0].isalnum():
            words.append(tok)
        elif words:
            breaks.add(len(words))
    return words, breaks


def words_of(text: str) -> list[str]:
    """Just the words of ``text`` (see :func:`split_words`)."""
    return split_words(text)[0]


def chunk_phrases(words: list[str], breaks: set[int] | None = None, max_len: int = 3) -> list[list[int]]:
    """Rule-based chunker: lists of word indices, one list per phrase, in order, covering every word once."""
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    breaks = breaks or set()
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i, w in enumerate(words):
        if cur and (i in breaks or w in FUNCTION_WORDS):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    out: list[list[int]] = []
    for c in chunks:
        out.extend(c[k:k + max_len] for k in range(0, len(c), max_len))
    return out


def ngram_phrases(n_words: int, n: int = 3) -> list[list[int]]:
    """Every window of ``n`` consecutive word indices (stride 1)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if n_words == 0:
        return []
    if n_words <= n:
        return [list(range(n_words))]
    return [list(range(s, s + n)) for s in range(n_words - n + 1)]


def phrases(text_or_words: str | list[str], mode: str = "chunk", n: int = 3, max_words: int | None = None,
            breaks: set[int] | None = None) -> list[list[int]]:
    """Phrases of a caption as word-index lists; only the first ``max_words`` words are used."""
    if isinstance(text_or_words, str):
        words, breaks = split_words(text_or_words)
    else:
        words = list(text_or_words)
    if max_words is not None:
        words = words[:max_words]
    if mode == "chunk":
        return chunk_phrases(words, breaks, n)
    if mode == "ngram":
        return ngram_phrases(len(words), n)
    raise ValueError(f"unknown phrase mode '{mode}' (use 'chunk' or 'ngram')")
