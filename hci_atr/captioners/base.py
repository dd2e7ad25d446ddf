"""The captioner interface, the helpers the backends share, and the registry of backends by name.

Every backend is a callable class with the same interface, so the Ray Data pipeline (``workflows/caption.py``) can
run any of them as an actor pool with ``ds.map_batches(Cls, fn_constructor_kwargs=..., compute=ActorPoolStrategy(..))``:

* ``__init__(model, device="cpu", **params)`` loads the model once per actor. A setup failure (model missing, wrong
  kind of model, unknown parameter) raises :class:`~hci_atr.errors.CaptionerError` saying what to fix.
* ``check_setup(model, params)`` (classmethod) makes the cheap part of those checks (parameter names and values,
  the model reference, input directories) without loading anything, so a driver can fail in one line before it
  starts any actor.
* ``identity(model, params)`` (classmethod) is what decides the rows a backend writes (name, model reference,
  effective parameters minus the operational ones), for a resumed run to compare against.
* ``__call__(batch) -> batch`` maps a column batch (dict of equal-length numpy arrays or lists) with the columns
  ``audio_id, audio_path, video_path (None/"" when absent), start_time (float, NaN when unknown), split, captions``
  to the columns :data:`OUTPUT_COLUMNS`. A per-row failure never raises: that row gets ``generated_caption=""`` and
  a one-line ``error``; the other rows of the batch are still captioned. ``seconds`` is the row's own decode time
  plus an equal share of the batched model time. ``confidence`` is the backend's own measure of how much the
  caption can be trusted (``nearest``: the cosine of the clip and the training clip it borrowed from), NaN where
  the backend has none; ``model.ac_min_confidence`` ignores captions below a threshold
  (:func:`hci_atr.data.shards.read_captions`).

Backends, each in its own module and imported only when asked for by name (:func:`captioner_class`):
``blip`` (video frames, :mod:`hci_atr.captioners.blip`), ``audio`` (audio-to-text seq2seq,
:mod:`hci_atr.captioners.audio`), ``nearest`` (caption of the nearest training clip, :mod:`hci_atr.captioners.nearest`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from hci_atr.data.text import normalize_caption  # noqa: F401 - the backends' deduplication key, re-exported
from hci_atr.errors import CaptionerError, one_line

OUTPUT_COLUMNS = ("audio_id", "generated_caption", "captioner", "model", "params", "seconds", "confidence", "error")


class CaptionRow(NamedTuple):
    """What a backend's :meth:`Captioner.caption_rows` gives per row."""

    caption: str
    error: str
    seconds: float
    confidence: float | None = None  # None: the backend has no measure


MERGE_RULES = ("join", "most_frequent")


# -- caption text -------------------------------------------------------------------------------------------------


def merge_captions(captions: Sequence[str], rule: str = "join") -> str:
    """Merge the per-frame captions of one clip (given in time order) into one auxiliary caption.

    ``join``: distinct normalised captions in time order joined with ``" ; "``.
    ``most_frequent``: the normalised caption produced for most frames; ties go to the earliest frame.
    Empty captions are ignored; all empty -> ``""``. An unknown rule raises :class:`CaptionerError` (also with no
    captions, so ``merge_captions([], rule)`` checks a rule).
    """
    if rule not in MERGE_RULES:
        raise CaptionerError(f"merge rule '{rule}' is unknown; use 'join' or 'most_frequent'")
    norm = [normalize_caption(c) for c in captions]
    norm = [c for c in norm if c]
    if not norm:
        return ""
    if rule == "join":
        return " ; ".join(dict.fromkeys(norm))
    counts = Counter(norm)  # most_frequent
    best = max(counts.values())
    return next(c for c in norm if counts[c] == best)


# -- batch cells --------------------------------------------------------------------------------------------------


