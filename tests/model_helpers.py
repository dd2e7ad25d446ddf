"""Tiny model configs and synthetic feature rows shared by the model/HCI/loss/training tests."""

from __future__ import annotations

import numpy as np
import torch

from hci_atr.config import Config


def tiny_cfg(text_dir, **over) -> Config:
    base = {
        "audio.sample_rate": 16000, "audio.hop_length": 160, "audio.n_mels": 16, "audio.duration": 0.64,
        "model.text_encoder": str(text_dir), "model.freeze_text": False, "model.audio_width": 4,
        "model.embed_dim": 16, "model.segment_size": 4, "model.segment_stride": 2, "model.max_words": 12,
        "train.batch_size": 4, "train.lr": 3e-3, "train.text_train_layers": -1,
    }
    base.update(over)
    return Config().override(base)


def tiny_model(text_dir, **over):
    """A seeded tiny HciAtrModel in eval mode."""
    from hci_atr.models.model import HciAtrModel

    torch.manual_seed(0)
    return HciAtrModel(tiny_cfg(text_dir, **over)).eval()


def tiny_mel(b: int = 3, t: int = 61, m: int = 16, seed: int = 0) -> torch.Tensor:
    """A seeded mel batch [b, t, m] whose clips differ in level."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, m, generator=g) + torch.arange(b).view(b, 1, 1) * 0.5


def tiny_rows(n: int = 6, n_frames: int = 80, n_mels: int = 16, seed: int = 0, captions_per_clip: int = 2,
              generated: bool = False) -> list[dict]:
    """Clips whose mel carries a class-specific pattern; captions name the class, so the task is learnable."""
    rng = np.random.default_rng(seed)
    words = ["dog barks", "rain falls", "car passes", "bird sings", "door slams", "water runs", "bell rings",
             "wind blows"]
    rows = []
    for i in range(n):
        cls = i % len(words)
        mel = rng.standard_normal((n_frames, n_mels)).astype(np.float32) * 0.3
        mel[:, cls % n_mels] += 3.0
        mel[::(cls + 2), (cls * 3) % n_mels] += 2.0
        caps = [f"a {words[cls]} loudly", f"the {words[cls]} nearby"][:captions_per_clip]
        row = {"audio_id": f"clip{i}", "split": "train", "audio_path": f"/x/clip{i}.wav", "captions": caps,
               "duration": n_frames / 100, "n_frames": n_frames, "n_mels": n_mels, "mel": mel.ravel().tolist()}
        if generated:
            row["generated_caption"] = words[cls] if i % 3 else None
        rows.append(row)
    return rows


class ThreadGather:
    """In-process stand-in for an all-gather across ``n`` workers, for the library's unit tests (no Ray, no
    torch.distributed): worker ``r`` runs in its own thread and calls ``gather_for(r)(x)``; every call returns all
    workers' ``x`` concatenated in rank order. The workers share one autograd graph, so a backward through the
    result reaches every worker's tensors, as all_gather's backward (a reduce-scatter of the gradients) does."""

    def __init__(self, n: int):
        import threading

        self.n = n
        self.slots: list = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def gather_for(self, rank: int):
        import torch

        def gather(x):
            self.slots[rank] = x
            self.barrier.wait()
            out = torch.cat(self.slots, dim=0)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out
        return gather

    def run(self, fn):
        """Call ``fn(rank, gather)`` in ``n`` threads; return their results in rank order (re-raises a failure)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.n) as pool:
            futures = [pool.submit(fn, r, self.gather_for(r)) for r in range(self.n)]
            return [f.result() for f in futures]
