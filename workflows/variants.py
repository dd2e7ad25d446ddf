"""What ``hci-atr ablate`` compares: the variants (each a set of config switches over one shared base config) and
the named presets (``--preset``: the data a setup makes, its variants and the settings they share).

Only a variant's switches differ between the rows of an ablation; data, epochs, batch size, encoders and seeds are
equal (:func:`variant_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hci_atr.errors import ConfigError
from workflows.settings import Settings


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: an MLflow-safe ``name``, a table ``label`` and its config switches."""

    name: str
    label: str
    switches: dict[str, Any]

    @property
    def uses_captions(self) -> bool:
        return any(self.switches.get(f"model.{u}") for u in ("ac_fusion", "ac_branch", "ac_augment"))


def _switches(clip=True, segment=False, frame=False, fusion=False, branch=False, augment=False) -> dict[str, Any]:
    return {"model.use_clip": clip, "model.use_segment": segment, "model.use_frame": frame,
            "model.ac_fusion": fusion, "model.ac_branch": branch, "model.ac_augment": augment}


# the order-aware switches of the compositional benchmark (hci_atr.models.temporal / order / weighting), and hard
# negatives (hci_atr.data.negatives) on top
_ORDER = {"model.temporal_context": "gru", "model.segment_order": "position_bias", "model.fusion": "calibrated"}
# the same with the phrase places read as time from the sequence markers (no bias where a caption states no order)
_ORDER_EVENT = {**_ORDER, "model.segment_order": "event_bias"}
_HARD = {"model.hard_negatives": "both", "model.hard_negative_weight": 0.5}
_TEXT = {"model.freeze_text": False}

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("clip", "clip only", _switches()),
    Variant("clip_segment", "clip + segment", _switches(segment=True)),
    Variant("clip_frame", "clip + frame", _switches(frame=True)),
    Variant("hci", "HCI (clip + segment + frame)", _switches(segment=True, frame=True)),
    Variant("hci_acfusion", "HCI + AC fusion", _switches(segment=True, frame=True, fusion=True)),
    Variant("hci_acbranch", "HCI + AC branch", _switches(segment=True, frame=True, branch=True)),
    Variant("hci_acaugment", "HCI + AC augment", _switches(segment=True, frame=True, augment=True)),
    Variant("hci_acfusionbranch", "HCI + AC fusion + branch",
            _switches(segment=True, frame=True, fusion=True, branch=True)),
    Variant("hci_ac", "HCI + AC (fusion, branch, augment)",
            _switches(segment=True, frame=True, fusion=True, branch=True, augment=True)),
    # the extra (clip, generated caption) pairs scored against the audio with that caption fused in (the old rule)
    Variant("hci_ac_fusedpairs", "HCI + AC, extra pairs on fused audio",
            {**_switches(segment=True, frame=True, fusion=True, branch=True, augment=True),
             "model.ac_augment_audio": "fused"}),
    Variant("clip_ac", "clip + AC (fusion, branch, augment)", _switches(fusion=True, branch=True, augment=True)),
    Variant("hci_order", "HCI + order (GRU, position bias, calibrated)",
            {**_switches(segment=True, frame=True), **_ORDER}),
    Variant("hci_event", "HCI + order by events (GRU, event bias, calibrated)",
            {**_switches(segment=True, frame=True), **_ORDER_EVENT}),
    # batches of caption-text neighbours (hci_atr.training.mining): a clip meets its twin as an in-batch negative
    Variant("hci_mined", "HCI, mined batches (caption-text neighbours)",
            {**_switches(segment=True, frame=True), "train.batch_mining": "text"}),
    Variant("hci_event_mined", "HCI + order by events, mined batches",
            {**_switches(segment=True, frame=True), **_ORDER_EVENT, "train.batch_mining": "text"}),
    Variant("hci_order_hard", "HCI + order + hard negatives (w 0.5)",
            {**_switches(segment=True, frame=True), **_ORDER, **_HARD}),
    # the text tower trained at train.text_lr (frozen in every other row): its top two layers, or all of them
    Variant("hci_text2", "HCI, text top 2 layers trained",
            {**_switches(segment=True, frame=True), **_TEXT, "train.text_train_layers": 2}),
    Variant("hci_order_text2", "HCI + order, text top 2 layers trained",
            {**_switches(segment=True, frame=True), **_ORDER, **_TEXT, "train.text_train_layers": 2}),
    Variant("hci_order_textall", "HCI + order, text fully trained",
            {**_switches(segment=True, frame=True), **_ORDER, **_TEXT, "train.text_train_layers": -1}),
    Variant("hci_order_hard_text2", "HCI + order + hard negatives, text top 2 layers trained",
            {**_switches(segment=True, frame=True), **_ORDER, **_HARD, **_TEXT, "train.text_train_layers": 2}),
]}
# what runs without --variants: the HCI levels and AC uses (the order variants are the compositional preset's)
DEFAULT_VARIANTS = ("clip", "clip_segment", "clip_frame", "hci", "hci_acfusion", "hci_ac", "clip_ac")

def parse_variants(names: str | Sequence[str] | None) -> list[Variant]:
    """``"clip,hci"`` or a list -> Variants (:data:`DEFAULT_VARIANTS` when empty); unknown names are a ConfigError."""
    if not names:
        return [VARIANTS[n] for n in DEFAULT_VARIANTS]
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return [VARIANTS[n] for n in dict.fromkeys(items)]


def variant_config(base: Settings, variant: Variant, seed: int) -> Settings:
    """The base config with the variant's switches and the seed applied (everything else stays equal)."""
    return base.override({**variant.switches, "train.seed": seed}, f"ablation variant {variant.name}")


@dataclass(frozen=True)
class Preset:
    """A named ablation setup (``hci-atr ablate --preset NAME``): the demo data it makes, its variants and the
    settings every variant shares. Flags given on the command line win over a preset's values."""

    name: str
    description: str
    demo_size: int
    pairs_in_split: bool
    variants: tuple[str, ...]
    overrides: dict[str, Any]


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("compositional",
           "order / attribute / count benchmark: 2000 demo clips (300 test clips x 5 captions: one query moves "
           "T2A R@1 by 0.07 points, A2T R@1 by 0.33) with the hard-negative pairs inside each split; every variant "
           "trained until validation R-sum has not improved for 4 epochs (at most 40)",
           demo_size=2000, pairs_in_split=True,
           variants=("clip", "hci", "hci_order", "hci_event", "hci_order_hard", "hci_order_text2"),
           # the text tower frozen in the base, as every published row of the preset was measured (the *_text rows
           # train it); the library's default trains its top 2 layers since (hci_text2 against hci)
           overrides={"audio.duration": 5.0, "model.audio_width": 8, "train.epochs": 40,
                      "train.early_stopping_patience": 4, "model.freeze_text": True, "train.text_train_layers": -1}),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown ablation preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]