def column(batch: dict[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    """Column ``name`` of a batch as a list (``n`` times ``default`` when the batch has no such column)."""
    if name not in batch:
        return [default] * n
    return list(batch[name])


def batch_len(batch: dict[str, Any]) -> int:
    if "audio_id" not in batch:
        raise CaptionerError(f"caption batch has no 'audio_id' column (columns: {', '.join(batch)})")
    return len(batch["audio_id"])


def cell_text(value: Any) -> str:
    """A cell as a string: None/NaN -> ""."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def decode_rows(paths: list[Any], decode: Callable[[str], Any]) -> tuple[list[Any], list[str], list[float]]:
    """Decode each row's audio with ``decode(path)``: ``(values, errors, seconds)`` per row. A row whose audio is
    missing or unreadable gets a one-line error (and ``None``) instead of raising, so the batch goes on."""
    n = len(paths)
    values: list[Any] = [None] * n
    errors = [""] * n
    seconds = [0.0] * n
    for i in range(n):
        t0 = time.perf_counter()
        path = cell_text(paths[i])
        try:
            if not path:
                raise ValueError("no audio_path for clip")
            values[i] = decode(path)
        except Exception as e:  # noqa: BLE001 - unreadable audio is a row error
            errors[i] = one_line(e)
        seconds[i] = time.perf_counter() - t0
    return values, errors, seconds


def run_isolated(items: list[Any], fn: Callable[[list[Any]], list[str]]) -> tuple[list[str], list[str]]:
    """Run a batched model call; if the whole batch fails, retry item by item so one bad item only fails itself.

    Returns (outputs, errors) aligned with ``items``; a failed item has output "" and a one-line error.
    """
    try:
        return fn(items), [""] * len(items)
    except Exception as batch_exc:  # noqa: BLE001 - any model failure becomes a row error
        if len(items) == 1:
            return [""], [one_line(batch_exc)]
    outs, errs = [], []
    for item in items:
        try:
            outs.append(fn([item])[0])
            errs.append("")
        except Exception as e:  # noqa: BLE001
            outs.append("")
            errs.append(one_line(e))
    return outs, errs


# -- models -------------------------------------------------------------------------------------------------------


def torch_device(device: str):
    import torch

    try:
        return torch.device(device)
    except RuntimeError as e:
        raise CaptionerError(f"device '{device}' is not valid ({one_line(e)}); use 'cpu' or 'cuda'") from None


def check_model_ref(model: str | None, backend: str) -> str:
    """A transformers model argument must be an existing local directory or an HF id (``org/name``)."""
    if not model:
        raise CaptionerError(f"captioner '{backend}' needs a model: pass an HF id (already in the local cache) "
                             f"or a local directory written by save_pretrained")
    model = str(model)
    looks_local = os.path.isabs(model) or model.startswith(".") or os.path.exists(model) or model.count("/") > 1
    if looks_local:
        p = Path(model)
        if not p.exists():
            raise CaptionerError(f"captioner '{backend}': model directory {p} not found; pass an existing "
                                 f"save_pretrained directory or an HF id")
        if not (p / "config.json").is_file():
            raise CaptionerError(f"captioner '{backend}': {p} has no config.json, so it is not a transformers "
                                 f"model directory; pass the folder written by save_pretrained")
    return model


def pretrained_error(backend: str, model: str, exc: BaseException) -> CaptionerError:
    return CaptionerError(f"captioner '{backend}': cannot load model '{model}' ({one_line(exc)}); pass a local "
                          f"save_pretrained directory, or an HF id that is in the local cache "
                          f"(or allow_download=True where the network is reachable)")


# -- the interface ------------------------------------------------------------------------------------------------


class Captioner:
    """Base class: parameter checking, the per-row bookkeeping and the output columns.

    Subclasses set ``name`` and ``defaults`` (every parameter and its default), optionally ``default_model`` (used
    when no model is given), ``operational`` (parameters that change how the rows are computed but not what they
    are: batch sizes, download switches) and ``path_params`` (parameters that name files), and implement
    :meth:`caption_rows`, which returns one ``(caption, error, seconds)`` per row and must not raise for per-row
    problems. A subclass with more setup checks extends :meth:`check_setup`.
    """

    name: str = ""
    defaults: dict[str, Any] = {}
    default_model: str | None = None
    operational: tuple[str, ...] = ()
    path_params: tuple[str, ...] = ()

    def __init__(self, model: str | None, device: str = "cpu", **params: Any) -> None:
        self.check_params(params)
        self.params: dict[str, Any] = {**self.defaults, **params}
        model = model or self.default_model
        self.model_ref = "" if model is None else str(model)
        self.device = device

    # -- setup checks and identity, without loading anything ----------------------------------------------------
    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Unknown parameter names raise :class:`CaptionerError` listing the known ones."""
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            raise CaptionerError(f"captioner '{cls.name}': unknown parameter(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(cls.defaults))})")

    @classmethod
    def check_setup(cls, model: str | None, params: dict[str, Any]) -> None:
        """The cheap setup checks the constructor makes (no model is loaded); raises :class:`CaptionerError`."""
        cls.check_params(params)

    @classmethod
    def identity(cls, model: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """What decides the rows this backend writes for ``model`` and ``params``: ``{"captioner", "model",
        "params"}``, the model reference as given (absolute when it is a local directory) and the effective
        parameters minus the :attr:`operational` ones, file parameters made absolute. Two runs with equal
        identities write the same rows."""
        ref = model or cls.default_model or ""
        ref = os.path.abspath(ref) if ref and os.path.isdir(ref) else str(ref)
        resolved = {k: v for k, v in {**cls.defaults, **params}.items() if k not in cls.operational}
        for k in cls.path_params:
            if resolved.get(k):
                resolved[k] = os.path.abspath(os.fspath(resolved[k]))
        return {"captioner": cls.name, "model": ref, "params": json.loads(json.dumps(resolved, default=str))}

    # -- captioning -----------------------------------------------------------------------------------------------
    @property
    def params_json(self) -> str:
        """The effective parameters as sorted JSON (the ``params`` column; file paths as given)."""
        return json.dumps(self.params, sort_keys=True, default=str)

    def caption_rows(self, batch: dict[str, Any], n: int) -> list[CaptionRow]:
        """One :class:`CaptionRow` (or a ``(caption, error, seconds)`` tuple) per row; never raises for a row."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        rows = [CaptionRow(*r) for r in self.caption_rows(batch, n)] if n else []
        return {
            "audio_id": np.array([str(a) for a in column(batch, "audio_id", n)], dtype=object),
            "generated_caption": np.array([r.caption for r in rows], dtype=object),
            "captioner": np.array([self.name] * n, dtype=object),
            "model": np.array([self.model_ref] * n, dtype=object),
            "params": np.array([self.params_json] * n, dtype=object),
            "seconds": np.array([r.seconds for r in rows], dtype=np.float32),
            "confidence": np.array([math.nan if r.confidence is None else r.confidence for r in rows],
                                   dtype=np.float32),
            "error": np.array([r.error for r in rows], dtype=object),
        }


# -- registry -----------------------------------------------------------------------------------------------------

# backend name -> "module:Class"; a backend's module (and its heavy imports) loads only when it is asked for
BACKENDS: dict[str, str] = {
    "blip": "hci_atr.captioners.blip:BlipCaptioner",
    "audio": "hci_atr.captioners.audio:AudioCaptioner",
    "nearest": "hci_atr.captioners.nearest:NearestCaptioner",
}


def captioner_class(name: str) -> type[Captioner]:
    """The class for a backend name (what the pipeline hands to ``map_batches``)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise CaptionerError(f"unknown captioner '{name}'; choose one of: {', '.join(BACKENDS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_captioner(name: str, model: str | None = None, device: str = "cpu", **params: Any) -> Captioner:
    """Construct a backend by name: ``build_captioner("blip", "/models/blip", num_frames=3)``."""
    return captioner_class(name)(model, device, **params)
