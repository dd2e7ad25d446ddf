"""The one fit loop: seeding, warm-up, best-by-validation, early stopping, with hooks for what differs between
the places it runs (in-process for ``hci-atr ablate`` and tests, each Ray Train worker for ``hci-atr train``).

Rules (the same wherever the loop runs):

- **Seeds.** :func:`seeded_model` calls ``torch.manual_seed(train.seed)`` right before building the model, so every
  rank and every run of a seed starts from the same weights. Epoch ``e`` on rank ``r`` re-seeds torch (dropout) and a
  fresh ``torch.Generator`` (shuffle, crops, caption picks) from :func:`epoch_seed` ``(seed, e, r)``: a run resumed
  at epoch ``e`` replays exactly what an uninterrupted run did there.
- **Learning rate.** AdamW over :meth:`FitHooks.param_groups` (default :func:`param_groups`: the heads at
  ``train.lr``, a trainable text transformer at ``train.text_lr``, a PANNs checkpoint's audio encoder at
  ``train.audio_pretrained_lr``); a ``LambdaLR`` multiplies every group's base rate by :func:`warmup_factor` of the
  epoch, stepped once per epoch, so the epoch alone decides the rate (a resumed run gets the same one whatever
  optimizer state it restored). ``lr`` in the metrics is the heads' rate, ``lr_<group>`` the others'.
- **Text tower.** :func:`seeded_model` freezes all but the top ``train.text_train_layers`` transformer layers (when
  the text encoder trains at all); while :func:`fit` runs, the frozen part's outputs (the whole tower's, or those of
  the layers below the top ``k``) are computed once per caption and kept (``train.text_cache_mb``;
  :meth:`hci_atr.models.text_encoder.TextEncoder.enable_cache`). A kept caption reads what the batch that first held
  it computed, so a resumed run (its cache starts empty) matches the uninterrupted one to float rounding, not bit
  for bit; ``train.text_cache_mb = 0`` restores that.
- **Best and stopping.** After each epoch the validation R-sum (``rsum`` of :meth:`FitHooks.validate`, made the
  same on every rank by :meth:`FitHooks.share`) decides whether the epoch is the best so far; with
  ``train.early_stopping_patience = p > 0`` the loop stops after ``p`` epochs without a better one.

Hooks (:class:`FitHooks`): the per-epoch batch source, the optimizer's parameter groups, how metrics are reduced
across workers, validation, what happens at the end of an epoch (checkpoint, report, keep the best weights) and
one-line notes. :class:`InProcess` is the single-process set (rows in memory, best weights kept in memory).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from hci_atr.config import Config
from hci_atr.errors import one_line
from hci_atr.models.model import HciAtrModel
from hci_atr.training.batches import Batch, Rows, iter_batches
from hci_atr.training.evaluation import evaluate


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Per (seed, epoch, rank) seed: resuming at epoch e replays exactly what an uninterrupted run did at e."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31 - 1)


def seeded_model(cfg: Config) -> HciAtrModel:
    """``HciAtrModel(cfg)`` built right after ``torch.manual_seed(cfg.train.seed)``: the same initial weights on every
    rank and in every run of the seed. With ``model.freeze_text`` false and ``train.text_train_layers = k >= 0``,
    only the top ``k`` transformer layers stay trainable (frozen before any DDP wrapper sees the parameters)."""
    torch.manual_seed(cfg.train.seed)
    model = HciAtrModel(cfg)
    if not cfg.model.freeze_text and cfg.train.text_train_layers >= 0:
        model.text.train_top_layers(cfg.train.text_train_layers)
    return model


def _pretrained_audio(core: HciAtrModel) -> set[int]:
    """ids of the audio encoder's parameters its PANNs checkpoint filled (none without one)."""
    report = getattr(core, "audio_checkpoint_report", None)
    if report is None:
        return set()
    used = set(report.used)
    return {id(p) for n, p in core.audio.named_parameters() if n in used}


