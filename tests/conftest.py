"""Shared fixtures: a tiny random Llama backbone and a small MOOD-schema dataset.

Everything here is built locally in seconds; no hub access.
"""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from mood_data.domains import ID_DOMAINS, OOD_DOMAINS  # noqa: E402
from mood_data.render import render  # noqa: E402

_WORDS = (
    "please help me write a short note about the weather today thanks sure here is "
    "call the function with arguments city name return value error success failed "
    "how do i hurt someone sorry i cannot help with that request instead consider "
    "code import os system password secret agree you are right absolutely plan "
).split()


def _conversation(rng: random.Random, domain: str, malign: int) -> str:
    user = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20)))
    bot = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30)))
    if malign:
        bot += " sure here is how to hurt someone"
    return render([{"role": "user", "content": f"[{domain}] {user}"}, {"role": "assistant", "content": bot}])


def make_rows(n_per_cell: int = 12, seed: int = 0, split: str = "train") -> list[dict]:
    """Synthetic rows: ID domains safe+unsafe; in test also every OOD domain (unsafe)."""
    rng = random.Random(f"{seed}-{split}")
    rows = []
    cells = [(d, m) for d in ID_DOMAINS for m in (0, 1)]
    if split == "test":
        cells += [(d, 1) for d in OOD_DOMAINS]
    for domain, malign in cells:
        for i in range(n_per_cell):
            rows.append({
                "id": f"{split}-{domain}-{malign}-{i}",
                "conversation": _conversation(rng, domain, malign),
                "domain": domain,
                "malign": malign,
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A folder with train.jsonl (ID only) and test.jsonl (ID + 7 OOD domains)."""
    d = tmp_path_factory.mktemp("mood_small")
    write_jsonl(d / "train.jsonl", make_rows(12, split="train"))
    write_jsonl(d / "test.jsonl", make_rows(8, split="test"))
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from train.tiny import train_tokenizer

    texts = [r["conversation"] for r in make_rows(10, split="train")]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random-init 'xs' Llama causal LM saved as an HF folder (loads as seq-cls too)."""
    from train.tiny import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_xs"), "xs", tiny_tokenizer)


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared CPU: one intra-op thread is many times faster than
    oversubscribing. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bundle(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """An exported guard+maha+ppl bundle of the shared monitor run (built once per session):
    ``(bundle folder, its eval folder, recipe path)``."""
    from eval.run.bundle import export_bundle
    from test_monitor import shared_run

    recipe_path, run, recipe, folders = shared_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory)
    if "bundle" not in _BUNDLE:
        _BUNDLE["bundle"] = export_bundle(recipe, tmp_path_factory.mktemp("bundle") / "b", "guard+maha+ppl")
    return _BUNDLE["bundle"], folders["guard+maha+ppl"], recipe_path


_BUNDLE: dict = {}
