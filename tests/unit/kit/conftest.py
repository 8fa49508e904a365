"""Fixtures for the kit tests: small text folders and a micro public model trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kit.documents import read_documents
from kit.pretrain import Size

MICRO = Size(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    seq_len=32,
    batch_size=4,
    lr=3e-3,
)

PUBLIC_TEXT = [
    "A fortune a day keeps the doctor away, said the cookie to the crowd.\n" * 6,
    "The weather today is bright and the people walk in the park at noon.\n" * 6,
    "Murphy's law: anything that can go wrong will go wrong, and at the worst time.\n" * 6,
]
CODE_TEXT = [
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 8,
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)\n" * 6,
]


def write_texts(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def public_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("public-data"), PUBLIC_TEXT)


@pytest.fixture(scope="session")
def code_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("code-data"), CODE_TEXT)


@pytest.fixture(scope="session")
def public_dir(tmp_path_factory: pytest.TempPathFactory, public_data: Path) -> Path:
    from kit.pretrain import pretrain

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("public") / "model"
    return pretrain(read_documents([public_data]), out, size=MICRO, steps=6, seed=0)


@pytest.fixture(scope="session")
def embedding_file(
    tmp_path_factory: pytest.TempPathFactory, public_dir: Path, code_data: Path
) -> Path:
    from kit.embed import run_embed

    out = tmp_path_factory.mktemp("emb") / "code.safetensors"
    return run_embed(public_dir, read_documents([code_data]), out, "hidden", force=False)


@pytest.fixture(scope="session")
def code_expert(
    tmp_path_factory: pytest.TempPathFactory,
    public_dir: Path,
    code_data: Path,
    embedding_file: Path,
) -> Path:
    from kit.expert import train_expert

    out = tmp_path_factory.mktemp("experts") / "code"
    run = train_expert(
        public_dir,
        read_documents([code_data]),
        embedding_file,
        out,
        expert_id="code",
        owner="alice",
        steps=4,
        batch_size=4,
        seq_len=32,
    )
    return run.path
