"""The ``nearest`` captioner: the caption of the most similar training clip under a trained hci-atr model.

The offline default: no captioning model at all, but a trained hci-atr model (``HciAtrModel.from_pretrained(model)``)
and the training feature shards (``features=`` a parquet directory, schema in docs/architecture.md). Its caption bank
(:class:`NearestBank`) is every training clip's mel embedded at clip level ([N, D]) and every training caption at
sentence level: given to the constructor (``bank=``; the caption-all pipeline embeds it once, spread over its
workers, with :func:`embed_bank_rows`) or embedded at construction.
For an input clip it computes the mel from ``audio_path`` with the model's saved audio config
(:func:`hci_atr.data.audio.clip_features`), embeds it, and returns a caption of the TRAINING clip with the highest
clip-level audio-audio cosine similarity, leave-one-out: a training clip with the same ``audio_id`` is never chosen,
and (``exclude_own_captions``, default True) neither is a caption equal (normalised) to one of the row's own
captions, so a clip never gets its own reference captions back. Of the chosen clip's captions, the one whose sentence
embedding is closest to the input clip's audio embedding is returned.
Params: ``features`` (required); ``split`` ("train") the feature rows used as the caption bank;
``embed_batch_size`` (32); ``exclude_own_captions`` (True); ``reuse_bank_embeddings`` (True): an input clip that is
a bank clip (same ``audio_id`` and ``audio_path``) takes its bank embedding instead of being decoded and embedded
again, when the feature directory's manifest shows the model's audio front end (then the mel is the same; the clip's
audio was read when its features were extracted).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hci_atr.captioners.base import (CaptionRow, Captioner, cell_text, column, decode_rows, normalize_caption,
                                    torch_device)
from hci_atr.data.audio import clip_features
from hci_atr.data.shards import audio_config_dict, bank_rows, features_audio_config, read_bank
from hci_atr.errors import CaptionerError, DataError, HciAtrError, one_line


@dataclass
class NearestBank:
    """What the ``nearest`` backend picks from: the training clips' ``ids`` (sorted), their ``captions``, clip-level
    audio embeddings ``audio`` [N, D] and the captions' sentence embeddings ``text`` [C, D] (captions flattened in
    clip order), all L2-normalised, from one hci-atr model.

    Built whole by :meth:`NearestCaptioner.__init__` when none is given, or in parts by :func:`embed_bank_rows` (the
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

    def without(self, audio_ids) -> "NearestBank":
        """The bank minus the clips ``audio_ids`` (cross-fitting: a fold is captioned from the other folds only)."""
        drop = set(audio_ids)
        keep = [i for i, a in enumerate(self.ids) if a not in drop]
        counts = [len(c) for c in self.captions]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        text_rows = [k for i in keep for k in range(starts[i], starts[i + 1])]
        return NearestBank([self.ids[i] for i in keep], [self.captions[i] for i in keep], self.audio[keep],
                           self.text[text_rows], [self.paths[i] for i in keep], self.mel_config)

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


# -- the hci-atr model and embedding ------------------------------------------------------------------------------


def nearest_model_dir(model: str | None) -> Path:
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


def load_hci_model(model: str | None, device: str = "cpu"):
    """The trained hci-atr model in directory ``model`` on ``device``, in eval mode; :class:`CaptionerError` with
    what to fix when it is missing or not one."""
    mdir = nearest_model_dir(model)
    from hci_atr.models.model import HciAtrModel

    try:
        net = HciAtrModel.from_pretrained(str(mdir))
    except HciAtrError as e:
        raise CaptionerError(f"captioner 'nearest': cannot load the hci-atr model in {mdir}: {e}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CaptionerError(f"captioner 'nearest': cannot load the hci-atr model in {mdir} ({one_line(e)}); "
                             f"pass a directory written by HciAtrModel.save_pretrained") from None
    return net.to(torch_device(device)).eval()


def embed_mels(model, mels: list[np.ndarray], batch_size: int):
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
        audio = embed_mels(model, mels, batch_size)  # [N, D] clip level
        flat = [c for caps in captions for c in caps]
        text = model.embed_text(flat, max(1, int(batch_size))).float().cpu()  # [C, D] sentence level
    return NearestBank(list(ids), [list(c) for c in captions], audio, text, list(paths), mel_config)


def embed_bank_rows(model, rows, split: str = "train", batch_size: int = 32, source: str = "the given rows"):
    """Feature-shard rows (a pyarrow table with :data:`~hci_atr.data.shards.BANK_COLUMNS`) -> the
    :class:`NearestBank` part of their captioned ``split`` rows, as a table (:meth:`NearestBank.to_table`; join
    parts with :meth:`NearestBank.from_tables`). ``model``: a loaded hci-atr model (:func:`load_hci_model`).
    A malformed mel raises :class:`CaptionerError` naming ``source``."""
    try:
        ids, paths, caps, mels = bank_rows(rows.to_pydict(), str(split))
    except DataError as e:
        raise CaptionerError(f"captioner 'nearest': features in {source}, {e}") from None
    return _embed_bank(model, ids, paths, caps, mels, batch_size).to_table()


# -- the backend --------------------------------------------------------------------------------------------------


class NearestCaptioner(Captioner):
    name = "nearest"
    defaults = {"features": None, "split": "train", "embed_batch_size": 32, "exclude_own_captions": True,
                "reuse_bank_embeddings": True}
    # reuse only happens when the bank's mel is the one decoding gives, so it does not change a row
    operational = ("embed_batch_size", "reuse_bank_embeddings")
    path_params = ("features",)

    @classmethod
    def check_setup(cls, model: str | None, params: dict[str, Any]) -> None:
        super().check_setup(model, params)
        if not model or not os.path.isdir(model):
            raise CaptionerError(f"captioner 'nearest' needs --model: the directory of a trained hci-atr model "
                                 f"(model.safetensors + config.yaml){'' if not model else f'; {model} not found'}")
        features = params.get("features")
        if not features or not os.path.isdir(str(features)):
            raise CaptionerError("captioner 'nearest' needs --features DIR: the training feature shards written by "
                                 "`hci-atr extract-features`" + (f"; {features} not found" if features else ""))

    def __init__(self, model: str | None, device: str = "cpu", bank: NearestBank | None = None,
                 **params: Any) -> None:
        """``bank``: the caption bank already embedded with this model (the pipeline builds it once for all its
        actors); None embeds it here from ``features``."""
        super().__init__(model, device, **params)
        nearest_model_dir(self.model_ref)  # a missing model is reported before missing features
        if not self.params["features"]:
            raise CaptionerError("captioner 'nearest' needs features=<dir>: the training feature shards written "
                                 "by `hci-atr extract-features`")
        self.model = load_hci_model(self.model_ref, device)
        self.audio_cfg = self.model.cfg.audio
        if bank is None:
            features = Path(str(self.params["features"]))
            try:
                ids, paths, captions, mels = read_bank(features, str(self.params["split"]))
            except DataError as e:
                raise CaptionerError(f"captioner 'nearest': {e}") from None
            bank = _embed_bank(self.model, ids, paths, captions, mels, int(self.params["embed_batch_size"]),
                               features_audio_config(features))
        self.use_bank(bank)

    def use_bank(self, bank: NearestBank) -> None:
        """Caption from ``bank`` from now on (e.g. ``captioner.use_bank(captioner.bank.without(fold_ids))``)."""
        self.bank = bank
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

        ids = [str(a) for a in column(batch, "audio_id", n)]
        own = column(batch, "captions", n)
        paths = [cell_text(p) for p in column(batch, "audio_path", n)]
        in_bank = {}  # row -> bank index, for rows whose embedding is the bank's
        if self.reuse:
            for i in range(n):
                j = self.id_to_index.get(ids[i])
                if j is not None and paths[i] and self.bank_paths[j] == paths[i]:
                    in_bank[i] = j
        todo = [i for i in range(n) if i not in in_bank]
        decoded, errs, secs = decode_rows(  # [T, n_mels] each
            [paths[i] for i in todo], lambda path: np.asarray(clip_features(path, self.audio_cfg), dtype=np.float32))
        mels, errors, seconds = [None] * n, [""] * n, [0.0] * n
        for k, i in enumerate(todo):
            mels[i], errors[i], seconds[i] = decoded[k], errs[k], secs[k]
        ok = [i for i in range(n) if not errors[i]]
        captions, confidence = [""] * n, [None] * n
        if ok:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    at = {i: row for row, i in enumerate(ok)}  # batch row -> row of query
                    fresh = [i for i in ok if i not in in_bank]
                    query = torch.zeros(len(ok), self.bank_audio.shape[1])  # [B, D]
                    if fresh:
                        query[[at[i] for i in fresh]] = embed_mels(self.model, [mels[i] for i in fresh],
                                                                    int(self.params["embed_batch_size"]))
                    for i, j in in_bank.items():
                        query[at[i]] = self.bank_audio[j]
                sim_audio = (query @ self.bank_audio.T).numpy()  # [B, N] clip-level audio-audio cosine
                sim_text = (query @ self.bank_text.T).numpy()  # [B, C] audio-caption cosine
                for row, i in enumerate(ok):
                    captions[i], errors[i], confidence[i] = self._pick(ids[i], own[i], sim_audio[row],
                                                                       sim_text[row])
            except Exception as e:  # noqa: BLE001
                for i in ok:
                    errors[i] = f"caption lookup failed: {one_line(e)}"
            share = (time.perf_counter() - t0) / len(ok)
            for i in ok:
                seconds[i] += share
        return [CaptionRow(captions[i], errors[i], seconds[i], confidence[i]) for i in range(n)]

    def _pick(self, audio_id: str, own_captions: Any, sim_audio: np.ndarray, sim_text: np.ndarray
              ) -> tuple[str, str, float | None]:
        """The caption for one clip: nearest training clip (not itself), then its caption closest to the audio.
        ``(caption, error, confidence)``; the confidence is the clip-level cosine of the clip and that neighbour."""
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
            return self.bank_captions[j][best], "", float(sim_audio[j])
        return "", "no training clip other than this one has a usable caption", None
