"""The ``gpt2-text`` suite: a small GPT-2 pretrained on stdlib docstrings, eight experts.

Recipe (all seeded, CPU):

1. A byte-level BPE tokenizer is trained with ``tokenizers`` on the pretraining text
   (:func:`acemerge.bench.text_tasks.pretraining_texts`) and saved in the base folder as a
   ``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained(base_dir)`` loads it). Its
   template appends ``<|endoftext|>`` to a sentence and joins a pair as
   ``A <sep> B <|endoftext|>``.
2. A ``transformers`` GPT-2 (Conv1D weights) is trained as a language model on that
   text; its ``GPT2Model`` is the base encoder.
3. Each expert is the base fine-tuned as a ``GPT2ForSequenceClassification`` on one task
   (all encoder weights, and a bias-free ``score`` head on the last real token), with
   AdamW and a task-dependent number of steps, so task-vector energies differ across
   tasks. Encoders are saved as ``GPT2Model`` folders (the merged part), heads apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acemerge.bench.suite import Progress
from acemerge.bench.text_suite import (
    BuiltTextSuite,
    FineTuneRecipe,
    TextSuite,
    linear_schedule,
    quiet_transformers,
)
from acemerge.bench.text_tasks import pretraining_texts

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<sep>")


@dataclass(frozen=True)
class Gpt2Recipe(FineTuneRecipe):
    """Model size and pretraining budget, with the experts' fine-tuning budgets."""

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    lm_steps: int
    lm_batch: int
    lm_lr: float


FULL = Gpt2Recipe(
    vocab_size=2048, n_layer=4, n_embd=128, n_head=4, max_length=64,
    lm_steps=1000, lm_batch=32, lm_lr=2e-3,
    expert_steps={"topic": 400, "acceptability": 200, "kind": 200, "literal": 100,
                  "summary": 250, "next": 500, "order": 500, "entailment": 500},
    lr=1e-3, head_lr=1e-2, batch_size=32, sizes=(4000, 200, 560),
)
TINY = Gpt2Recipe(
    vocab_size=1024, n_layer=2, n_embd=64, n_head=2, max_length=48,
    lm_steps=150, lm_batch=16, lm_lr=3e-3,
    expert_steps={"acceptability": 150, "literal": 100, "summary": 120},
    lr=1e-3, head_lr=1e-2, batch_size=32, sizes=(1000, 200, 300),
)


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    eos, sep = (tok.token_to_id(t) for t in (SPECIAL_TOKENS[0], SPECIAL_TOKENS[2]))
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <sep> $B <|endoftext|>",
        special_tokens=[(SPECIAL_TOKENS[0], eos), (SPECIAL_TOKENS[2], sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1], sep_token=SPECIAL_TOKENS[2],
        model_max_length=max_length, model_input_names=["input_ids", "attention_mask"],
    )


# --------------------------------------------------------------------------- pretraining


def gpt2_config(recipe: Gpt2Recipe, tokenizer: Any) -> Any:
    """GPT-2 configuration of the recipe's size (no dropout: short runs)."""
    from transformers import GPT2Config

    eos = tokenizer.eos_token_id
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=recipe.max_length, n_embd=recipe.n_embd,
        n_layer=recipe.n_layer, n_head=recipe.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_blocks(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    """The texts as one stream (each ends with ``<|endoftext|>``) cut into blocks."""
    ids = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    stream = torch.tensor([t for row in ids for t in row], dtype=torch.long)
    usable = stream.shape[0] // length * length
    return stream[:usable].view(-1, length)


def pretrain(recipe: Gpt2Recipe, tokenizer: Any, texts: list[str], seed: int,
             log: Progress) -> Any:
    """Train a ``GPT2LMHeadModel``; returns its ``GPT2Model``."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(recipe, tokenizer))
    blocks = token_blocks(tokenizer, texts, recipe.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lm_lr, weight_decay=0.01)
    schedule = linear_schedule(optimizer, recipe.lm_steps, 0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with quiet_transformers():  # its "loss_type=None ... unrecognized" on the first step
        for step in range(recipe.lm_steps):
            batch = blocks[torch.randint(len(blocks), (recipe.lm_batch,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 250 == 0 or step == recipe.lm_steps - 1:
                log(f"pretrain step {step + 1}/{recipe.lm_steps} loss {loss.item():.3f}")
    return model.transformer.eval()


# ------------------------------------------------------------------------------- suite


class Gpt2TextSuite(TextSuite):
    """Small GPT-2 on stdlib docstrings; experts per text task (see the module doc)."""

    name = "gpt2-text"
    recipe_version = 3  # 3: 560 test examples per task (suite-mean SE <= 0.7)
    pooling = "last"

    def recipe(self, tiny: bool) -> Gpt2Recipe:
        return TINY if tiny else FULL

    def make_encoder(self, base_dir: Path) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2Model

        return GPT2Model(GPT2Config.from_pretrained(base_dir))

    def base_model(self, recipe: Gpt2Recipe, seed: int, log: Progress) -> tuple[Any, Any]:
        texts = pretraining_texts(seed)
        tokenizer = train_tokenizer(texts, recipe.vocab_size, recipe.max_length)
        log(f"tokenizer: {len(tokenizer)} tokens")
        return pretrain(recipe, tokenizer, texts, seed, log), tokenizer

    def width(self, recipe: Gpt2Recipe) -> int:
        return recipe.n_embd


def sequence_classifier(suite: BuiltTextSuite, encoder: dict[str, torch.Tensor],
                        task: int) -> Any:
    """A ``GPT2ForSequenceClassification`` with ``encoder`` and task ``task``'s head
    (what the expert was trained as; same logits as :meth:`BuiltTextSuite.evaluate`)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config.from_pretrained(suite.base_dir, num_labels=suite.tasks[task].n_classes)
    model = GPT2ForSequenceClassification(config).eval()
    model.transformer.load_state_dict(encoder, strict=True)
    model.score.load_state_dict(suite.head(task).state_dict())
    return model
