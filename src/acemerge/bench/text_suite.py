"""Machinery shared by the text suites (``gpt2-text``, ``minilm``).

A built text suite on disk::

    suite.json              tasks, recipe, build seconds, expert accuracies
    data.json               every task's train/val/test examples (as built)
    base/                   HF folder of the encoder (config, model.safetensors, tokenizer)
    experts/<task>/         HF folders of the experts' encoders (or PEFT LoRA adapter
                            folders on base/, as in gpt2-lora)
    heads/<task>.safetensors  the task's classification head (``weight``[, ``bias``])
    stats/                  statistics collected on demand

Only encoders are merged. A classifier is the encoder, a pooling of its last hidden
states (``last``: the last real token, GPT-2's ``GPT2ForSequenceClassification``;
``mean``: the mean over real tokens, sentence-transformers' pooling) and a linear head.
"""

from __future__ import annotations

import contextlib
import copy
import json
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from acemerge.bench.suite import BuiltSuite, Progress, Suite, Task, cache_key
from acemerge.bench.text_tasks import Example, TextTask, build_tasks
from acemerge.io.adapters import open_expert
from acemerge.io.readers import open_checkpoint
from acemerge.io.writers import staged_output_folder

Pooling = Literal["last", "mean"]
Batch = dict[str, torch.Tensor]
#: Evaluation batch: length-sorted batches of 32 pad little (MiniLM scored 8 x 200 test
#: examples in 2.3 s with batches of 32, 5.4 s with batches of 256).
EVAL_BATCH = 32


# ------------------------------------------------------------------------ tokenized data


@dataclass
class Encoded:
    """Tokenized examples, right-padded to the longest one, with their labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> Batch:
        """The examples at ``index``, trimmed to their longest."""
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max())
        out = {"input_ids": self.input_ids[index, :width], "attention_mask": mask[:, :width]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[index, :width]
        return out

    def in_order(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        """Batches (with ``labels``) in length order, for fast evaluation."""
        count = len(self) if limit is None else min(limit, len(self))
        lengths = self.attention_mask[:count].sum(1)
        order = torch.argsort(lengths, stable=True)
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            yield {**self.batch(index), "labels": self.labels[index]}


def encode(tokenizer: Any, examples: list[Example], max_length: int,
           token_types: bool) -> Encoded:
    """Tokenize sentences (or pairs, truncated longest first) into an :class:`Encoded`."""
    texts = [e.text for e in examples]
    pairs = [e.pair or "" for e in examples] if examples and examples[0].pair else None
    out = tokenizer(texts, pairs, truncation=True, max_length=max_length,
                    return_token_type_ids=token_types)
    ids = out["input_ids"]
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    types = torch.zeros((len(ids), width), dtype=torch.long) if token_types else None
    for row, tokens in enumerate(ids):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        if types is not None:
            types[row, :len(tokens)] = torch.tensor(out["token_type_ids"][row])
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return Encoded(input_ids, mask, labels, types)


# ---------------------------------------------------------------------------- classifier


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, T, d) hidden states -> (B, d): last real token, or mean over real tokens."""
    if pooling == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class PooledClassifier(torch.nn.Module):
    """An encoder, a pooling and a linear head; ``forward`` returns logits."""

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear,
                 pooling: Pooling) -> None:
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **extra).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling))


