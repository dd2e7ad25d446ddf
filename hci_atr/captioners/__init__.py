"""Captioner backends: write one auxiliary caption per clip ahead of training (the "AC" part of the method).

:mod:`~hci_atr.captioners.base` holds the interface every backend follows, the helpers they share and the registry
(:func:`captioner_class`, :func:`build_captioner`); each backend is its own module (``blip``, ``audio``,
``nearest``) and is imported only when it is asked for by name, so importing this package loads no model library.
"""

from hci_atr.captioners.base import (BACKENDS, OUTPUT_COLUMNS, Captioner, build_captioner, captioner_class,
                                     merge_captions, normalize_caption)

__all__ = ["BACKENDS", "OUTPUT_COLUMNS", "Captioner", "build_captioner", "captioner_class", "merge_captions",
           "normalize_caption"]
