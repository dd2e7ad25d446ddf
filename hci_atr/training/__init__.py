"""Training core (plain PyTorch): batches from feature rows, the one fit loop, evaluation, data-parallel glue.

``batches`` (rows -> :class:`Batch`), ``loop`` (:func:`fit` with its :class:`FitHooks`, :func:`train_epoch`),
``evaluation`` (:func:`embed_split`, :func:`evaluate`), ``distributed`` (all-gather and reductions over
``torch.distributed``, imported on its own by whoever runs several workers).
"""

from hci_atr.training.batches import ArrowRows, Batch, Rows, audio_key, eval_audio, iter_batches, make_batch
from hci_atr.training.evaluation import EmbeddedSplit, embed_split, evaluate
from hci_atr.training.loop import (EpochEnd, FitHooks, FitResult, FitState, InProcess, Resume, epoch_seed, fit,
                                   param_groups, restore_optimizer, seeded_model, train_epoch, warmup_factor)

__all__ = ["ArrowRows", "Batch", "EmbeddedSplit", "EpochEnd", "FitHooks", "FitResult", "FitState", "InProcess",
           "Resume", "Rows", "audio_key", "embed_split", "epoch_seed", "eval_audio", "evaluate", "fit",
           "iter_batches", "make_batch", "param_groups", "restore_optimizer", "seeded_model", "train_epoch",
           "warmup_factor"]