def new_head(width: int, n_classes: int, bias: bool, seed: int) -> torch.nn.Linear:
    """A freshly initialized head (normal, std 0.02, as transformers initializes)."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, n_classes, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        if bias:
            head.bias.zero_()
    return head


def head_from_state(state: dict[str, torch.Tensor]) -> torch.nn.Linear:
    """A head holding a saved ``weight`` (and ``bias``, when present)."""
    n_classes, width = state["weight"].shape
    head = torch.nn.Linear(width, n_classes, bias="bias" in state)
    head.load_state_dict(state)
    return head


# ------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warmup and linear decay; the head may use its own rate."""

    steps: int
    lr: float
    head_lr: float
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup * steps`` steps, then linear decay to zero."""
    ramp = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return max(0.0, (steps - step) / max(1, steps - ramp))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_classifier(model: PooledClassifier, data: Encoded, cfg: TrainConfig,
                     seed: int) -> float:
    """Fine-tune ``model`` (parameters with ``requires_grad``) on ``data``; returns the
    mean loss over the last tenth of the steps."""
    generator = torch.Generator().manual_seed(seed)
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": cfg.lr},
         {"params": list(model.head.parameters()), "lr": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )
    schedule = linear_schedule(optimizer, cfg.steps, cfg.warmup)
    model.train()
    tail: list[float] = []
    for step in range(cfg.steps):
        index = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        logits = model(**data.batch(index))
        loss = torch.nn.functional.cross_entropy(logits, data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        if step >= cfg.steps - max(1, cfg.steps // 10):
            tail.append(loss.item())
    model.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Encoded, batch_size: int = EVAL_BATCH,
             bf16: bool = False) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly; ``bf16`` runs the forward
    under CPU bfloat16 autocast (float32 weights), about 2.7x faster for MiniLM here."""
    model.eval()
    correct = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in data.in_order(batch_size):
            labels = batch.pop("labels")
            correct += int((model(**batch).argmax(-1) == labels).sum())
    return correct / max(1, len(data))


# ------------------------------------------------------------------------------- on disk


def save_tasks(folder: Path, tasks: list[TextTask]) -> None:
    """Write ``data.json``: every task's examples."""
    payload = [{"name": t.name, "description": t.description, "n_classes": t.n_classes,
                "is_pair": t.is_pair,
                "splits": {s: [asdict(e) for e in ex] for s, ex in t.splits.items()}}
               for t in tasks]
    (folder / "data.json").write_text(json.dumps(payload))


def load_tasks(folder: Path) -> list[TextTask]:
    """Read ``data.json`` back."""
    payload = json.loads((folder / "data.json").read_text())
    return [TextTask(p["name"], p["description"], p["n_classes"], p["is_pair"],
                     {s: [Example(**e) for e in ex] for s, ex in p["splits"].items()})
            for p in payload]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings, reports and progress bars silenced for the duration."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def save_encoder(encoder: Any, folder: Path) -> None:
    """An HF folder (config.json + model.safetensors) of a transformers encoder."""
    with quiet_transformers():
        encoder.save_pretrained(folder, safe_serialization=True)


def save_head(head: torch.nn.Linear, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, path)


def cached_build(folder: Path, build: Callable[[Path], None]) -> bool:
    """Run ``build(staging)`` in a staged folder moved to ``folder`` when it succeeds,
    unless ``folder`` is already complete (holds ``suite.json``). Returns True when it
    came from the cache."""
    if (folder / "suite.json").is_file():
        return True
    with staged_output_folder(folder, overwrite=True) as staging:
        build(staging)
    return False


# ---------------------------------------------------------------------------- built suite


