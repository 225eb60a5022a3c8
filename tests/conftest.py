"""Shared fixtures: tiny real transformers models saved as HF folders (base + experts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

N_EXPERTS = 3


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small models train faster on one thread, and do not fight other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16,
                                   vocab_size=64, bos_token_id=0, eos_token_id=0,
                                   num_labels=2, pad_token_id=0)


def tiny_bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48, vocab_size=64,
                                   max_position_embeddings=16, num_labels=2)


def perturbed(model: torch.nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """The model's state dict plus a seeded random update of a given magnitude."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, folder: Path, safe: bool) -> None:
    """save_pretrained, or config.json + a pickled pytorch_model.bin (the legacy format)."""
    if safe:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


def save_family(root: Path, model_cls, config, safe: bool = True) -> tuple[Path, list[Path]]:
    """Save a base and N_EXPERTS experts with different update magnitudes."""
    torch.manual_seed(0)
    base = model_cls(config).eval()
    save_model(base, root / "base", safe)
    experts = []
    for i, scale in enumerate((1e-3, 1e-2, 5e-2)[:N_EXPERTS]):
        expert = model_cls(config)
        expert.load_state_dict(perturbed(base, seed=100 + i, scale=scale))
        save_model(expert, root / f"expert{i}", safe)
        experts.append(root / f"expert{i}")
    return root / "base", experts


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return save_family(tmp_path_factory.mktemp("gpt2"),
                       transformers.GPT2ForSequenceClassification, tiny_gpt2_config())


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return save_family(tmp_path_factory.mktemp("bert"), transformers.BertModel,
                       tiny_bert_config())