def param_groups(model, cfg: Config) -> list[dict]:
    """AdamW's parameter groups: every trainable parameter exactly once, frozen ones in none. ``heads`` (first:
    everything trained from scratch) at ``train.lr``; ``text`` (the text transformer) at ``train.text_lr``;
    ``audio_pretrained`` (the audio encoder's parameters a PANNs checkpoint filled) at ``train.audio_pretrained_lr``.
    Empty groups are left out; each group's ``name`` says which it is."""
    core: HciAtrModel = getattr(model, "module", model)
    tc = cfg.train
    if not cfg.model.freeze_text and tc.text_train_layers >= 0 and core.text.trained_layers is None:
        raise ValueError("train.text_train_layers is set but the model's text layers were not frozen: build it "
                         "with hci_atr.training.seeded_model(cfg)")
    text = {id(p) for p in core.text.transformer.parameters()}
    audio = _pretrained_audio(core)
    parts: dict[str, list[torch.nn.Parameter]] = {"heads": [], "text": [], "audio_pretrained": []}
    for p in core.parameters():
        if p.requires_grad:
            parts["text" if id(p) in text else "audio_pretrained" if id(p) in audio else "heads"].append(p)
    rates = {"heads": tc.lr, "text": tc.text_lr, "audio_pretrained": tc.audio_pretrained_lr}
    return [{"params": ps, "lr": rates[name], "name": name} for name, ps in parts.items() if ps]


def train_epoch(model, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], cfg: Config,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns the mean loss per level, ``total``, ``batches`` and ``data_seconds`` (time
    spent waiting for the next batch, included in the epoch time: the input-bound share).

    ``model`` may be DDP-wrapped (called through ``__call__``). With ``gather`` (all-gather with gradient) the texts of
    the global batch are the candidates and each worker's loss is its share of the global loss times the number of
    workers; all_gather's backward sums over workers and DDP averages, so the parameter gradients are those of the
    global loss (``hci_atr.losses.sharded_info_nce``).
    """
    core: HciAtrModel = getattr(model, "module", model)
    model.train()
    sums: dict[str, float] = {}
    n = 0
    params = [p for p in model.parameters() if p.requires_grad]
    wait = 0.0  # seconds spent waiting for the next batch (reading + make_batch): input-bound when a large share
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        out = model(**batch.forward_kwargs(), gather=gather)
        loss = out.losses["total"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at batch {n} (lower train.lr?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip and cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        for k, v in out.losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
    res = {f"loss_{k}": v / max(n, 1) for k, v in sums.items()}
    res["batches"] = float(n)
    res["data_seconds"] = wait
    for lv, tau in core.temps.as_dict().items():
        res[f"tau_{lv}"] = tau
    return res


def warmup_factor(epochs_done: float, warmup_epochs: int) -> float:
    """Learning-rate multiplier of the linear warm-up: ``(epochs_done + 1) / warmup_epochs`` capped at 1, then
    constant (``warmup_epochs = 0``: 1 from the start). ``epochs_done`` may be fractional (per-step schedules)."""
    return min(1.0, (epochs_done + 1.0) / warmup_epochs) if warmup_epochs > 0 else 1.0


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Load a checkpoint's optimizer ``state``; None when it fits, else why not (one line), the optimizer left fresh.

    It does not fit when the checkpoint was written while another set of parameters was trainable (an older version,
    or a run whose switches changed): the model weights still resume, and AdamW restarts its moment estimates.
    """
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        return f"the checkpoint's optimizer state does not fit this model's trainable parameters ({one_line(e)})"
    return None


@dataclass
class FitState:
    """Where a fit stands after ``epoch`` (-1: nothing trained). Plain ints, floats, lists and dicts only, so a
    checkpoint holding :meth:`to_dict` loads with ``torch.load(weights_only=True)``."""

    epoch: int = -1
    best_rsum: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of numbers per finished epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitState":
        history = [{str(k): float(v) for k, v in h.items()} for h in d.get("history") or []]
        best_epoch = d.get("best_epoch")
        if best_epoch is None:  # checkpoints written before best_epoch was kept: the best val R-sum in the history
            scored = [h for h in history if "val_rsum" in h]
            best_epoch = int(max(scored, key=lambda h: h["val_rsum"])["epoch"]) if scored else -1
        return cls(epoch=int(d["epoch"]), best_rsum=float(d["best_rsum"]), best_epoch=int(best_epoch),
                   bad_epochs=int(d["bad_epochs"]), history=history)