@dataclass
class BuiltTextSuite(BuiltSuite):
    """A built text suite: evaluation and statistics over its saved encoders and heads.

    ``make_encoder()`` returns a fresh encoder module (weights to be loaded); the
    tokenizer is read from ``base_dir``.
    """

    make_encoder: Callable[[], torch.nn.Module] | None = None
    pooling: Pooling = "mean"
    max_length: int = 64
    token_types: bool = False
    from_cache: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = EVAL_BATCH
    eval_bf16: bool = False  # bfloat16 autocast in evaluation (as the build scored experts)
    _state: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- loading

    def config(self) -> dict[str, Any]:
        """The base encoder's ``config.json`` (pass it to ``merge_state_dicts``)."""
        return json.loads((self.base_dir / "config.json").read_text())

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.base_dir / "model.safetensors"))

    def expert_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s expert encoder, read as acemerge reads experts (an adapter
        folder: the base plus the adapter's exact update)."""
        base = open_checkpoint(self.base_dir)
        return open_expert(str(self.expert_dirs[task]), base).state_dict()

    def expert_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [self.expert_state_dict(t) for t in range(len(self.expert_dirs))]

    def text_tasks(self) -> list[TextTask]:
        if "tasks" not in self._state:
            self._state["tasks"] = load_tasks(self.folder)
        return self._state["tasks"]

    def tokenizer(self) -> Any:
        if "tokenizer" not in self._state:
            from transformers import AutoTokenizer

            self._state["tokenizer"] = AutoTokenizer.from_pretrained(self.base_dir)
        return self._state["tokenizer"]

    def encoded(self, task: int, split: str) -> Encoded:
        """The tokenized examples of a task's split (cached)."""
        key = ("encoded", task, split)
        if key not in self._state:
            examples = self.text_tasks()[task].splits[split]
            self._state[key] = encode(self.tokenizer(), examples, self.max_length,
                                      self.token_types)
        return self._state[key]

    def head(self, task: int) -> torch.nn.Linear:
        key = ("head", task)
        if key not in self._state:
            path = self.folder / "heads" / f"{self.tasks[task].name}.safetensors"
            self._state[key] = head_from_state(load_file(str(path))).eval()
        return self._state[key]

    def classifier(self, encoder: dict[str, torch.Tensor], task: int) -> PooledClassifier:
        """The shared encoder module loaded with ``encoder``, with task ``task``'s head."""
        if "encoder" not in self._state:
            assert self.make_encoder is not None
            self._state["encoder"] = self.make_encoder().eval()
        module = self._state["encoder"]
        module.load_state_dict(encoder, strict=True)
        return PooledClassifier(module, self.head(task), self.pooling).eval()

    # -- the BuiltSuite interface

    def n_examples(self, task: int, split: str = "test") -> int:
        return len(self.text_tasks()[task].splits[split])

    def evaluate(self, encoder: dict[str, torch.Tensor], task: int, split: str = "test"
                 ) -> float:
        with torch.no_grad():
            return accuracy(self.classifier(encoder, task), self.encoded(task, split),
                            self.eval_batch_size, self.eval_bf16)

    def statistics(self, kinds: Iterable[str], *, gram_examples: int = 1024,
                   fisher_examples: int = 256, batch_size: int = 32, **options: Any) -> Any:
        """A TensorStatistics of the experts' encoders (with their heads), keyed by the
        encoder's state-dict names: per task, Grams on the first ``gram_examples`` and
        Fishers (one backward per example) on the first ``fisher_examples`` of its
        training data. Cached under ``stats/``; ``options`` go to
        :func:`acemerge.statistics.collect_statistics`."""
        from acemerge.statistics import TensorStatistics

        kinds = tuple(sorted(kinds))
        limits = {"grams": gram_examples, "fishers": fisher_examples}
        tag = "-".join(f"{k}{limits.get(k, '')}" for k in kinds) + "".join(
            f"-{k}={options[k]}" for k in sorted(options))
        folder = self.folder / "stats" / tag
        paths = [folder / f"task{t}.safetensors" for t in range(len(self.tasks))]
        if all(p.is_file() for p in paths):
            return TensorStatistics.load(paths)
        stats = TensorStatistics([self._task_statistics(t, kinds, limits, batch_size, options)
                                  for t in range(len(self.tasks))])
        with staged_output_folder(folder, overwrite=True) as staging:
            stats.save(staging)
        return stats

    def _task_statistics(self, task: int, kinds: tuple[str, ...], limits: dict[str, int],
                         batch_size: int, options: dict[str, Any]
                         ) -> dict[str, dict[str, torch.Tensor]]:
        """One expert's statistics of each kind, on the first ``limits[kind]`` examples of
        its training data; keyed by encoder names."""
        from acemerge.statistics import collect_statistics

        model = self.classifier(self.expert_state_dict(task), task)
        out = {}
        for kind in kinds:
            batches = self.encoded(task, "train").in_order(batch_size, limits.get(kind))
            raw = collect_statistics(model, batches, (kind,), **options)[kind]
            out[kind] = {name.removeprefix("encoder."): t for name, t in raw.items()
                         if name.startswith("encoder.")}
        return out


def tasks_of_info(info: dict[str, Any]) -> list[Task]:
    """The :class:`Task` list recorded in ``suite.json``."""
    return [Task(t["name"], t["description"], t["n_classes"]) for t in info["tasks"]]


def suite_json(name: str, seed: int, tiny: bool, version: int, recipe: dict[str, Any],
               tasks: list[TextTask], rows: list[dict[str, Any]], seconds: float
               ) -> dict[str, Any]:
    """What ``suite.json`` records about a build."""
    return {
        "suite": name, "seed": seed, "tiny": tiny, "recipe_version": version,
        "recipe": recipe,
        "tasks": [{"name": t.name, "description": t.description, "n_classes": t.n_classes,
                   "is_pair": t.is_pair} for t in tasks],
        "results": rows, "build_seconds": round(seconds, 1),
    }


@dataclass(frozen=True)
class FineTuneRecipe:
    """What every text suite's recipe sets for its experts (suites add their own)."""

    max_length: int
    expert_steps: dict[str, int]  # task -> AdamW steps
    lr: float
    head_lr: float
    batch_size: int
    sizes: tuple[int, int, int]  # examples per task in train, val, test


@dataclass(frozen=True)
class ExpertSpec:
    """How a suite turns its base encoder into one task's expert."""

    width: int
    pooling: Pooling
    head_bias: bool
    max_length: int
    token_types: bool
    train: TrainConfig
    freeze: tuple[str, ...] = ()  # encoder parameter name prefixes left frozen
    eval_bf16: bool = False  # score under bfloat16 autocast
    #: Wraps the encoder's copy before training (e.g. in a PEFT LoRA model); the wrapper's
    #: ``save_pretrained`` writes the expert folder. None: full fine-tuning.
    adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None


def train_expert(out: Path, base: torch.nn.Module, tokenizer: Any, task: TextTask,
                 spec: ExpertSpec, seed: int, log: Progress) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` (wrapped by ``spec.adapt``) with a new head on
    ``task``; save the expert encoder (or adapter) under ``out/experts/<task>`` and its head
    under ``out/heads``; return its scores (and the base's with the expert's head: the
    zero-shot row)."""
    data = {s: encode(tokenizer, ex, spec.max_length, spec.token_types)
            for s, ex in task.splits.items()}
    torch.manual_seed(seed)
    head = new_head(spec.width, task.n_classes, spec.head_bias, seed)
    encoder = copy.deepcopy(base)
    for name, param in encoder.named_parameters():
        param.requires_grad_(not name.startswith(spec.freeze))
    if spec.adapt is not None:
        encoder = spec.adapt(encoder)
    model = PooledClassifier(encoder, head, spec.pooling)
    loss = train_classifier(model, data["train"], spec.train, seed)
    encoder.requires_grad_(True)
    zero_shot = PooledClassifier(base, head, spec.pooling)
    row = {"task": task.name, "steps": spec.train.steps, "final_loss": round(loss, 4),
           "expert_val": accuracy(model, data["val"], bf16=spec.eval_bf16),
           "expert_test": accuracy(model, data["test"], bf16=spec.eval_bf16),
           "base_test": accuracy(zero_shot, data["test"], bf16=spec.eval_bf16)}
    save_encoder(encoder, out / "experts" / task.name)
    save_head(head, out / "heads" / f"{task.name}.safetensors")
    log(f"expert {task.name} ({spec.train.steps} steps): val {row['expert_val']:.3f} "
        f"test {row['expert_test']:.3f} (base {row['base_test']:.3f})")
    return row


def write_suite_json(folder: Path, payload: dict[str, Any]) -> None:
    """``suite.json``, written last: its presence marks a complete build."""
    (folder / "suite.json").write_text(json.dumps(payload, indent=2) + "\n")


def read_suite_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "suite.json").read_text())


class TextSuite(Suite):
    """A text suite's build: cached under a key of suite, seed, size and recipe; a full
    (not tiny) build also collects the RegMean/Fisher statistics, so that evaluation
    only merges and scores. Subclasses say how to get the base and each expert's spec."""

    pooling: Pooling = "mean"
    token_types: bool = False
    eval_bf16: bool = False
    head_bias: bool = False

    @abstractmethod
    def recipe(self, tiny: bool) -> Any:
        """The (frozen dataclass) recipe of the full or tiny variant; it has
        ``max_length`` and ``sizes``."""

    @abstractmethod
    def make_encoder(self, base_dir: Path) -> torch.nn.Module:
        """A fresh encoder module of the base's configuration."""

    @abstractmethod
    def base_model(self, recipe: Any, seed: int, log: Progress) -> tuple[Any, Any]:
        """The base encoder and its tokenizer (trained or loaded)."""

    @abstractmethod
    def width(self, recipe: Any) -> int:
        """The encoder's hidden size (the heads' input)."""

    def frozen(self, recipe: Any) -> tuple[str, ...]:
        """Encoder parameter name prefixes the experts leave at the base (none)."""
        return ()

    def spec(self, recipe: FineTuneRecipe, task: TextTask) -> ExpertSpec:
        """How task ``task``'s expert is trained."""
        train = TrainConfig(steps=recipe.expert_steps[task.name], lr=recipe.lr,
                            head_lr=recipe.head_lr, batch_size=recipe.batch_size)
        return ExpertSpec(width=self.width(recipe), pooling=self.pooling,
                          head_bias=self.head_bias, max_length=recipe.max_length,
                          token_types=self.token_types, train=train,
                          freeze=self.frozen(recipe), eval_bf16=self.eval_bf16)

    def build(self, cache_dir: Path, *, seed: int = 0, tiny: bool = False,
              progress: bool = True) -> BuiltTextSuite:
        recipe = self.recipe(tiny)
        key = cache_key(self.name, seed, tiny, self.recipe_version, {"recipe": asdict(recipe)})
        folder = Path(cache_dir) / key
        log = Progress(self.name, progress)
        from_cache = cached_build(folder, lambda out: self._build(out, recipe, seed, tiny, log))
        built = self.load(folder, from_cache=from_cache)
        if not from_cache and not tiny:
            built.statistics(("grams", "fishers"))
            log("statistics collected (RegMean Grams, Fisher diagonals)")
        log("loaded from cache" if from_cache else f"built in {log.seconds:.0f}s")
        return built

    def load(self, folder: Path, from_cache: bool = True) -> BuiltTextSuite:
        """A built suite from its folder."""
        info = read_suite_json(folder)
        base_dir = folder / "base"
        return BuiltTextSuite(
            name=self.name, folder=folder, tasks=tasks_of_info(info), base_dir=base_dir,
            expert_dirs=[folder / "experts" / t["name"] for t in info["tasks"]],
            make_encoder=lambda: self.make_encoder(base_dir), pooling=self.pooling,
            max_length=info["recipe"]["max_length"], token_types=self.token_types,
            from_cache=from_cache, info=info, eval_bf16=self.eval_bf16,
        )

    def _build(self, out: Path, recipe: Any, seed: int, tiny: bool, log: Progress) -> None:
        """Train into the staging folder ``out``; ``suite.json`` is written last."""
        tasks = build_tasks(seed, tiny, sizes=recipe.sizes)
        save_tasks(out, tasks)
        base, tokenizer = self.base_model(recipe, seed, log)
        save_encoder(base, out / "base")
        tokenizer.save_pretrained(out / "base")
        rows = [train_expert(out, base, tokenizer, task, self.spec(recipe, task),
                             seed + 1 + index, log)
                for index, task in enumerate(tasks)]
        write_suite_json(out, suite_json(self.name, seed, tiny, self.recipe_version,
                                         asdict(recipe), tasks, rows, log.seconds))
