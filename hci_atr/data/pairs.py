"""Hard-negative pair files: the contract of the compositional benchmark, its writer and its reader.

A pair file (``make-demo`` writes ``demo_pairs.json``) is a JSON list of objects, one per pair of clips that differ
in exactly one described way::

    {"a": "<audio id>", "b": "<audio id>",          clip ids as the dataset reader gives them (Clotho: file name)
     "type": "order" | "attribute" | "count" | "background",
     "attribute": "loudness" | "pitch" | ... | null, which attribute changed ("attribute" pairs; else null)
     "split": "train" | "val" | "test",              the split both clips are in
     "a_captions": [0, 2, ...], "b_captions": [...]} optional: 0-based positions, among that clip's captions in the
                                                     dataset's order, of the captions that are false of the other
                                                     clip (the ones that tell the two apart); absent = all captions

:func:`read_pairs` maps the ids to the row indices of one evaluated split and drops pairs with a clip outside it;
:func:`hci_atr.metrics.pair_accuracy` scores them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from hci_atr.errors import DataError, one_line

PAIR_TYPES = ("order", "attribute", "count", "background")


class Pair(NamedTuple):
    """Two audio rows ``i``, ``j`` of one evaluated split and how they differ (see the module docstring)."""

    i: int
    j: int
    type: str
    attribute: str | None = None
    captions_i: tuple[int, ...] | None = None  # positions among row i's captions that tell i from j; None = all
    captions_j: tuple[int, ...] | None = None


def _check_entry(e: Any, where: str) -> dict:
    """The entry as a clean dict, or a DataError naming ``where`` and the field."""
    if not isinstance(e, dict):
        raise DataError(f"{where}: expected an object with keys a, b, type, got {type(e).__name__}")
    for key in ("a", "b", "type"):
        if not isinstance(e.get(key), str) or not e[key].strip():
            raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if e["a"] == e["b"]:
        raise DataError(f"{where}: fields 'a' and 'b' name the same clip '{e['a']}'")
    if e["type"] not in PAIR_TYPES:
        raise DataError(f"{where}: field 'type': '{e['type']}' is not one of {', '.join(PAIR_TYPES)}")
    attribute = e.get("attribute")
    if attribute is not None and (not isinstance(attribute, str) or not attribute.strip()):
        raise DataError(f"{where}: field 'attribute' must be a non-empty string or null")
    out = {"a": e["a"], "b": e["b"], "type": e["type"], "attribute": attribute, "split": e.get("split")}
    for key in ("a_captions", "b_captions"):
        caps = e.get(key)
        if caps is None:
            continue
        if not isinstance(caps, list) or not caps or \
                not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in caps):
            raise DataError(f"{where}: field '{key}' must be a non-empty list of caption positions (0, 1, ...)")
        out[key] = sorted(set(caps))
    return out


def write_pairs(path: str | os.PathLike, entries: Sequence[dict]) -> None:
    """Write ``entries`` (dicts of the module docstring's keys) as a pair file, checked against the contract."""
    clean = [_check_entry(e, f"pair {n}") for n, e in enumerate(entries)]
    Path(path).write_text(json.dumps(clean, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_pairs(path: str | os.PathLike, audio_ids: Sequence[str]) -> list[Pair]:
    """The pairs of ``path`` whose two clips are both in ``audio_ids`` (the evaluated split's clips, in row order),
    as row indices. A pair naming a clip outside ``audio_ids`` is dropped (it belongs to another split)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: pair file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON pair file ({one_line(e)})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of pairs, got {type(data).__name__}")
    row = {str(a): n for n, a in enumerate(audio_ids)}
    out = []
    for n, entry in enumerate(data):
        e = _check_entry(entry, f"{path}: pair {n}")
        if e["a"] in row and e["b"] in row:
            caps_a, caps_b = e.get("a_captions"), e.get("b_captions")
            out.append(Pair(row[e["a"]], row[e["b"]], e["type"], e["attribute"],
                            tuple(caps_a) if caps_a is not None else None,
                            tuple(caps_b) if caps_b is not None else None))
    return out
