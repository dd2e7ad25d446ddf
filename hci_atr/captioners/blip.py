"""The ``blip`` captioner: image captions of a clip's video frames (BLIP), merged into one auxiliary caption.

``BlipProcessor`` + ``BlipForConditionalGeneration.generate`` (transformers 5 has no image-to-text pipeline).
``model``: HF id (must already be in the local cache unless ``allow_download=True``) or a local directory; default
``Salesforce/blip-image-captioning-base``.
Params: ``num_frames`` (3) frames per clip; ``clip_seconds`` (10.0) the clip's duration window in the video;
``max_new_tokens`` (20); ``num_beams`` (3); ``merge`` ("join" | "most_frequent", default "join");
``allow_download`` (False).
Frame sampling: the window ``[start, start + clip_seconds]`` (start = the row's ``start_time``, 0 when NaN) is
clamped to the video's length and cut into ``num_frames`` equal parts; the frame nearest the centre of each part is
decoded with PyAV (:func:`hci_atr.data.video.frame_times`).
Merge rule: ``join`` -- the frames' captions, whitespace-normalised and lower-cased, deduplicated (first occurrence
kept), in time order, joined with ``" ; "``; ``most_frequent`` -- the caption produced for the most frames, ties
going to the earliest frame. Rows without a video get the error ``"no video for clip"``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from hci_atr.captioners.base import (Captioner, cell_text, check_model_ref, column, merge_captions,
                                     pretrained_error, torch_device)
from hci_atr.data.video import frame_times, read_frames, video_seconds
from hci_atr.errors import CaptionerError, one_line


class BlipCaptioner(Captioner):
    name = "blip"
    defaults = {"num_frames": 3, "clip_seconds": 10.0, "max_new_tokens": 20, "num_beams": 3, "merge": "join",
                "allow_download": False}
    default_model = "Salesforce/blip-image-captioning-base"
    operational = ("allow_download",)

    @classmethod
    def check_setup(cls, model: str | None, params: dict[str, Any]) -> None:
        super().check_setup(model, params)
        p = {**cls.defaults, **params}
        if int(p["num_frames"]) < 1:
            raise CaptionerError(f"captioner 'blip': num_frames must be >= 1, got {p['num_frames']}")
        if float(p["clip_seconds"]) <= 0:
            raise CaptionerError(f"captioner 'blip': clip_seconds must be > 0, got {p['clip_seconds']}")
        merge_captions([], p["merge"])  # validates the rule name now, not on the first batch
        check_model_ref(model or cls.default_model, cls.name)

    def __init__(self, model: str | None = None, device: str = "cpu", **params: Any) -> None:
        super().__init__(model, device, **params)
        self.check_setup(self.model_ref, params)
        ref = self.model_ref
        from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor

        local_only = not bool(self.params["allow_download"])
        try:
            cfg = AutoConfig.from_pretrained(ref, local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise pretrained_error(self.name, ref, e) from None
        if cfg.model_type != "blip":
            raise CaptionerError(f"captioner 'blip': '{ref}' is a '{cfg.model_type}' model; the blip backend needs "
                                 f"a BLIP image-captioning model (model_type 'blip', e.g. "
                                 f"Salesforce/blip-image-captioning-base)")
        try:
            self.processor = BlipProcessor.from_pretrained(ref, local_files_only=local_only)
            self.model = BlipForConditionalGeneration.from_pretrained(ref, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as e:
            raise pretrained_error(self.name, ref, e) from None
        self.torch_device = torch_device(device)
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
        videos = column(batch, "video_path", n)
        starts = column(batch, "start_time", n, float("nan"))
        frames: list[list[np.ndarray]] = [[] for _ in range(n)]
        errors = [""] * n
        seconds = [0.0] * n
        for i in range(n):
            t0 = time.perf_counter()
            path = cell_text(videos[i])
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