@dataclass
class EpochEnd:
    """What :meth:`FitHooks.on_epoch_end` receives after epoch ``epoch``: its ``metrics`` (as reported; also the last
    entry of ``state.history``), whether it is the best so far and whether the loop stops after it."""

    epoch: int
    metrics: dict[str, float]
    state: FitState
    is_best: bool
    stop: bool
    model: HciAtrModel  # the bare model (not a DDP wrapper)
    optimizer: torch.optim.Optimizer


@dataclass
class Resume:
    """What a fit resumes from: the state after the checkpoint's epoch and the optimizer's state dict (None: fresh).
    The model's weights are loaded by the caller, before the model is wrapped (DDP)."""

    state: FitState
    optimizer: dict | None = None


class FitHooks:
    """What differs between the places :func:`fit` runs. The defaults are those of one in-process worker; a
    subclass overrides :meth:`batches` at least."""

    rank: int = 0

    def param_groups(self, model: HciAtrModel, cfg: Config) -> list[dict]:
        """The optimizer's parameter groups, each with its base ``lr`` (default: :func:`param_groups`)."""
        return param_groups(model, cfg)

    def batches(self, model, epoch: int, generator: torch.Generator) -> Iterable[Batch]:
        """Epoch ``epoch``'s training batches; all randomness from ``generator`` (seeded by :func:`epoch_seed`)."""
        raise NotImplementedError

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """The epoch's training metrics of this worker -> those to report (e.g. the mean over workers)."""
        return metrics

    def validate(self, model: HciAtrModel) -> dict[str, float]:
        """Validation metrics (at least ``rsum``) of the bare model; {} where this rank does not validate."""
        return {}

    def share(self, value: float) -> float:
        """The validation R-sum every rank decides on (e.g. rank 0's, broadcast)."""
        return value

    def on_epoch_end(self, end: EpochEnd) -> None:
        """Checkpoint, report, log, keep the best weights ... after every epoch."""

    def note(self, message: str) -> None:
        """One line for the person running the fit (printed by rank 0)."""
        if self.rank == 0:
            print(message, flush=True)


@dataclass
class FitResult:
    state: FitState
    stopped_early: bool
    start_epoch: int


def _optimizer(hooks: FitHooks, core: HciAtrModel, cfg: Config, resume: Resume | None):
    tc = cfg.train
    groups = hooks.param_groups(core, cfg)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    base = [g["lr"] for g in optimizer.param_groups]
    start = resume.state.epoch + 1 if resume is not None else 0
    if resume is not None and resume.optimizer is not None:
        why = restore_optimizer(optimizer, resume.optimizer)
        if why:
            hooks.note(f"resume from epoch {start}: {why}; the weights resume, AdamW restarts its moments")
    for g, lr in zip(optimizer.param_groups, base):  # the schedule starts from the hooks' rates, not the saved ones
        g["lr"] = g["initial_lr"] = lr
    # last_epoch = start - 1: the constructor's first step sets epoch `start`'s rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: warmup_factor(epoch, tc.warmup_epochs), last_epoch=start - 1)
    return optimizer, scheduler


