"""The ``audio`` captioner: an audio-to-text sequence-to-sequence model on the clip's waveform.

``AutoProcessor`` + ``AutoModelForSpeechSeq2Seq`` (e.g. a Whisper-architecture audio captioner).
``model``: HF id (must already be in the local cache unless ``allow_download=True``) or local directory (required).
Params: ``max_new_tokens`` (30); ``num_beams`` (3); ``max_seconds`` (30.0) audio kept from the clip's start;
``allow_download`` (False). Audio is decoded by the project's front end (:func:`hci_atr.data.audio.load_audio`,
mono at the processor's sampling rate, at most ``max_seconds`` of it); the batch is generated in one call (on
failure, row by row, so one bad clip only fails itself).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hci_atr.captioners.base import (Captioner, check_model_ref, column, decode_rows, pretrained_error,
                                     run_isolated, torch_device)
from hci_atr.data.audio import load_audio
from hci_atr.errors import CaptionerError, one_line


class AudioCaptioner(Captioner):
    name = "audio"
    defaults = {"max_new_tokens": 30, "num_beams": 3, "max_seconds": 30.0, "allow_download": False}
    operational = ("allow_download",)

    @classmethod
    def check_setup(cls, model: str | None, params: dict[str, Any]) -> None:
        super().check_setup(model, params)
        check_model_ref(model, cls.name)

    def __init__(self, model: str | None, device: str = "cpu", **params: Any) -> None:
        super().__init__(model, device, **params)
        ref = check_model_ref(self.model_ref, self.name)
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        local_only = not bool(self.params["allow_download"])
        try:
            self.processor = AutoProcessor.from_pretrained(ref, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as e:
            raise pretrained_error(self.name, ref, e) from None
        try:
            self.model = AutoModelForSpeechSeq2Seq.from_pretrained(ref, local_files_only=local_only)
        except ValueError as e:
            raise CaptionerError(f"captioner 'audio': '{ref}' is not an audio-to-text sequence-to-sequence model "
                                 f"({one_line(e)}); pass a model AutoModelForSpeechSeq2Seq can load "
                                 f"(e.g. a Whisper-architecture audio captioner)") from None
        except (OSError, TypeError) as e:
            raise pretrained_error(self.name, ref, e) from None
        fe = getattr(self.processor, "feature_extractor", None)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if fe is None or self.tokenizer is None or not getattr(fe, "sampling_rate", None):
            raise CaptionerError(f"captioner 'audio': '{ref}' has no processor with both a feature extractor and "
                                 f"a tokenizer; save one with processor.save_pretrained into the model directory")
        self.sample_rate = int(fe.sampling_rate)
        self.torch_device = torch_device(device)
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
        max_seconds = float(self.params["max_seconds"])
        keep = int(max_seconds * self.sample_rate)
        # [N] mono at the processor's rate; only the kept start of a long file is decoded
        waves, errors, seconds = decode_rows(column(batch, "audio_path", n),
                                             lambda path: load_audio(path, self.sample_rate, max_seconds)[:keep])
        ok = [i for i in range(n) if not errors[i]]
        captions = [""] * n
        if ok:
            t0 = time.perf_counter()
            outs, errs = run_isolated([waves[i] for i in ok], self._generate)
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
