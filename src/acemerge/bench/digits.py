"""The ``digits`` suite: a tiny ViT on scikit-learn's bundled 8x8 handwritten digits.

Offline and CPU-only (``sklearn.datasets.load_digits``: 1797 real digits, no download).

Data: a stratified, seeded split into test (35%) and the rest, of which 15% is held out as
``val``; the remaining ``train`` part is all that training (base and experts) sees.

Base: ``transformers.ViTModel`` (hidden 48, 4 layers, 4 heads, MLP 96, no pooler; 2x2
patches, so 16 patch tokens + CLS), "pretrained" for 1000 AdamW steps (batch 128, lr 1e-3,
cosine) on label-free objectives disjoint from the expert tasks: which of the 4 rotations
was applied (on the CLS token) plus masked-patch reconstruction (4 of 16 patches grayed
out, their pixels regressed from their tokens), on randomly shifted, rescaled, lightly
noised train digits. The pretraining heads are thrown away.

Experts: the base encoder fine-tuned (every encoder parameter) jointly with a fresh
``nn.Linear`` head on the final CLS token: AdamW (weight decay 0.01, 10% warmup then cosine
decay, batch 64), head lr 3e-3, and a task-dependent encoder lr and step count so that the
task vectors' energies differ (about 0.6 to 2.6 in L2 norm, recorded in the manifest), as
for real fine-tuned experts. Each task changes both the label function and the inputs:

==================  ======  ===============================  ======  =====
task                labels  input                            lr      steps
==================  ======  ===============================  ======  =====
digit               10      plain                            1.5e-4  250
digit_inverted      10      inverted (1 - x)                 5e-4    450
digit_noisy         10      Gaussian noise, sigma 0.25       2.5e-4  350
parity_transposed   2       transposed (x.T)                 4e-4    400
ge5_hflip           2       mirrored left-right              2e-4    250
mod3_vflip          3       mirrored top-bottom              5e-4    400
low_shifted         5       digits 0-4 only, shifted 1 px    1e-4    150
prime_permuted      2       2x2 patches in a fixed order     7.5e-4  500
loop_bold           2       strokes thickened (2x2 max)      3e-4    300
==================  ======  ===============================  ======  =====

(``loop``: the digit has a closed loop, 0 4 6 8 9; ``prime``: 2 3 5 7; the noise is one
fixed draw per task and split.) ``tiny=True``: hidden 32, 2 layers, 300 pretraining steps,
the first four tasks with half the steps at twice the lr.

Heads: each task's head is its expert's head, saved separately and never merged. The
base's (zero-shot) score on a task is the base encoder with that expert's head, as in the
benchmark protocol; no separate head is trained for the base. Since the heads are trained
jointly from scratch, that score is near chance (as for GLUE experts), although the base
is a useful feature extractor (a linear probe on its CLS features reaches ~0.8).

Encoders are saved as Hugging Face folders (``config.json`` + ``model.safetensors`` with
the in-memory state-dict names, which transformers 5 renames on ``save_pretrained``);
training runs single-threaded by default (faster than two threads for these tiny matrices
on a shared machine) and is deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from acemerge.bench.suite import BuiltSuite, Progress, Suite, Task, cache_key
from acemerge.errors import AceMergeError
from acemerge.statistics import KINDS, TensorStatistics, collect_statistics

RECIPE_VERSION = 2  # 2: test fraction 0.35 (standard error of the suite mean <= 0.7)
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.35
VAL_FRACTION = 0.15
NOISE_SIGMA = 0.25
BATCH = 64
HEAD_LR = 3e-3
EVAL_CHUNK = 256

# ------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class TaskRecipe:
    """One expert task: label function, input transform and fine-tuning budget."""

    name: str
    labels: str
    transform: str
    lr: float
    steps: int
    description: str


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a built suite."""

    model: dict
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    tasks: tuple[TaskRecipe, ...]


TASKS: tuple[TaskRecipe, ...] = (
    TaskRecipe("digit", "digit", "plain", 1.5e-4, 250, "digit class, plain images"),
    TaskRecipe("digit_inverted", "digit", "invert", 5e-4, 450, "digit class, inverted images"),
    TaskRecipe("digit_noisy", "digit", "noise", 2.5e-4, 350,
               f"digit class, Gaussian noise (sigma {NOISE_SIGMA})"),
    TaskRecipe("parity_transposed", "parity", "transpose", 4e-4, 400,
               "odd vs even, transposed images"),
    TaskRecipe("ge5_hflip", "ge5", "hflip", 2e-4, 250, "digit >= 5, mirrored left-right"),
    TaskRecipe("mod3_vflip", "mod3", "vflip", 5e-4, 400, "digit mod 3, mirrored top-bottom"),
    TaskRecipe("low_shifted", "low", "shift", 1e-4, 150,
               "digit class among 0-4 only, shifted 1 px down-right"),
    TaskRecipe("prime_permuted", "prime", "permute", 7.5e-4, 500,
               "is prime (2 3 5 7), 2x2 patches in a fixed shuffled order"),
    TaskRecipe("loop_bold", "loop", "bold", 3e-4, 300,
               "has a closed loop (0 4 6 8 9), thickened strokes"),
)