def fit(model, cfg: Config, hooks: FitHooks, *, resume: Resume | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FitResult:
    """Train ``model`` (bare or DDP-wrapped) from epoch ``resume.state.epoch + 1`` (0 when fresh) to ``train.epochs``
    under the rules of the module docstring; returns the final :class:`FitState`. ``gather``: the all-gather of the
    global-batch loss (:class:`hci_atr.training.distributed.GatherWithGrad`), None for local negatives."""
    core: HciAtrModel = getattr(model, "module", model)
    core.text.enable_cache(cfg.train.text_cache_mb)  # on while the tower, or all below its top k, is frozen
    try:
        return _fit(model, core, cfg, hooks, resume, gather)
    finally:
        core.text.disable_cache()


def _group_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr``: the first group's (the heads') current rate; ``lr_<name>`` every other named group's."""
    out = {"lr": float(optimizer.param_groups[0]["lr"])}
    for g in optimizer.param_groups[1:]:
        if g.get("name"):
            out[f"lr_{g['name']}"] = float(g["lr"])
    return out


def _fit(model, core: HciAtrModel, cfg: Config, hooks: FitHooks, resume: Resume | None,
         gather: Callable[[torch.Tensor], torch.Tensor] | None) -> FitResult:
    tc = cfg.train
    optimizer, scheduler = _optimizer(hooks, core, cfg, resume)
    state = FitState.from_dict(resume.state.to_dict()) if resume is not None else FitState()
    start = state.epoch + 1
    stop = False
    for epoch in range(start, tc.epochs):
        s = epoch_seed(tc.seed, epoch, hooks.rank)
        torch.manual_seed(s)
        gen = torch.Generator().manual_seed(s)
        rates = _group_rates(optimizer)
        t0 = time.perf_counter()
        losses = train_epoch(model, optimizer, hooks.batches(model, epoch, gen), cfg, gather=gather)
        seconds = time.perf_counter() - t0
        scheduler.step()
        metrics = hooks.reduce({k: float(v) for k, v in losses.items() if isinstance(v, (int, float))})
        metrics.update(epoch=epoch, epoch_seconds=seconds, start_epoch=start, **rates)
        val = hooks.validate(core)
        rsum = float(hooks.share(float(val.get("rsum", math.nan))))
        metrics.update({f"val_{k}": float(v) for k, v in val.items()})
        metrics["val_rsum"] = rsum
        is_best = rsum > state.best_rsum
        if is_best:
            state.best_rsum, state.best_epoch, state.bad_epochs = rsum, epoch, 0
        else:
            state.bad_epochs += 1
        stop = tc.early_stopping_patience > 0 and state.bad_epochs >= tc.early_stopping_patience
        metrics["early_stopped"] = float(stop)
        state.epoch = epoch
        state.history.append({k: float(v) for k, v in metrics.items()})
        hooks.on_epoch_end(EpochEnd(epoch, metrics, state, is_best, stop, core, optimizer))
        if stop:
            break
    return FitResult(state, stop, start)


class InProcess(FitHooks):
    """One process, rows in memory: ``train_rows`` shuffled per epoch (:func:`iter_batches`, incomplete last batch
    dropped), validation on ``val_rows``, the best epoch's trainable weights kept in memory
    (:meth:`restore_best` puts them back)."""

    def __init__(self, cfg: Config, train_rows: Sequence[dict] | Rows, val_rows: list[dict],
                 batch_size: int | None = None, progress: Callable[[EpochEnd], None] | None = None):
        self.cfg = cfg
        self.train_rows, self.val_rows = train_rows, val_rows
        self.batch_size = batch_size or cfg.train.batch_size
        self.best_state: dict[str, torch.Tensor] | None = None
        self.progress = progress  # called with each EpochEnd (a progress line)

    def batches(self, model, epoch, generator):
        return iter_batches(self.train_rows, self.cfg, model, True, generator, batch_size=self.batch_size,
                            drop_last=True)

    def validate(self, model):
        return evaluate(model, self.val_rows, self.cfg)

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.is_best:  # frozen parameters never change, so they need no copy
            self.best_state = {n: p.detach().clone() for n, p in end.model.state_dict(keep_vars=True).items()
                               if not (isinstance(p, torch.nn.Parameter) and not p.requires_grad)}
        if self.progress is not None:
            self.progress(end)

    def restore_best(self, model: HciAtrModel) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state, strict=False)
