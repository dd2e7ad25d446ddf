"""Shared fixtures.

- ``ray_session``: one local Ray instance for the whole test session (2 CPUs, loopback only). Library unit tests never
  use it; tests of workflows/ and serve/ request it and are marked ``ray``.
- ``demo_root``: a tiny procedural demo dataset written once per session.
- ``tiny_text_dir``: a tiny BERT text encoder (random weights) with the packaged MiniLM tokenizer, saved with
  ``save_pretrained`` so it loads through the same ``from_pretrained`` path users take.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Ray Train's controller polls its workers every 2 s by default, so every training run of the tests ends (and a
# killed worker is noticed) up to 2 s after the fact; a shorter poll changes no result, only the waiting
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh local Ray: never attach to one `ray start` left on the machine
            num_cpus=2,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from hci_atr.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    make_demo(root, seed=0, size=24, duration=2.0, sample_rate=16000, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hci_atr.models.text_encoder import packaged_minilm_path

    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny_text")
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
