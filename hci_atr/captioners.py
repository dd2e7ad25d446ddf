"""Captioner backends: write one auxiliary caption per clip ahead of training (the "AC" part of the method).

Every backend is a callable class with the same interface, so the Ray Data pipeline (``workflows/caption.py``) can
run any of them as an actor pool with ``ds.map_batches(Cls, fn_constructor_kwargs=..., compute=ActorPoolStrategy(..))``:

* ``__init__(model, device="cpu", **params)`` loads the model once per actor. A setup failure (model missing, wrong
  kind of model, unknown parameter) raises :class:`~hci_atr.errors.CaptionerError` saying what to fix.
* ``__call__(batch) -> batch`` maps a column batch (dict of equal-length numpy arrays or lists) with the columns
  ``audio_id, audio_path, video_path (None/"" when absent), start_time (float, NaN when unknown), split, captions``
  to the columns ``audio_id, generated_caption, captioner, model, params (JSON), seconds (float32), error``.
  A per-row failure never raises: that row gets ``generated_caption=""`` and a one-line ``error``; the other rows of
  the batch are still captioned. ``seconds`` is the row's own decode time plus an equal share of the batched
  model time.

Backends (``build_captioner(name, model, device, **params)``):

``blip`` -- image captioning of video frames (BLIP, ``BlipProcessor`` + ``BlipForConditionalGeneration.generate``).
    ``model``: HF id (must already be in the local cache unless ``allow_download=True``) or a local directory.
    Params: ``num_frames`` (3) frames per clip; ``clip_seconds`` (10.0) the clip's duration window in the video;
    ``max_new_tokens`` (20); ``num_beams`` (3); ``merge`` ("join" | "most_frequent", default "join");
    ``allow_download`` (False).
    Frame sampling: the window ``[start, start + clip_seconds]`` (start = the row's ``start_time``, 0 when NaN) is
    clamped to the video's length and cut into ``num_frames`` equal parts; the frame nearest the centre of each part
    is decoded with PyAV (see :func:`frame_times`).
    Merge rule: ``join`` -- the frames' captions, whitespace-normalised and lower-cased, deduplicated (first
    occurrence kept), in time order, joined with ``" ; "``; ``most_frequent`` -- the caption produced for the most
    frames, ties going to the earliest frame. Rows without a video get the error ``"no video for clip"``.

``audio`` -- an audio-to-text sequence-to-sequence model (``AutoProcessor`` + ``AutoModelForSpeechSeq2Seq``, e.g. a
    Whisper-architecture audio captioner). ``model``: HF id or local directory (required).
    Params: ``max_new_tokens`` (30); ``num_beams`` (3); ``max_seconds`` (30.0) audio kept from the clip's start;
    ``allow_download`` (False). Audio is decoded by the project's front end (``hci_atr.data.audio.load_audio``:
    soundfile, mixed to mono, torchaudio resampling to the processor's sampling rate); the batch is generated in
    one call (on failure, row by row, so one bad clip only fails itself).

``nearest`` -- the offline default: no captioning model at all, but a trained hci-atr model
    (``HciAtrModel.from_pretrained(model)``) and the training feature shards (``features=`` a parquet directory,
    schema in docs/architecture.md). Its caption bank (:class:`NearestBank`) is every training clip's mel embedded at
    clip level ([N, D]) and every training caption at sentence level: given to the constructor (``bank=``; the
    caption-all pipeline embeds it once with :class:`BankEmbedder` across its workers) or embedded at construction.
    For an input clip it computes the mel from ``audio_path`` with the
    model's saved audio config, embeds it, and returns a caption of the TRAINING clip with the highest clip-level
    audio-audio cosine similarity, leave-one-out: a training clip with the same ``audio_id`` is never chosen, and
    (``exclude_own_captions``, default True) neither is a caption equal (normalised) to one of the row's own
    captions, so a clip never gets its own reference captions back. Of the chosen clip's captions, the one whose
    sentence embedding is closest to the input clip's audio embedding is returned.
    Params: ``features`` (required); ``split`` ("train") the feature rows used as the caption bank;
    ``embed_batch_size`` (32); ``exclude_own_captions`` (True); ``reuse_bank_embeddings`` (True): an input clip
    that is a bank clip (same ``audio_id`` and ``audio_path``) takes its bank embedding instead of being decoded and
    embedded again, when the feature directory's manifest shows the model's audio front end (then the mel is the
    same; the clip's audio was read when its features were extracted).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hci_atr.data.audio import clip_features, load_audio
from hci_atr.data.shards import BANK_COLUMNS, audio_config_dict, bank_rows, features_audio_config, read_bank
from hci_atr.errors import CaptionerError, DataError, HciAtrError, one_line

OUTPUT_COLUMNS = ("audio_id", "generated_caption", "captioner", "model", "params", "seconds", "error")


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the backends
# ---------------------------------------------------------------------------------------------------------------


def normalize_caption(text: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation: the key used to deduplicate captions."""
    return " ".join(str(text).lower().split()).strip(" .;,")


