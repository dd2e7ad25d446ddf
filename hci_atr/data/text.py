"""Words and phrases of a caption, and the check that a search query has any.

Captions are split into *words*: lower-cased runs of Unicode letters, digits and combining marks, joined across
single apostrophes ("dog's"); other visible characters are punctuation, kept only as a boundary marker; control and
format characters (zero-width space, ...) separate words like spaces. For printable ASCII this is exactly the earlier
``[a-z0-9]+(?:'[a-z0-9]+)*`` rule. ``refine`` lets a caller cut a non-ASCII word further at its tokenizer's own word
boundaries (the text encoder does: a Japanese run such as "犬が吠える" becomes the words the tokenizer sees).
Phrases are then built from word *indices*, so the model pools phrase embeddings from word embeddings (see
``hci_atr.models.text_encoder`` for how word pieces become words).

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

import unicodedata
from typing import Callable

from hci_atr.errors import QueryError

# Words that start a new phrase. Articles and pronouns are *not* here: "a dog" must stay together.
FUNCTION_WORDS = frozenset(
    """
    and or but then while with without by after before as of in on at into onto from to over under through
    during until near behind above below along across against around between followed when whilst than
    """.split()
)


def _kind(ch: str) -> str:
    """"w" word character (letter, digit, combining mark), "s" separator, "'" apostrophe, "p" punctuation."""
    if ch == "'":
        return "'"
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)
    if cat[0] in "LNM":
        return "w"
    if cat in ("Cc", "Cf", "Zs", "Zl", "Zp"):  # control / format (zero-width) characters separate, break nothing
        return "s"
    return "p"


def _tokens(text: str) -> list[str]:
    """Words and single punctuation characters of lower-cased NFC ``text``, in order."""
    text = unicodedata.normalize("NFC", text).lower()
    kinds = [_kind(c) for c in text]
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        k = kinds[i]
        if k == "w":
            j = i + 1
            while j < n and (kinds[j] == "w" or (kinds[j] == "'" and j + 1 < n and kinds[j + 1] == "w")):
                j += 1
            word = text[i:j]
            # a run of combining marks only is no word
            out.append(word if any(c.isalnum() for c in word) else "\0")
            i = j
        else:
            if k != "s":
                out.append(text[i])
            i += 1
    return out


def split_words(text: str, refine: Callable[[str], list[str]] | None = None) -> tuple[list[str], set[int]]:
    """Split a caption into words and the set of word indices that follow punctuation.

    Returns ``(words, breaks)``: ``breaks`` holds ``i`` when punctuation sits between word ``i-1`` and word ``i``.
    ``refine(word) -> list of words`` is applied to each word that is not plain ASCII (ASCII words are kept as
    they are, so English captions split the same with or without it).
    """
    words: list[str] = []
    breaks: set[int] = set()
    for tok in _tokens(text):
        if tok[0].isalnum():
            words.extend(refine(tok) if refine is not None and not tok.isascii() else [tok])
        elif words:
            breaks.add(len(words))
    return words, breaks


def normalize_caption(text: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation: when two captions are the same text (the
    captioners deduplicate by it; training counts identical texts as positives of every clip that owns one)."""
    return " ".join(str(text).lower().split()).strip(" .;,")


def check_query(query: object, max_chars: int | None = None) -> str:
    """A search query, stripped; raises :class:`QueryError` when it is not a string, is empty, is longer than
    ``max_chars`` or holds no word (only punctuation, control or zero-width characters)."""
    if not isinstance(query, str):
        raise QueryError("query: expected a string")
    q = query.strip()
    if not q:
        raise QueryError("query: empty; type some words describing the sound")
    if max_chars is not None and len(q) > max_chars:
        raise QueryError(f"query: {len(q)} characters is longer than the limit of {max_chars}")
    if not words_of(q):
        raise QueryError("query: no words (only punctuation, control or zero-width characters); type some words "
                         "describing the sound")
    return q


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
