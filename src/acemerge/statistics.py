"""Per-task statistics for data-dependent methods (RegMean's Grams, Fisher's diagonals).

A provider answers ``get(kind, name, task)`` for a parameter name as stored in the
checkpoint. Kinds:

- ``grams``: the (d_in, d_in) Gram X^T X of the inputs of a linear layer (already in the
  layer's input space, so orientation does not change it);
- ``fishers``: the diagonal Fisher, shaped like the stored parameter (the engine
  transposes it together with a Conv1D weight).

:func:`collect_statistics` computes them for one task from its expert model and data;
:func:`collect_tensor_statistics` does so for every task and returns a provider.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import load_file, save_file

from acemerge.errors import AceMergeError

ELEMENTWISE_KINDS = frozenset({"fishers"})
_SEPARATOR = "::"


class StatisticsProvider(Protocol):
    """Where the engine takes per-task statistics from."""

    def get(self, kind: str, name: str, task: int) -> torch.Tensor:
        """The statistic ``kind`` of parameter ``name`` for task ``task``."""
        ...


class TensorStatistics:
    """Statistics held as tensors: one ``{kind: {name: tensor}}`` per task."""

    def __init__(self, per_task: list[dict[str, dict[str, torch.Tensor]]]) -> None:
        self.per_task = per_task

    def get(self, kind: str, name: str, task: int) -> torch.Tensor:
        try:
            return self.per_task[task][kind][name]
        except (IndexError, KeyError):
            message = f"no '{kind}' statistic for parameter '{name}' of task {task}"
            raise AceMergeError(message) from None

    def save(self, folder: str | Path) -> list[Path]:
        """One safetensors file per task (keys ``kind::name``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for task, kinds in enumerate(self.per_task):
            flat = {f"{kind}{_SEPARATOR}{name}": t.contiguous()
                    for kind, tensors in kinds.items() for name, t in tensors.items()}
            paths.append(folder / f"task{task}.safetensors")
            save_file(flat, paths[-1])
        return paths

    @classmethod
    def load(cls, paths: list[str | Path]) -> TensorStatistics:
        """Read files written by :meth:`save`, in task order."""
        per_task = []
        for path in paths:
            kinds: dict[str, dict[str, torch.Tensor]] = {}
            for key, tensor in load_file(str(path)).items():
                kind, _, name = key.partition(_SEPARATOR)
                kinds.setdefault(kind, {})[name] = tensor
            per_task.append(kinds)
        return cls(per_task)


# --------------------------------------------------------------------------- collection

KINDS = ("grams", "fishers")
FisherLabels = Literal["sampled", "expected", "true"]
#: ``loss_fn(output, example) -> scalar``: the negative log-likelihood of one example.
LossFn = Callable[[Any, Any], torch.Tensor]


def collect_statistics(
    model: torch.nn.Module,
    batches: Iterable[Any],
    kinds: Iterable[str] = ("grams",),
    *,
    loss_fn: LossFn | None = None,
    param_names: Iterable[str] | None = None,
    max_batches: int | None = None,
    normalize: bool = False,
    fisher_labels: FisherLabels = "sampled",
    seed: int = 0,
    mask_padding: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of ONE task: ``{kind: {state_dict name: tensor}}`` (float32+, on CPU).

    ``batches`` yields, for the model's forward:

    - a mapping: ``model(**batch)`` without its ``labels`` entry (transformers style);
    - a tensor: ``model(batch)``;
    - an ``(inputs, labels)`` pair: ``inputs`` as above, ``labels`` for the Fisher.

    ``grams``: X^T X of the input rows of every ``torch.nn.Linear`` and transformers
    ``Conv1D`` (leading dims flattened to (N, d_in)), keyed by the module's weight name.
    Rows whose ``attention_mask`` entry is 0 are left out when ``mask_padding`` and the
    input's leading dims match the mask. RegMean uses the plain sum (so a task with more
    data weighs more); ``normalize`` divides by the row count instead.

    ``fishers``: the diagonal Fisher, mean over examples of the squared gradient of the
    example's log-likelihood, for every floating parameter (float buffers get zeros).
    Examples are taken one at a time. The log-likelihood is the sum over the positions of
    the output's ``.logits`` (or the output, when it is a tensor) of log p(y), with y
    ``sampled`` from the model (seeded by ``seed``), the ``expected`` value over every
    class (one position only: classification), or the data's ``true`` labels (aligned
    with the logits as given, no shift; padded positions -100). ``loss_fn(output,
    example)`` replaces all this with the caller's negative log-likelihood.

    Batch tensors must be on the model's device; the results are returned on the CPU.
    ``param_names`` restricts the output to those names; ``max_batches`` stops early.
    The model runs in eval mode (restored afterwards); a single pass is made over
    ``batches``, so a generator is fine.
    """
    kinds = tuple(kinds)
    _check_options(kinds, fisher_labels)
    wanted = set(param_names) if param_names is not None else None
    grams = _GramHooks(model, wanted, mask_padding) if "grams" in kinds else None
    fishers = (_FisherAccumulator(model, wanted, loss_fn, fisher_labels, seed)
               if "fishers" in kinds else None)
    was_training = model.training
    model.eval()
    try:
        with grams.attached() if grams else contextlib.nullcontext():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                if fishers is not None:
                    fishers.add(batch, grams)
                else:
                    _forward_grams(model, batch, grams)
    finally:
        model.train(was_training)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if grams is not None:
        out["grams"] = grams.result(normalize)
    if fishers is not None:
        out["fishers"] = fishers.result()
    return out


def collect_tensor_statistics(
    tasks: Iterable[tuple[torch.nn.Module, Iterable[Any]]],
    kinds: Iterable[str] = ("grams",),
    **options: Any,
) -> TensorStatistics:
    """:func:`collect_statistics` for each ``(expert model, its data)``, in task order."""
    kinds = tuple(kinds)
    return TensorStatistics([collect_statistics(model, batches, kinds, **options)
                             for model, batches in tasks])


def _check_options(kinds: tuple[str, ...], fisher_labels: str) -> None:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise AceMergeError(
            f"unknown statistic '{unknown[0] if unknown else ''}' (known: {', '.join(KINDS)})"
        )
    if fisher_labels not in ("sampled", "expected", "true"):
        raise AceMergeError(
            f"fisher_labels must be 'sampled', 'expected' or 'true', got {fisher_labels!r}"
        )


def _linear_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, int]]:
    """(name, module, d_in) of every Linear and Conv1D, shared modules once per name."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # noqa: N806
    for name, module in model.named_modules(remove_duplicate=False):
        if Conv1D and isinstance(module, Conv1D):
            yield name, module, module.weight.shape[0]  # stored (d_in, d_out)
        elif isinstance(module, torch.nn.Linear):
            yield name, module, module.in_features


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


