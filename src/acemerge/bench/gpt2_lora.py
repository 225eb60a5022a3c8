"""The ``gpt2-lora`` suite: gpt2-text's base, each expert a PEFT LoRA adapter on it.

Recipe (all seeded, CPU):

1. The base (tokenizer and pretrained ``GPT2Model``) is built by gpt2-text's code with
   gpt2-text's settings, so it is the same model for the same seed and size.
2. Each expert is a LoRA adapter (r = 8, lora_alpha = 16, no dropout) on every attention
   and MLP projection (``c_attn``, ``c_proj``, ``c_fc``; GPT-2's Conv1D, so
   ``fan_in_fan_out``), trained with a fresh ``score`` head (trained fully, saved apart)
   on one task, the steps of gpt2-text's expert and a higher learning rate.
3. Adapters are saved with PEFT's ``save_pretrained`` under ``experts/<task>``: acemerge
   reads each as a LoRA expert on ``base/`` (its task vector s * B @ A), and
   ``PeftModel.from_pretrained(GPT2Model.from_pretrained(base/), experts/<task>)`` loads it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch

from acemerge.bench import gpt2_text
from acemerge.bench.gpt2_text import Gpt2Recipe, Gpt2TextSuite
from acemerge.bench.text_suite import ExpertSpec
from acemerge.bench.text_tasks import TextTask


@dataclass(frozen=True)
class Gpt2LoraRecipe(Gpt2Recipe):
    """gpt2-text's recipe (its base settings unchanged) with the adapters' settings."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")


def lora_recipe(text: Gpt2Recipe, lr: float) -> Gpt2LoraRecipe:
    """gpt2-text's recipe ``text`` with the adapters' learning rate."""
    return Gpt2LoraRecipe(**{**asdict(text), "lr": lr})


FULL = lora_recipe(gpt2_text.FULL, lr=3e-3)
TINY = lora_recipe(gpt2_text.TINY, lr=3e-3)


def with_lora(recipe: Gpt2LoraRecipe, encoder: torch.nn.Module) -> torch.nn.Module:
    """``encoder`` wrapped in a PEFT LoRA model (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                        target_modules=list(recipe.targets), fan_in_fan_out=True)
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return get_peft_model(encoder, config)


class Gpt2LoraSuite(Gpt2TextSuite):
    """gpt2-text's base with LoRA experts (see the module doc)."""

    name = "gpt2-lora"
    recipe_version = 1

    def recipe(self, tiny: bool) -> Gpt2LoraRecipe:
        return TINY if tiny else FULL

    def spec(self, recipe: Gpt2LoraRecipe, task: TextTask) -> ExpertSpec:
        return replace(super().spec(recipe, task), adapt=partial(with_lora, recipe))
