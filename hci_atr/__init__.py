"""hci-atr: audio-text retrieval with hierarchical cross-modal interaction (HCI) and auxiliary captions (AC).

The library (this package) is plain PyTorch and importable without Ray; the app that runs it on Ray lives in
``workflows`` (CLI, pipelines, training, tracking) and ``serve``. What a user calls is exported here, imported lazily
so that ``import hci_atr`` stays cheap::

    from hci_atr import HciAtrModel, Retriever, read_dataset, retrieval_metrics
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "Config": "hci_atr.config",
    "AudioConfig": "hci_atr.config",
    "ModelConfig": "hci_atr.config",
    "HciAtrModel": "hci_atr.models.model",
    "read_dataset": "hci_atr.data.formats",
    "retrieval_metrics": "hci_atr.metrics",
    "Retriever": "hci_atr.search.retriever",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hci_atr' has no attribute {name!r}")