class _GramHooks:
    """Forward pre-hooks accumulating X^T X per Linear/Conv1D module."""

    def __init__(self, model: torch.nn.Module, wanted: set[str] | None,
                 mask_padding: bool) -> None:
        self.names: dict[int, list[str]] = {}
        self.modules: dict[int, torch.nn.Module] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.rows: dict[int, int] = {}
        self.mask: torch.Tensor | None = None
        self.mask_padding = mask_padding
        for name, module, d_in in _linear_modules(model):
            if wanted is not None and _weight_name(name) not in wanted:
                continue
            key = id(module)
            self.names.setdefault(key, []).append(_weight_name(name))
            if key not in self.sums:
                weight = module.weight
                dtype = torch.promote_types(weight.dtype, torch.float32)
                self.sums[key] = torch.zeros(d_in, d_in, dtype=dtype, device=weight.device)
                self.rows[key], self.modules[key] = 0, module

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = [module.register_forward_pre_hook(self._hook)
                   for module in self.modules.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def set_mask(self, example: Any) -> None:
        """Take the padding mask of the example about to run (None when absent)."""
        inputs = example[0] if isinstance(example, (tuple, list)) else example
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        self.mask = mask if self.mask_padding else None

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        key = id(module)
        x = args[0].detach()
        mask = self.mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            rows = x[mask.to(device=x.device, dtype=torch.bool)]  # real tokens only
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.to(self.sums[key].dtype)
        self.sums[key] += rows.T @ rows  # X^T X
        self.rows[key] += rows.shape[0]

    def result(self, normalize: bool) -> dict[str, torch.Tensor]:
        out = {}
        for key, total in self.sums.items():
            gram = total / self.rows[key] if normalize and self.rows[key] else total
            for name in self.names[key]:
                out[name] = gram.cpu()
        return out


def _forward_grams(model: torch.nn.Module, batch: Any, grams: _GramHooks | None) -> None:
    if grams is not None:
        grams.set_mask(batch)
    with torch.no_grad():
        _forward(model, batch)


def _forward(model: torch.nn.Module, batch: Any) -> Any:
    """Run the model on one batch in any accepted form."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise AceMergeError(
                f"a batch given as a sequence must be an (inputs, labels) pair, got {len(batch)}"
            )
        batch = batch[0]
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch)


def _batch_size(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else None
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(obj, (Mapping, tuple, list)):
        for value in values:
            size = _batch_size(value)
            if size is not None:
                return size
    return None


def _slice(obj: Any, index: int, size: int) -> Any:
    """Example ``index`` of a batch (a batch of one): tensors whose first dim is ``size``."""
    if isinstance(obj, torch.Tensor):
        return obj[index:index + 1] if obj.dim() and obj.shape[0] == size else obj
    if isinstance(obj, Mapping):
        return {k: _slice(v, index, size) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, index, size) for v in obj)
    return obj


def _examples(batch: Any) -> Iterator[Any]:
    size = _batch_size(batch)
    if size is None:
        raise AceMergeError("a batch holds no tensor with a batch dimension")
    for index in range(size):
        yield _slice(batch, index, size)


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise AceMergeError(
            "the model's output has no .logits and is not a tensor: pass loss_fn to "
            "collect_statistics"
        )
    return logits


def _true_labels(example: Any) -> torch.Tensor:
    if isinstance(example, (tuple, list)):
        return example[1]
    if isinstance(example, Mapping) and "labels" in example:
        return example["labels"]
    raise AceMergeError(
        "fisher_labels='true' needs labels: batches as mappings with 'labels' or "
        "(inputs, labels) pairs"
    )


class _FisherAccumulator:
    """Mean over examples of squared per-example gradients of the log-likelihood."""

    def __init__(self, model: torch.nn.Module, wanted: set[str] | None,
                 loss_fn: LossFn | None, labels: str, seed: int) -> None:
        self.model, self.loss_fn, self.labels = model, loss_fn, labels
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws anywhere
        self.names: dict[int, list[str]] = {}
        self.params: dict[int, torch.nn.Parameter] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if param.is_floating_point() and (wanted is None or name in wanted):
                self.names.setdefault(id(param), []).append(name)
                self.params[id(param)] = param
        self.sums = {key: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                     for key, p in self.params.items()}
        params = {name for names in self.names.values() for name in names}
        self.buffers = {name: torch.zeros(b.shape, dtype=torch.float32)
                        for name, b in model.state_dict().items()
                        if b.is_floating_point() and name not in params
                        and (wanted is None or name in wanted)}
        self.count = 0

    def add(self, batch: Any, grams: _GramHooks | None) -> None:
        """Accumulate every example of ``batch`` (and its Grams, when collected)."""
        params = list(self.params.values())
        frozen = [p for p in params if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            for example in _examples(batch):
                if grams is not None:
                    grams.set_mask(example)
                self._add_example(example, params)
        finally:
            for p in frozen:
                p.requires_grad_(False)

    def _add_example(self, example: Any, params: list[torch.nn.Parameter]) -> None:
        output = _forward(self.model, example)
        for weight, nll in self._likelihood_terms(output, example):
            grads = torch.autograd.grad(nll, params, retain_graph=True, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                if grad is not None:
                    self.sums[id(param)] += weight * grad.to(self.sums[id(param)].dtype) ** 2
        self.count += 1

    def _likelihood_terms(self, output: Any, example: Any
                          ) -> Iterator[tuple[float, torch.Tensor]]:
        """(weight, negative log-likelihood) pairs whose weighted squared gradients sum
        to this example's Fisher contribution."""
        if self.loss_fn is not None:
            yield 1.0, self.loss_fn(output, example)
            return
        logits = _logits(output)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
        if self.labels == "expected":
            yield from self._expected_terms(log_probs)
            return
        if self.labels == "true":
            labels = _true_labels(example).to(logits.device).long()
        else:
            labels = self._sample(log_probs)
        labels = self._mask_padding(labels, example)
        flat = log_probs.reshape(-1, log_probs.shape[-1])
        yield 1.0, torch.nn.functional.nll_loss(flat, labels.reshape(-1), reduction="sum")

    def _expected_terms(self, log_probs: torch.Tensor
                        ) -> Iterator[tuple[float, torch.Tensor]]:
        flat = log_probs.reshape(-1)
        if log_probs.numel() != log_probs.shape[-1]:
            raise AceMergeError(
                "fisher_labels='expected' needs one prediction per example (classification); "
                f"got logits of shape {tuple(log_probs.shape)}: use 'sampled'"
            )
        probs = flat.detach().exp()
        for label in range(flat.shape[0]):
            yield float(probs[label]), -flat[label]

    def _sample(self, log_probs: torch.Tensor) -> torch.Tensor:
        probs = log_probs.detach().exp().reshape(-1, log_probs.shape[-1]).cpu().double()
        draws = torch.multinomial(probs, 1, generator=self.generator)
        return draws.reshape(log_probs.shape[:-1]).to(log_probs.device)

    @staticmethod
    def _mask_padding(labels: torch.Tensor, example: Any) -> torch.Tensor:
        inputs = example[0] if isinstance(example, (tuple, list)) else example
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is None or tuple(mask.shape) != tuple(labels.shape):
            return labels
        return labels.masked_fill(~mask.to(device=labels.device, dtype=torch.bool), -100)

    def result(self) -> dict[str, torch.Tensor]:
        out = dict(self.buffers)
        for key, total in self.sums.items():
            fisher = (total / max(self.count, 1)).cpu()
            for name in self.names[key]:
                out[name] = fisher
        return out