FULL = Recipe(
    model=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=96),
    pretrain_steps=1000, pretrain_batch=128, pretrain_lr=1e-3, tasks=TASKS,
)
TINY = Recipe(
    model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64),
    pretrain_steps=300, pretrain_batch=64, pretrain_lr=2e-3,
    tasks=tuple(TaskRecipe(t.name, t.labels, t.transform, 2 * t.lr, t.steps // 2,
                           t.description) for t in TASKS[:4]),
)


# ------------------------------------------------------------------ labels and inputs

_PRIMES = (2, 3, 5, 7)
_LOOPS = (0, 4, 6, 8, 9)

#: label function name -> (number of classes, kept digits or None, digit -> label)
LABELS: dict[str, tuple[int, tuple[int, ...] | None, Callable[[Tensor], Tensor]]] = {
    "digit": (10, None, lambda y: y),
    "parity": (2, None, lambda y: y % 2),
    "ge5": (2, None, lambda y: (y >= 5).long()),
    "mod3": (3, None, lambda y: y % 3),
    "low": (5, (0, 1, 2, 3, 4), lambda y: y),
    "prime": (2, None, lambda y: torch.isin(y, torch.tensor(_PRIMES)).long()),
    "loop": (2, None, lambda y: torch.isin(y, torch.tensor(_LOOPS)).long()),
}


def _permute_patches(x: Tensor, perm: Tensor) -> Tensor:
    n = x.shape[0]
    patches = x.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, 16, 2, 2)
    return patches[:, perm].reshape(n, 4, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(n, 8, 8)


def transform(name: str, x: Tensor, gen: torch.Generator, perm: Tensor) -> Tensor:
    """Apply input transform ``name`` to images ``x`` (N, 8, 8) in [0, 1]."""
    if name == "plain":
        return x
    if name == "invert":
        return 1.0 - x
    if name == "noise":
        return x + NOISE_SIGMA * torch.randn(x.shape, generator=gen)
    if name == "transpose":
        return x.transpose(-1, -2)
    if name in ("hflip", "vflip"):
        return x.flip(-1 if name == "hflip" else -2)
    if name == "shift":
        return F.pad(x, (1, 0, 1, 0))[..., :8, :8]
    if name == "permute":
        return _permute_patches(x, perm)
    if name == "bold":
        return F.max_pool2d(F.pad(x.unsqueeze(1), (0, 1, 0, 1)), 2, stride=1).squeeze(1)
    raise AceMergeError(f"unknown digits transform {name!r}")


def to_pixels(x: Tensor) -> Tensor:
    """Images in [0, 1] to model inputs (N, 1, 8, 8) in [-1, 1]."""
    return ((x - 0.5) / 0.5).unsqueeze(1).contiguous()


def load_images() -> tuple[Tensor, Tensor]:
    """All 1797 digits as (N, 8, 8) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def make_splits(labels: Tensor, seed: int) -> dict[str, list[int]]:
    """Stratified seeded train / val / test indices."""
    from sklearn.model_selection import train_test_split

    index = list(range(len(labels)))
    y = labels.tolist()
    rest, test = train_test_split(index, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=VAL_FRACTION, random_state=seed,
                                  stratify=[y[i] for i in rest])
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


@dataclass
class DigitsData:
    """The images, their split indices and the suite's fixed patch permutation."""

    images: Tensor
    digits: Tensor
    splits: dict[str, list[int]]
    seed: int
    perm: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.perm = torch.randperm(16, generator=torch.Generator().manual_seed(self.seed + 7919))

    def task_split(self, task_index: int, task: TaskRecipe, split: str) -> tuple[Tensor, Tensor]:
        """Model inputs and labels of one task on one split (fixed noise per task/split)."""
        _, kept, label_fn = LABELS[task.labels]
        idx = torch.tensor(self.splits[split], dtype=torch.long)
        digits = self.digits[idx]
        if kept is not None:
            keep = torch.isin(digits, torch.tensor(kept))
            idx, digits = idx[keep], digits[keep]
        gen = torch.Generator().manual_seed(
            self.seed * 1_000_003 + task_index * 101 + SPLITS.index(split))
        x = transform(task.transform, self.images[idx], gen, self.perm)
        return to_pixels(x), label_fn(digits)


# ---------------------------------------------------------------------------- models


def vit_config(model: dict) -> object:
    """The suite's ViTConfig (8x8 grayscale, 2x2 patches, no dropout)."""
    from transformers import ViTConfig

    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, **model)
    config.architectures = ["ViTModel"]
    return config


