"""HCI levels: segment pooling, set similarity (hand-computed, padding invariance, blocking), phrases/chunker."""

import torch
import torch.nn.functional as F
import pytest

from hci_atr.data.text import chunk_phrases, ngram_phrases, phrases, split_words
from hci_atr.models.hci import segment_pool, set_similarity


def test_chunker_splits_at_function_words_and_punctuation():
    words, breaks = split_words("A dog barks, then a car passes by and people talk in the distant background")
    ph = [[words[i] for i in p] for p in chunk_phrases(words, breaks, max_len=3)]
    assert ph == [["a", "dog", "barks"], ["then", "a", "car"], ["passes"], ["by"], ["and", "people", "talk"],
                  ["in", "the", "distant"], ["background"]]
    # every word exactly once, in order
    assert sum(ph, []) == words
    assert phrases("one two three four", mode="ngram", n=3) == [[0, 1, 2], [1, 2, 3]]
    assert ngram_phrases(2, 3) == [[0, 1]] and ngram_phrases(0, 3) == []
    assert phrases("a b c d e f", max_words=4, n=2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        phrases("x", mode="bogus")


def test_segment_pool_windows_and_masks():
    frames = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(1, 1, 2)
    mask = torch.ones(1, 10, dtype=torch.bool)
    seg, smask = segment_pool(frames, mask, size=4, stride=3)
    # windows [0..3], [3..6], [6..9] -> means 1.5, 4.5, 7.5
    assert seg[0, :, 0].tolist() == [1.5, 4.5, 7.5] and smask.tolist() == [[True, True, True]]
    # the same clip followed by padding gives the same valid segments
    pf = torch.cat([frames, torch.full((1, 7, 2), 99.0)], 1)
    pm = torch.cat([mask, torch.zeros(1, 7, dtype=torch.bool)], 1)
    seg2, smask2 = segment_pool(pf, pm, size=4, stride=3)
    assert smask2.sum() == 3 and torch.equal(seg2[smask2], seg[smask])
    # 9 valid frames: the last window is partial (frames 6..8) and still valid
    seg3, smask3 = segment_pool(frames[:, :9], mask[:, :9], 4, 3)
    assert seg3[0, smask3[0], 0].tolist() == [1.5, 4.5, 7.0]


def test_set_similarity_hand_computed():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one audio, two units (x, y)
    t = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # one text, two units
    s = set_similarity(a, torch.ones(1, 2, dtype=torch.bool), t, torch.ones(1, 2, dtype=torch.bool))
    # text units' best: 1.0 and 0.8 -> 0.9; audio units' best: 1.0 and 0.8 -> 0.9
    assert s.item() == pytest.approx(0.9)
    # masking the second text unit: text side 1.0; audio side: x->1.0, y->0.0 -> 0.5; mean 0.75
    s2 = set_similarity(a, torch.ones(1, 2, dtype=torch.bool), t, torch.tensor([[True, False]]))
    assert s2.item() == pytest.approx(0.75)


def _rand_units(b, n, d, gen):
    x = F.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    lengths = torch.randint(1, n + 1, (b,), generator=gen)
    mask = torch.arange(n)[None] < lengths[:, None]
    return x * mask[..., None], mask


def test_set_similarity_padding_invariant_and_blocked_equals_full():
    g = torch.Generator().manual_seed(0)
    a, am = _rand_units(5, 7, 8, g)
    t, tm = _rand_units(6, 4, 8, g)
    full = set_similarity(a, am, t, tm)
    # extra padded units filled with junk change nothing
    a_pad = torch.cat([a, torch.randn(5, 3, 8, generator=g)], 1)
    am_pad = torch.cat([am, torch.zeros(5, 3, dtype=torch.bool)], 1)
    t_pad = torch.cat([t, torch.randn(6, 5, 8, generator=g)], 1)
    tm_pad = torch.cat([tm, torch.zeros(6, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(set_similarity(a_pad, am_pad, t_pad, tm_pad), full)
    # blocks of a few pairs give the same matrix as one block
    torch.testing.assert_close(set_similarity(a, am, t, tm, max_elems=7 * 4 * 2), full)
    # reference by explicit loops
    ref = torch.zeros(5, 6)
    for i in range(5):
        for j in range(6):
            m = a[i, am[i]] @ t[j, tm[j]].T
            ref[i, j] = 0.5 * (m.max(0).values.mean() + m.max(1).values.mean())
    torch.testing.assert_close(full, ref)


def test_a_level_with_no_valid_unit_on_one_side_scores_exactly_zero():
    """A text with no word (or audio with no frame) must add nothing to the fused score: the -1e4 'ignore me'
    sentinel of the max used to leak into the mean (a zero-width-space query scored -9999.5)."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    am = torch.ones(3, 4, dtype=torch.bool)
    tm = torch.ones(2, 5, dtype=torch.bool)
    tm[1] = False  # text 1: no valid unit
    am[2] = False  # audio 2: no valid unit
    s = set_similarity(a, am, t, tm)
    assert torch.all(s[:, 1] == 0) and torch.all(s[2] == 0)
    assert torch.all(s[:2, 0].abs() <= 1) and torch.all(s[:2, 0] != 0)
    # the valid pairs are unchanged by the rows that have nothing, and by the blocked path
    torch.testing.assert_close(s[:2, :1], set_similarity(a[:2], am[:2], t[:1], tm[:1]))
    torch.testing.assert_close(set_similarity(a, am, t, tm, max_elems=20), s)


def _old_split_words(text):
    import re

    token = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")
    words, breaks = [], set()
    for tok in token.findall(text.lower()):
        if tok[0].isalnum():
            words.append(tok)
        elif words:
            breaks.add(len(words))
    return words, breaks


def test_words_of_printable_ascii_are_those_of_the_earlier_rule():
    import random
    import string

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "   \t\n'''"
    samples = ["A dog barks, then a car passes by", "dog's bark'", "'tis rain... (heavy)", "mp3_file-name 42"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    for s in samples:
        assert split_words(s) == _old_split_words(s), s


def test_non_latin_words_and_queries_without_words():
    from hci_atr.data.text import check_query
    from hci_atr.errors import QueryError

    assert split_words("собака лает") == (["собака", "лает"], set())
    assert split_words("Café, au lait") == (["café", "au", "lait"], {1})
    assert split_words("cafe\u0301")[0] == ["café"]  # decomposed accent: NFC first, still one word
    assert split_words("a\u200bdog") == (["a", "dog"], set())  # zero-width space separates, breaks nothing
    assert split_words("犬が吠える", refine=list)[0] == ["犬", "が", "吠", "え", "る"]  # non-ASCII words refined
    assert split_words("dog 犬", refine=lambda w: ["X"])[0] == ["dog", "X"]  # ASCII words never are
    for q in ("\u200b\u200b", "\x00\x07", "!!! ...", "\u0301"):
        with pytest.raises(QueryError, match="no words"):
            check_query(q)
    with pytest.raises(QueryError, match="empty"):
        check_query("  \n ")
    with pytest.raises(QueryError, match="longer than the limit of 5"):
        check_query("a dog barks", max_chars=5)
    with pytest.raises(QueryError, match="expected a string"):
        check_query(3)
    assert check_query("  犬が吠える ") == "犬が吠える"
