"""Search over an embedded audio collection: what goes into an index (items.py), embedding it with a trained model
(embed.py), the index folder on disk and its versions (index.py), stage-1 scans (scan.py), and retrieve-then-rerank
(retriever.py). Submodules are imported on first use, so ``import hci_atr.search`` stays cheap."""

_EXPORTS = {
    "IndexItem": "items", "items_from_records": "items", "items_from_audio_dir": "items",
    "embed_items": "embed", "EmbeddedItems": "embed",
    "Index": "index", "IndexWriter": "index", "write_index": "index", "current_version": "index",
    "is_index": "index", "weights_hash": "index",
    "Retriever": "retriever", "Hit": "retriever", "SearchResult": "retriever",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"hci_atr.search.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