def new_encoder(config: object) -> torch.nn.Module:
    """A ViTModel without pooler (the suite reads the final CLS token)."""
    from transformers import ViTModel

    return ViTModel(config, add_pooling_layer=False)


def cls_features(encoder: torch.nn.Module, pixels: Tensor) -> Tensor:
    """The final (layer-normed) CLS token."""
    return encoder(pixel_values=pixels).last_hidden_state[:, 0]


class Classifier(torch.nn.Module):
    """Encoder + linear head on the CLS token; ``forward(pixels) -> logits``."""

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.head(cls_features(self.encoder, pixel_values))


def save_encoder(encoder: torch.nn.Module, folder: Path) -> None:
    """A Hugging Face folder: config.json + model.safetensors (in-memory names)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def load_encoder(folder: Path) -> torch.nn.Module:
    """Load a folder written by :func:`save_encoder` (strict)."""
    from transformers import ViTConfig

    encoder = new_encoder(ViTConfig.from_pretrained(folder))
    encoder.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return encoder.eval()


def load_head(path: Path) -> torch.nn.Linear:
    """A head saved as safetensors ``weight``/``bias``."""
    tensors = load_file(path)
    out_features, in_features = tensors["weight"].shape
    head = torch.nn.Linear(in_features, out_features)
    head.load_state_dict(tensors, strict=True)
    return head.eval()


# -------------------------------------------------------------------------- training


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (None: leave as is), restoring the count after."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float
              ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to zero."""
    n_warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _random_shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Translate each image by -1, 0 or 1 pixel on each axis (zero fill)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = (torch.randint(0, 3, (n,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def _pretrain_batch(images: Tensor, batch: int, gen: torch.Generator
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Augmented, rotated, masked inputs; rotation labels; patch mask; patch targets."""
    x = images[torch.randint(0, len(images), (batch,), generator=gen)]
    x = _random_shift(x, gen) * (0.6 + 0.4 * torch.rand(batch, 1, 1, generator=gen))
    x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    rot = torch.randint(0, 4, (batch,), generator=gen)
    for k in range(1, 4):
        x[rot == k] = torch.rot90(x[rot == k], k, dims=(1, 2))
    targets = to_pixels(x).reshape(batch, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(batch, 16, 4)
    mask = torch.rand(batch, 16, generator=gen).argsort(dim=1) < 4  # 4 of 16 patches
    pixel_mask = mask.reshape(batch, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    return to_pixels(x.masked_fill(pixel_mask, 0.5)), rot, mask, targets


def pretrain(images: Tensor, recipe: Recipe, seed: int, log: Callable[[str], None]
             ) -> torch.nn.Module:
    """The base encoder: rotation prediction + masked-patch reconstruction."""
    torch.manual_seed(seed)
    encoder = new_encoder(vit_config(recipe.model))
    hidden = encoder.config.hidden_size
    rot_head, rec_head = torch.nn.Linear(hidden, 4), torch.nn.Linear(hidden, 4)
    params = [*encoder.parameters(), *rot_head.parameters(), *rec_head.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.pretrain_lr, weight_decay=0.05)
    sched = _schedule(opt, recipe.pretrain_steps, warmup=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    encoder.train()
    for step in range(recipe.pretrain_steps):
        pixels, rot, mask, targets = _pretrain_batch(images, recipe.pretrain_batch, gen)
        tokens = encoder(pixel_values=pixels).last_hidden_state
        rot_loss = F.cross_entropy(rot_head(tokens[:, 0]), rot)
        rec_loss = F.mse_loss(rec_head(tokens[:, 1:])[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        (rot_loss + rec_loss).backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, recipe.pretrain_steps // 5) == 0:
            log(f"pretrain {step + 1}/{recipe.pretrain_steps}: rotation "
                f"{rot_loss.item():.3f}, reconstruction {rec_loss.item():.3f}")
    return encoder.eval()


def finetune(base: torch.nn.Module, pixels: Tensor, labels: Tensor, n_classes: int,
             task: TaskRecipe, seed: int) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """An expert: the whole base encoder plus a fresh linear head, trained jointly."""
    torch.manual_seed(seed)
    encoder = new_encoder(base.config)
    encoder.load_state_dict(base.state_dict())
    head = torch.nn.Linear(base.config.hidden_size, n_classes)
    model = Classifier(encoder, head).train()
    opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": task.lr},
                             {"params": head.parameters(), "lr": HEAD_LR}], weight_decay=0.01)
    sched = _schedule(opt, task.steps, warmup=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(task.steps):
        idx = torch.randint(0, len(labels), (BATCH,), generator=gen)
        loss = F.cross_entropy(model(pixels[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return encoder.eval(), head.eval()


# ------------------------------------------------------------------------- the suite


def _tensor_norm(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


@dataclass
class DigitsBuilt(BuiltSuite):
    """A built digits suite (on disk) with cached evaluation inputs."""

    recipe: Recipe | None = None
    data: DigitsData | None = None
    head_paths: list[Path] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    #: True when this build trained the models; False when it loaded them from the cache.
    trained: bool = False
    build_seconds: float = 0.0
    threads: int | None = 1
    _inputs: dict = field(default_factory=dict, repr=False)
    _heads: dict = field(default_factory=dict, repr=False)
    _model: torch.nn.Module | None = field(default=None, repr=False)

    def config(self) -> dict:
        """The encoders' ``config.json`` (pass it to ``merge_state_dicts``)."""
        return json.loads((self.base_dir / "config.json").read_text())

    def base_state_dict(self) -> dict[str, Tensor]:
        return load_file(self.base_dir / "model.safetensors")

    def expert_state_dicts(self) -> list[dict[str, Tensor]]:
        return [load_file(d / "model.safetensors") for d in self.expert_dirs]

    def inputs(self, task: int, split: str) -> tuple[Tensor, Tensor]:
        """Cached model inputs and labels of a task's split."""
        if split not in SPLITS:
            raise AceMergeError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        key = (task, split)
        if key not in self._inputs:
            with torch.inference_mode(False):  # usable with autograd (Fisher) later
                self._inputs[key] = self.data.task_split(task, self.recipe.tasks[task], split)
        return self._inputs[key]

    def head(self, task: int) -> torch.nn.Linear:
        if task not in self._heads:
            self._heads[task] = load_head(self.head_paths[task])
        return self._heads[task]

    def _encoder_with(self, encoder: dict[str, Tensor]) -> torch.nn.Module:
        if self._model is None:
            self._model = new_encoder(vit_config(self.recipe.model)).eval()
        self._model.load_state_dict(encoder, strict=True)
        return self._model

    def n_examples(self, task: int, split: str = "test") -> int:
        return int(self.inputs(task, split)[1].numel())

    def evaluate(self, encoder: dict[str, Tensor], task: int, split: str = "test") -> float:
        pixels, labels = self.inputs(task, split)
        model, head = self._encoder_with(encoder), self.head(task)
        with torch_threads(self.threads), torch.inference_mode():
            logits = torch.cat([head(cls_features(model, chunk))
                                for chunk in pixels.split(EVAL_CHUNK)])
        return float((logits.argmax(-1) == labels).float().mean())

    @property
    def from_cache(self) -> bool:
        """Whether this build loaded the models from the cache (trained nothing)."""
        return not self.trained

    def statistics(self, kinds: Iterable[str], *, fisher_examples: int = 256
                   ) -> TensorStatistics:
        """A TensorStatistics: per task, Grams on all its training inputs and Fishers
        (sampled labels) on the first ``fisher_examples`` of them, of the expert encoder
        with its head; keyed by the encoder's state-dict names."""
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise AceMergeError(f"unknown statistics {unknown} (known: {', '.join(KINDS)})")
        with torch_threads(self.threads):
            return TensorStatistics([self._task_statistics(t, kinds, fisher_examples)
                                     for t in range(len(self.tasks))])

    def _task_statistics(self, task: int, kinds: tuple[str, ...], fisher_examples: int
                         ) -> dict[str, dict[str, Tensor]]:
        model = Classifier(load_encoder(self.expert_dirs[task]), self.head(task))
        names = [f"encoder.{k}" for k in model.encoder.state_dict()]
        pixels, _ = self.inputs(task, "train")
        out: dict[str, dict[str, Tensor]] = {}
        if "grams" in kinds:
            out.update(collect_statistics(model, pixels.split(256), ("grams",),
                                          param_names=names))
        if "fishers" in kinds:
            out.update(collect_statistics(model, pixels[:fisher_examples].split(64),
                                          ("fishers",), param_names=names,
                                          seed=self.data.seed + task))
        return {kind: {k.removeprefix("encoder."): v for k, v in tensors.items()}
                for kind, tensors in out.items()}


class DigitsSuite(Suite):
    """Builds (or loads) the digits suite; see the module docstring for the recipe."""

    name = "digits"
    recipe_version = RECIPE_VERSION

    def __init__(self, threads: int | None = 1) -> None:
        self.threads = threads

    def build(self, cache_dir: Path, *, seed: int = 0, tiny: bool = False,
              progress: bool = True) -> DigitsBuilt:
        log = Progress(self.name, progress)
        folder = Path(cache_dir) / self.key(seed, tiny)
        recipe = TINY if tiny else FULL
        trained = not _complete(folder, recipe)
        if trained:
            _train_into(folder, recipe, seed, tiny, self.threads, log)
        built = _load(folder, recipe, self.threads)
        built.trained, built.build_seconds = trained, log.seconds
        return built

    def key(self, seed: int, tiny: bool) -> str:
        """The cache folder name."""
        import transformers

        major = transformers.__version__.split(".")[0]
        return cache_key(self.name, seed, tiny, self.recipe_version,
                         extra={"transformers": major})


def _complete(folder: Path, recipe: Recipe | None = None) -> bool:
    """Whether a cached build is whole: its manifest and every file it lists exist (and,
    given ``recipe``, it was built with that recipe)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        content = json.loads(manifest.read_text())
        files = content["files"]
    except (ValueError, KeyError):
        return False
    if recipe is not None and content.get("recipe") != json.loads(json.dumps(asdict(recipe))):
        return False
    return all((folder / name).is_file() for name in files)


def _train_into(folder: Path, recipe: Recipe, seed: int, tiny: bool, n_threads: int | None,
                log: Callable[[str], None]) -> None:
    """Train everything into a temporary sibling folder, then move it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with torch_threads(n_threads), torch.random.fork_rng(devices=[]):
            _train(staging, recipe, seed, tiny, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    try:
        os.replace(staging, folder)
    except OSError:  # another build finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not _complete(folder):
            raise


def _train(out: Path, recipe: Recipe, seed: int, tiny: bool, log: Callable[[str], None]
           ) -> None:
    start = time.perf_counter()
    images, digits = load_images()
    data = DigitsData(images, digits, make_splits(digits, seed), seed)
    base = pretrain(images[data.splits["train"]], recipe, seed, log)
    save_encoder(base, out / "base")
    files = ["base/config.json", "base/model.safetensors"]
    base_state = base.state_dict()
    (out / "heads").mkdir()
    norms = []
    for t, task in enumerate(recipe.tasks):
        pixels, labels = data.task_split(t, task, "train")
        n_classes = LABELS[task.labels][0]
        encoder, head = finetune(base, pixels, labels, n_classes, task, seed * 1000 + t + 17)
        save_encoder(encoder, out / "experts" / task.name)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()},
                  out / "heads" / f"{task.name}.safetensors")
        files += [f"experts/{task.name}/config.json", f"experts/{task.name}/model.safetensors",
                  f"heads/{task.name}.safetensors"]
        norms.append(_tensor_norm(encoder.state_dict(), base_state))
        log(f"expert {task.name}: {task.steps} steps, task-vector norm {norms[-1]:.3f}")
    manifest = {
        "suite": "digits", "recipe_version": RECIPE_VERSION, "seed": seed, "tiny": tiny,
        "recipe": asdict(recipe), "splits": data.splits, "task_vector_norms": norms,
        "train_seconds": round(time.perf_counter() - start, 1), "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _load(folder: Path, recipe: Recipe, n_threads: int | None) -> DigitsBuilt:
    manifest = json.loads((folder / "manifest.json").read_text())
    images, digits = load_images()
    data = DigitsData(images, digits, manifest["splits"], manifest["seed"])
    tasks = [Task(t.name, t.description, LABELS[t.labels][0]) for t in recipe.tasks]
    return DigitsBuilt(
        name="digits", folder=folder, tasks=tasks, base_dir=folder / "base",
        expert_dirs=[folder / "experts" / t.name for t in recipe.tasks], recipe=recipe,
        data=data, head_paths=[folder / "heads" / f"{t.name}.safetensors" for t in recipe.tasks],
        manifest=manifest, threads=n_threads,
    )