def merge_captions(captions: Sequence[str], rule: str = "join") -> str:
    """Merge the per-frame captions of one clip (given in time order) into one auxiliary caption.

    ``join``: distinct normalised captions in time order joined with ``" ; "``.
    ``most_frequent``: the normalised caption produced for most frames; ties go to the earliest frame.
    Empty captions are ignored; all empty -> ``""``.
    """
    norm = [normalize_caption(c) for c in captions]
    norm = [c for c in norm if c]
    if not norm:
        return ""
    if rule == "join":
        return " ; ".join(dict.fromkeys(norm))
    if rule == "most_frequent":
        counts = Counter(norm)
        best = max(counts.values())
        return next(c for c in norm if counts[c] == best)
    raise CaptionerError(f"merge rule '{rule}' is unknown; use 'join' or 'most_frequent'")


def frame_times(start: float | None, clip_seconds: float, num_frames: int,
                video_seconds: float | None = None) -> list[float]:
    """Timestamps (seconds) of the frames to caption for one clip.

    The window ``[start, start + clip_seconds]`` is clamped to ``[0, video_seconds]`` and cut into ``num_frames``
    equal parts; the result is the centre of each part, in increasing order. ``start`` None/NaN means 0.
    Raises ValueError when the start lies past the end of the video.
    """
    s = 0.0 if start is None or (isinstance(start, float) and math.isnan(start)) else max(0.0, float(start))
    e = s + float(clip_seconds)
    if video_seconds is not None and video_seconds > 0:
        if s >= video_seconds:
            raise ValueError(f"start_time {s:.2f} s is past the end of the video ({video_seconds:.2f} s)")
        e = min(e, float(video_seconds))
    step = (e - s) / num_frames
    return [s + (i + 0.5) * step for i in range(num_frames)]


