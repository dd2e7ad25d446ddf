"""hci-atr: audio-text retrieval with hierarchical cross-modal interaction (HCI) and auxiliary captions (AC).

The library (this package) is plain PyTorch and importable without Ray; Ray glue lives in ``workflows`` and ``serve``.
Heavy submodules are imported lazily so that ``import hci_atr`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Retriever"]


def __getattr__(name):
    if name == "Retriever":
        from hci_atr.retriever import Retriever

        return Retriever
    raise AttributeError(name)