def read_frames(path: str, times: Sequence[float]) -> list[tuple[float, np.ndarray]]:
    """Decode the frames nearest to ``times`` (sorted seconds) from a video file with PyAV.

    Returns ``[(frame_time, rgb uint8 [H, W, 3])]``, one per requested time: the first frame whose presentation
    time reaches the target minus half a frame period; targets past the last frame get the last frame.
    Seeks once to the keyframe before the first target, then decodes forward (clips are short, so one forward pass
    is cheaper than one seek per frame).
    """
    import av

    out: list[tuple[float, np.ndarray]] = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("file has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        half = 0.5 / rate
        if times and times[0] > 1.0 and stream.time_base is not None:
            container.seek(int(max(0.0, times[0] - 1.0) / stream.time_base), stream=stream, backward=True)
        last = None
        k = 0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else 0.0
            while k < len(times) and t + half >= times[k]:
                out.append((t, frame.to_ndarray(format="rgb24")))
                k += 1
            last = frame
            if k == len(times):
                break
        if last is None:
            raise ValueError("no frame could be decoded")
        while k < len(times):
            lt = float(last.time) if last.time is not None else 0.0
            out.append((lt, last.to_ndarray(format="rgb24")))
            k += 1
    return out


def video_seconds(path: str) -> float | None:
    """The video stream's length in seconds (None when the container does not say)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0] if container.streams.video else None
        if stream is not None and stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if container.duration:
            return container.duration / 1_000_000
    return None


def _column(batch: dict[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    if name not in batch:
        return [default] * n
    return list(batch[name])


def _batch_len(batch: dict[str, Any]) -> int:
    if "audio_id" not in batch:
        raise CaptionerError(f"caption batch has no 'audio_id' column (columns: {', '.join(batch)})")
    return len(batch["audio_id"])


def _text(value: Any) -> str:
    """A cell as a string: None/NaN -> ""."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def _check_model_ref(model: str | None, backend: str) -> str:
    """A model argument must be an existing local directory or an HF id (``org/name``)."""
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


def _pretrained_error(backend: str, model: str, exc: BaseException) -> CaptionerError:
    return CaptionerError(f"captioner '{backend}': cannot load model '{model}' ({one_line(exc)}); pass a local "
                          f"save_pretrained directory, or an HF id that is in the local cache "
                          f"(or allow_download=True where the network is reachable)")


# ---------------------------------------------------------------------------------------------------------------
# base
# ---------------------------------------------------------------------------------------------------------------


class Captioner:
    """Base class: parameter checking, the per-row bookkeeping and the output columns.

    Subclasses set ``name`` and ``defaults`` and implement :meth:`caption_rows`, which returns one
    ``(caption, error, seconds)`` per row and must not raise for per-row problems.
    """

    name: str = ""
    defaults: dict[str, Any] = {}

    def __init__(self, model: str | None, device: str = "cpu", **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise CaptionerError(f"captioner '{self.name}': unknown parameter(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(self.defaults))})")
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.model_ref = "" if model is None else str(model)
        self.device = device

    @property
    def params_json(self) -> str:
        """The effective parameters as sorted JSON (the ``params`` column; file paths as given)."""
        return json.dumps(self.params, sort_keys=True, default=str)

    def caption_rows(self, batch: dict[str, Any], n: int) -> list[tuple[str, str, float]]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        n = _batch_len(batch)
        rows = self.caption_rows(batch, n) if n else []
        return {
            "audio_id": np.array([str(a) for a in _column(batch, "audio_id", n)], dtype=object),
            "generated_caption": np.array([r[0] for r in rows], dtype=object),
            "captioner": np.array([self.name] * n, dtype=object),
            "model": np.array([self.model_ref] * n, dtype=object),
            "params": np.array([self.params_json] * n, dtype=object),
            "seconds": np.array([r[2] for r in rows], dtype=np.float32),
            "error": np.array([r[1] for r in rows], dtype=object),
        }


def _decode_rows(paths: list[Any], decode: Callable[[str], Any]) -> tuple[list[Any], list[str], list[float]]:
    """Decode each row's audio with ``decode(path)``: ``(values, errors, seconds)`` per row. A row whose audio is
    missing or unreadable gets a one-line error (and ``None``) instead of raising, so the batch goes on."""
    n = len(paths)
    values: list[Any] = [None] * n
    errors = [""] * n
    seconds = [0.0] * n
    for i in range(n):
        t0 = time.perf_counter()
        path = _text(paths[i])
        try:
            if not path:
                raise ValueError("no audio_path for clip")
            values[i] = decode(path)
        except Exception as e:  # noqa: BLE001 - unreadable audio is a row error
            errors[i] = one_line(e)
        seconds[i] = time.perf_counter() - t0
    return values, errors, seconds


def _run_isolated(items: list[Any], fn: Callable[[list[Any]], list[str]]) -> tuple[list[str], list[str]]:
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


def _torch_device(device: str):
    import torch

    try:
        return torch.device(device)
    except RuntimeError as e:
        raise CaptionerError(f"device '{device}' is not valid ({one_line(e)}); use 'cpu' or 'cuda'") from None


# ---------------------------------------------------------------------------------------------------------------
# blip: video frames -> image captions -> one merged caption
# ---------------------------------------------------------------------------------------------------------------


class BlipCaptioner(Captioner):
    name = "blip"
    defaults = {"num_frames": 3, "clip_seconds": 10.0, "max_new_tokens": 20, "num_beams": 3, "merge": "join",
                "allow_download": False}

    def __init__(self, model: str | None = "Salesforce/blip-image-captioning-base", device: str = "cpu",
                 **params: Any) -> None:
        super().__init__(model or "Salesforce/blip-image-captioning-base", device, **params)
        p = self.params
        if int(p["num_frames"]) < 1:
            raise CaptionerError(f"captioner 'blip': num_frames must be >= 1, got {p['num_frames']}")
        if float(p["clip_seconds"]) <= 0:
            raise CaptionerError(f"captioner 'blip': clip_seconds must be > 0, got {p['clip_seconds']}")
        merge_captions([], p["merge"])  # validates the rule name now, not on the first batch
        ref = _check_model_ref(self.model_ref, self.name)
        from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor

        local_only = not bool(p["allow_download"])
        try:
            cfg = AutoConfig.from_pretrained(ref, local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise _pretrained_error(self.name, ref, e) from None
        if cfg.model_type != "blip":
            raise CaptionerError(f"captioner 'blip': '{ref}' is a '{cfg.model_type}' model; the blip backend needs "
                                 f"a BLIP image-captioning model (model_type 'blip', e.g. "
                                 f"Salesforce/blip-image-captioning-base)")
        try:
            self.processor = BlipProcessor.from_pretrained(ref, local_files_only=local_only)
            self.model = BlipForConditionalGeneration.from_pretrained(ref, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as e:
            raise _pretrained_error(self.name, ref, e) from None
        self.torch_device = _torch_device(device)
        self.model.to(self.torch_device).eval()

    def sample_frames(self, video_path: str, start: float | None) -> list[tuple[float, np.ndarray]]:
        """The clip's frames ``[(time, rgb [H, W, 3])]`` in time order (see :func:`frame_times`)."""
        times = frame_times(start, float(self.params["clip_seconds"]), int(self.params["num_frames"]),
                            video_seconds(video_path))
        return read_frames(video_path, times)

    def _generate(self, images: list[np.ndarray]) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.torch_device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=int(self.params["max_new_tokens"]),
                                      num_beams=int(self.params["num_beams"]))
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def caption_rows(self, batch: dict[str, Any], n: int) -> list[tuple[str, str, float]]:
        videos = _column(batch, "video_path", n)
        starts = _column(batch, "start_time", n, float("nan"))
        frames: list[list[np.ndarray]] = [[] for _ in range(n)]
        errors = [""] * n
        seconds = [0.0] * n
        for i in range(n):
            t0 = time.perf_counter()
            path = _text(videos[i])
            if not path:
                errors[i] = "no video for clip"
            elif not os.path.isfile(path):
                errors[i] = f"video file not found: {path}"
            else:
                try:
                    start = starts[i]
                    start = None if start is None else float(start)
                    frames[i] = [img for _, img in self.sample_frames(path, start)]
                except Exception as e:  # noqa: BLE001 - unreadable/corrupt video is a row error
                    errors[i] = f"cannot read video {path}: {one_line(e)}"
            seconds[i] = time.perf_counter() - t0
        # one generate call over all frames of all readable rows; a failure is isolated per row
        ok = [i for i in range(n) if not errors[i]]
        captions = [""] * n
        if ok:
            t0 = time.perf_counter()
            flat = [img for i in ok for img in frames[i]]
            per_row: list[tuple[list[str], str]] = []
            try:
                texts = self._generate(flat)
                k = 0
                for i in ok:
                    per_row.append((texts[k:k + len(frames[i])], ""))
                    k += len(frames[i])
            except Exception:  # noqa: BLE001 - retry row by row so one bad clip only fails itself
                per_row = []
                for i in ok:
                    try:
                        per_row.append((self._generate(frames[i]), ""))
                    except Exception as e:  # noqa: BLE001
                        per_row.append(([], one_line(e)))
            share = (time.perf_counter() - t0) / len(ok)
            for i, (texts_i, err) in zip(ok, per_row):
                seconds[i] += share
                if err:
                    errors[i] = f"caption generation failed: {err}"
                    continue
                captions[i] = merge_captions(texts_i, self.params["merge"])
                if not captions[i]:
                    errors[i] = "model generated an empty caption"
        return [(captions[i], errors[i], seconds[i]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# audio: audio-to-text seq2seq model on the clip's waveform
# ---------------------------------------------------------------------------------------------------------------


class AudioCaptioner(Captioner):
    name = "audio"
    defaults = {"max_new_tokens": 30, "num_beams": 3, "max_seconds": 30.0, "allow_download": False}

    def __init__(self, model: str | None, device: str = "cpu", **params: Any) -> None:
        super().__init__(model, device, **params)
        ref = _check_model_ref(self.model_ref, self.name)
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        local_only = not bool(self.params["allow_download"])
        try:
            self.processor = AutoProcessor.from_pretrained(ref, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as e:
            raise _pretrained_error(self.name, ref, e) from None
        try:
            self.model = AutoModelForSpeechSeq2Seq.from_pretrained(ref, local_files_only=local_only)
        except ValueError as e:
            raise CaptionerError(f"captioner 'audio': '{ref}' is not an audio-to-text sequence-to-sequence model "
                                 f"({one_line(e)}); pass a model AutoModelForSpeechSeq2Seq can load "
                                 f"(e.g. a Whisper-architecture audio captioner)") from None
        except (OSError, TypeError) as e:
            raise _pretrained_error(self.name, ref, e) from None
        fe = getattr(self.processor, "feature_extractor", None)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if fe is None or self.tokenizer is None or not getattr(fe, "sampling_rate", None):
            raise CaptionerError(f"captioner 'audio': '{ref}' has no processor with both a feature extractor and "
                                 f"a tokenizer; save one with processor.save_pretrained into the model directory")
        self.sample_rate = int(fe.sampling_rate)
        self.torch_device = _torch_device(device)
        self.model.to(self.torch_device).eval()

    def _generate(self, waves: list[np.ndarray]) -> list[str]:
        import torch

        inputs = self.processor(waves, sampling_rate=self.sample_rate, return_tensors="pt",
                                return_attention_mask=True)
        inputs = {k: v.to(self.torch_device) for k, v in inputs.items()}
        if "input_features" in inputs and inputs["input_features"].is_floating_point():
            inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=int(self.params["max_new_tokens"]),
                                      num_beams=int(self.params["num_beams"]))
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def caption_rows(self, batch: dict[str, Any], n: int) -> list[tuple[str, str, float]]:
        keep = int(float(self.params["max_seconds"]) * self.sample_rate)
        # [N] mono at the processor's rate
        waves, errors, seconds = _decode_rows(_column(batch, "audio_path", n),
                                              lambda path: load_audio(path, self.sample_rate)[:keep])
        ok = [i for i in range(n) if not errors[i]]
        captions = [""] * n
        if ok:
            t0 = time.perf_counter()
            outs, errs = _run_isolated([waves[i] for i in ok], self._generate)
            share = (time.perf_counter() - t0) / len(ok)
            for i, out, err in zip(ok, outs, errs):
                seconds[i] += share
                if err:
                    errors[i] = f"caption generation failed: {err}"
                elif not out.strip():
                    errors[i] = "model generated an empty caption"
                else:
                    captions[i] = out.strip()
        return [(captions[i], errors[i], seconds[i]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# nearest: caption of the most similar training clip under a trained hci-atr model (leave-one-out)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class NearestBank:
    """What the ``nearest`` backend picks from: the training clips' ``ids`` (sorted), their ``captions``, clip-level
    audio embeddings ``audio`` [N, D] and the captions' sentence embeddings ``text`` [C, D] (captions flattened in
    clip order), all L2-normalised, from one hci-atr model.

    Built whole by :meth:`NearestCaptioner.__init__` when none is given, or in parts by :class:`BankEmbedder` (the
    caption-all pipeline embeds the bank once, spread over its workers, and hands the result to every actor) and
    joined with :meth:`from_tables`.
    """

    ids: list[str]
    captions: list[list[str]]
    audio: Any  # torch.Tensor [N, D]
    text: Any  # torch.Tensor [C, D]
    paths: list[str]  # each clip's audio_path as the feature shards record it
    # the audio front end the bank's mels were computed with (the feature directory's manifest), or None if unknown:
    # when it equals the model's, a query clip with the same id and audio_path has exactly the bank's mel
    mel_config: dict | None = None

    COLUMNS = ("audio_id", "audio_path", "captions", "audio_embedding", "text_embedding")

    def __len__(self) -> int:
        return len(self.ids)

    def to_table(self):
        """As a pyarrow table, one row per clip: the :data:`COLUMNS`; ``text_embedding`` holds the clip's captions'
        [k, D] embeddings flattened."""
        import pyarrow as pa

        counts = [len(c) for c in self.captions]
        text = np.asarray(self.text, dtype=np.float32)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        return pa.table({
            "audio_id": pa.array(self.ids, pa.string()),
            "audio_path": pa.array(self.paths, pa.string()),
            "captions": pa.array(self.captions, pa.list_(pa.string())),
            "audio_embedding": pa.array(list(np.asarray(self.audio, dtype=np.float32)), pa.list_(pa.float32())),
            "text_embedding": pa.array([text[starts[i]:starts[i + 1]].reshape(-1) for i in range(len(counts))],
                                       pa.list_(pa.float32())),
        })

    @classmethod
    def from_tables(cls, tables: Sequence[Any], mel_config: dict | None = None) -> "NearestBank":
        """Join :meth:`to_table` parts (any order) into one bank, clips sorted by ``audio_id``."""
        import pyarrow as pa
        import torch

        tables = [t for t in tables if t.num_rows]
        if not tables:
            raise CaptionerError("captioner 'nearest': the caption bank is empty (no training clip with a caption)")
        t = pa.concat_tables([t.select(list(cls.COLUMNS)) for t in tables])
        cols = t.to_pydict()
        order = sorted(range(t.num_rows), key=lambda i: cols["audio_id"][i])
        ids = [cols["audio_id"][i] for i in order]
        if len(set(ids)) != len(ids):
            raise CaptionerError("captioner 'nearest': an audio_id appears twice in the training features")
        captions = [list(cols["captions"][i]) for i in order]
        audio = torch.tensor(np.asarray([cols["audio_embedding"][i] for i in order], dtype=np.float32))
        dim = audio.shape[1]
        text = torch.tensor(np.concatenate([np.asarray(cols["text_embedding"][i], dtype=np.float32).reshape(-1, dim)
                                            for i in order]))
        if text.shape[0] != sum(len(c) for c in captions):
            raise CaptionerError("captioner 'nearest': caption bank parts disagree (captions vs embeddings)")
        return cls(ids, captions, audio, text, [cols["audio_path"][i] for i in order], mel_config)


def _nearest_model_dir(model: str | None) -> Path:
    """``model`` as the directory of a trained hci-atr model; :class:`CaptionerError` saying what one is when it is
    not given or not there."""
    if not model:
        raise CaptionerError("captioner 'nearest' needs a model: the directory of a trained hci-atr model "
                             "(written by HciAtrModel.save_pretrained, e.g. by `hci-atr train`)")
    mdir = Path(model)
    if not mdir.is_dir():
        raise CaptionerError(f"captioner 'nearest': model directory {mdir} not found; pass the directory of a "
                             f"trained hci-atr model (model.safetensors + config.yaml)")
    return mdir


def _load_hci_model(model: str | None, device: str):
    """The trained hci-atr model in directory ``model`` on ``device``, in eval mode; :class:`CaptionerError` with
    what to fix when it is missing or not one."""
    mdir = _nearest_model_dir(model)
    from hci_atr.models.model import HciAtrModel

    try:
        net = HciAtrModel.from_pretrained(str(mdir))
    except HciAtrError as e:
        raise CaptionerError(f"captioner 'nearest': cannot load the hci-atr model in {mdir}: {e}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CaptionerError(f"captioner 'nearest': cannot load the hci-atr model in {mdir} ({one_line(e)}); "
                             f"pass a directory written by HciAtrModel.save_pretrained") from None
    return net.to(_torch_device(device)).eval()


def _embed_mels(model, mels: list[np.ndarray], batch_size: int):
    """Clip embeddings [len(mels), D] (normalised) on the CPU; mels of different lengths are padded and masked."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = []
    bs = max(1, int(batch_size))
    with torch.no_grad():
        for k in range(0, len(mels), bs):
            chunk = mels[k:k + bs]
            t_max = max(m.shape[0] for m in chunk)
            mel = torch.zeros(len(chunk), t_max, chunk[0].shape[1])
            mask = torch.zeros(len(chunk), t_max, dtype=torch.bool)
            for j, m in enumerate(chunk):
                mel[j, :m.shape[0]] = torch.from_numpy(np.asarray(m, dtype=np.float32))
                mask[j, :m.shape[0]] = True
            emb = model.encode_audio(mel.to(device), mask.to(device))
            out.append(F.normalize(emb.clip.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.model.embed_dim)


def _embed_bank(model, ids: list[str], paths: list[str], captions: list[list[str]], mels: list[np.ndarray],
                batch_size: int, mel_config: dict | None = None) -> NearestBank:
    import torch

    with torch.no_grad():
        audio = _embed_mels(model, mels, batch_size)  # [N, D] clip level
        flat = [c for caps in captions for c in caps]
        text = model.embed_text(flat, max(1, int(batch_size))).float().cpu()  # [C, D] sentence level
    return NearestBank(list(ids), [list(c) for c in captions], audio, text, list(paths), mel_config)


# what the bank reads of a feature shard


class BankEmbedder:
    """Ray Data callable class: a batch of feature-shard file paths (column ``path``) -> the :class:`NearestBank` part
    of their ``split`` rows, as a table (:meth:`NearestBank.to_table`). The actor reads the files itself, so the mels
    never cross the object store. Rows without a caption are dropped; a malformed mel raises
    :class:`CaptionerError`."""

    def __init__(self, model: str, device: str = "cpu", split: str = "train", embed_batch_size: int = 32):
        self.model = _load_hci_model(model, device)
        self.split = str(split)
        self.batch_size = int(embed_batch_size)

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = []
        for path in batch["path"].to_pylist():
            try:
                rows = pq.read_table(path, columns=BANK_COLUMNS)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
                raise CaptionerError(f"captioner 'nearest': cannot read feature shard {path} ({one_line(e)})") \
                    from None
            parts.append(self.embed_rows(rows, path))
        return pa.concat_tables(parts)

    def embed_rows(self, rows, source: str):
        """Feature-shard rows (a pyarrow table with :data:`BANK_COLUMNS`) -> their bank part as a table."""
        try:
            ids, paths, caps, mels = bank_rows(rows.to_pydict(), self.split)
        except DataError as e:
            raise CaptionerError(f"captioner 'nearest': features in {source}, {e}") from None
        return _embed_bank(self.model, ids, paths, caps, mels, self.batch_size).to_table()


class NearestCaptioner(Captioner):
    name = "nearest"
    defaults = {"features": None, "split": "train", "embed_batch_size": 32, "exclude_own_captions": True,
                "reuse_bank_embeddings": True}

    def __init__(self, model: str | None, device: str = "cpu", bank: NearestBank | None = None,
                 **params: Any) -> None:
        """``bank``: the caption bank already embedded with this model (the pipeline builds it once for all its
        actors); None embeds it here from ``features``."""
        super().__init__(model, device, **params)
        _nearest_model_dir(self.model_ref)  # a missing model is reported before missing features
        if not self.params["features"]:
            raise CaptionerError("captioner 'nearest' needs features=<dir>: the training feature shards written "
                                 "by `hci-atr extract-features`")
        self.model = _load_hci_model(self.model_ref, device)
        self.audio_cfg = self.model.cfg.audio
        if bank is None:
            features = Path(str(self.params["features"]))
            try:
                ids, paths, captions, mels = read_bank(features, str(self.params["split"]))
            except DataError as e:
                raise CaptionerError(f"captioner 'nearest': {e}") from None
            bank = _embed_bank(self.model, ids, paths, captions, mels, int(self.params["embed_batch_size"]),
                               features_audio_config(features))
        # a query clip that is a bank clip (same id, same file) has the bank's mel when the front ends agree: its
        # embedding is the bank's row, no need to decode and embed it again
        self.reuse = (bool(self.params["reuse_bank_embeddings"]) and bank.mel_config is not None
                      and bank.mel_config == audio_config_dict(self.audio_cfg))
        self.bank_paths = bank.paths
        self.bank_ids = bank.ids
        self.bank_captions = bank.captions
        self.bank_audio = bank.audio  # [N, D] clip-level embeddings of the training clips, normalised
        self.bank_text = bank.text  # [C, D]
        self.caption_owner = np.repeat(np.arange(len(bank.captions)), [len(c) for c in bank.captions])
        self.bank_norm = [[normalize_caption(c) for c in caps] for caps in bank.captions]
        self.id_to_index = {a: i for i, a in enumerate(bank.ids)}

    def caption_rows(self, batch: dict[str, Any], n: int) -> list[tuple[str, str, float]]:
        import torch

        ids = [str(a) for a in _column(batch, "audio_id", n)]
        own = _column(batch, "captions", n)
        paths = [_text(p) for p in _column(batch, "audio_path", n)]
        in_bank = {}  # row -> bank index, for rows whose embedding is the bank's
        if self.reuse:
            for i in range(n):
                j = self.id_to_index.get(ids[i])
                if j is not None and paths[i] and self.bank_paths[j] == paths[i]:
                    in_bank[i] = j
        todo = [i for i in range(n) if i not in in_bank]
        decoded, errs, secs = _decode_rows(  # [T, n_mels] each
            [paths[i] for i in todo], lambda path: np.asarray(clip_features(path, self.audio_cfg), dtype=np.float32))
        mels, errors, seconds = [None] * n, [""] * n, [0.0] * n
        for k, i in enumerate(todo):
            mels[i], errors[i], seconds[i] = decoded[k], errs[k], secs[k]
        ok = [i for i in range(n) if not errors[i]]
        captions = [""] * n
        if ok:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    at = {i: row for row, i in enumerate(ok)}  # batch row -> row of query
                    fresh = [i for i in ok if i not in in_bank]
                    query = torch.zeros(len(ok), self.bank_audio.shape[1])  # [B, D]
                    if fresh:
                        query[[at[i] for i in fresh]] = _embed_mels(self.model, [mels[i] for i in fresh],
                                                                     int(self.params["embed_batch_size"]))
                    for i, j in in_bank.items():
                        query[at[i]] = self.bank_audio[j]
                sim_audio = (query @ self.bank_audio.T).numpy()  # [B, N] clip-level audio-audio cosine
                sim_text = (query @ self.bank_text.T).numpy()  # [B, C] audio-caption cosine
                for row, i in enumerate(ok):
                    captions[i], errors[i] = self._pick(ids[i], own[i], sim_audio[row], sim_text[row])
            except Exception as e:  # noqa: BLE001
                for i in ok:
                    errors[i] = f"caption lookup failed: {one_line(e)}"
            share = (time.perf_counter() - t0) / len(ok)
            for i in ok:
                seconds[i] += share
        return [(captions[i], errors[i], seconds[i]) for i in range(n)]

    def _pick(self, audio_id: str, own_captions: Any, sim_audio: np.ndarray, sim_text: np.ndarray) -> tuple[str, str]:
        """The caption for one clip: nearest training clip (not itself), then its caption closest to the audio."""
        own_set = set()
        if self.params["exclude_own_captions"] and own_captions is not None and not isinstance(own_captions, float):
            own_set = {normalize_caption(c) for c in list(own_captions) if c is not None}
        order = np.argsort(-sim_audio, kind="stable")
        for j in order:
            if self.bank_ids[j] == audio_id:
                continue  # leave-one-out: never the clip itself
            allowed = [k for k, c in enumerate(self.bank_norm[j]) if c not in own_set]
            if not allowed:
                continue
            cap_index = np.flatnonzero(self.caption_owner == j)
            best = max(allowed, key=lambda k: sim_text[cap_index[k]])
            return self.bank_captions[j][best], ""
        return "", "no training clip other than this one has a usable caption"


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------

CAPTIONERS: dict[str, type[Captioner]] = {
    "blip": BlipCaptioner,
    "audio": AudioCaptioner,
    "nearest": NearestCaptioner,
}


def captioner_class(name: str) -> type[Captioner]:
    """The class for a backend name (what the pipeline hands to ``map_batches``)."""
    try:
        return CAPTIONERS[name]
    except KeyError:
        raise CaptionerError(f"unknown captioner '{name}'; choose one of: {', '.join(CAPTIONERS)}") from None


def build_captioner(name: str, model: str | None = None, device: str = "cpu", **params: Any) -> Captioner:
    """Construct a backend by name: ``build_captioner("blip", "/models/blip", num_frames=3)``."""
    cls = captioner_class(name)
    if name == "blip" and model is None:
        return cls(device=device, **params)
    return cls(model, device, **params)
