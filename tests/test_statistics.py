"""Collecting per-task statistics: Grams of linear inputs, diagonal Fishers."""

from __future__ import annotations

import pytest
import torch
import transformers

from acemerge.errors import AceMergeError
from acemerge.statistics import (
    TensorStatistics,
    collect_statistics,
    collect_tensor_statistics,
)


def tiny_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 3)).double()


def tensor_batches(count: int = 3, seed: int = 0, shape: tuple[int, ...] = (6, 4)
                   ) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]


def tiny_gpt2(seed: int = 0) -> transformers.GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, pad_token_id=0)
    return transformers.GPT2ForSequenceClassification(config).eval()


# ------------------------------------------------------------------------------ Grams


def test_mlp_grams_are_x_transpose_x() -> None:
    model, batches = tiny_mlp(), tensor_batches()
    grams = collect_statistics(model, batches)["grams"]
    assert set(grams) == {"0.weight", "2.weight"}
    x = torch.cat(batches)
    hidden = torch.relu(model[0](x)).detach()
    assert torch.allclose(grams["0.weight"], x.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grams["2.weight"], hidden.T @ hidden, rtol=1e-12, atol=1e-12)
    assert grams["0.weight"].dtype == torch.float64 and grams["0.weight"].device.type == "cpu"


def test_leading_dims_are_flattened_and_normalize_divides_by_rows() -> None:
    model, batches = tiny_mlp(), tensor_batches(count=2, shape=(2, 3, 4))
    stats = collect_statistics(model, batches, normalize=True)["grams"]
    x = torch.cat(batches).reshape(-1, 4)
    assert torch.allclose(stats["0.weight"], x.T @ x / 12, rtol=1e-12)


def test_float32_model_accumulates_in_float32() -> None:
    model = tiny_mlp().float()
    batches = [b.float() for b in tensor_batches()]
    gram = collect_statistics(model, batches)["grams"]["0.weight"]
    x = torch.cat(batches).double()
    assert gram.dtype == torch.float32
    assert torch.allclose(gram.double(), x.T @ x, rtol=1e-5)


def test_max_batches_param_names_and_mode() -> None:
    model = tiny_mlp().train()
    batches = iter(tensor_batches())  # a one-shot iterator is fine
    grams = collect_statistics(model, batches, param_names=["2.weight"], max_batches=1)["grams"]
    assert set(grams) == {"2.weight"}
    hidden = torch.relu(model[0](tensor_batches()[0])).detach()
    assert torch.allclose(grams["2.weight"], hidden.T @ hidden, rtol=1e-12)
    assert model.training  # restored


def test_gpt2_conv1d_gram_is_in_the_input_space() -> None:
    model = tiny_gpt2()
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    grams = collect_statistics(model, [{"input_ids": ids}])["grams"]
    assert set(grams) == {f"transformer.h.0.{m}.weight" for m in
                          ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {
        "score.weight"}
    assert grams["transformer.h.0.attn.c_attn.weight"].shape == (16, 16)  # stored (16, 48)
    assert grams["transformer.h.0.mlp.c_proj.weight"].shape == (64, 64)  # stored (64, 16)
    with torch.no_grad():
        t = model.transformer
        x = t.h[0].ln_1(t.wte(ids) + t.wpe(torch.arange(7))).reshape(-1, 16)
    assert torch.allclose(grams["transformer.h.0.attn.c_attn.weight"], x.T @ x,
                          rtol=1e-5, atol=1e-5)


def test_padding_rows_are_left_out() -> None:
    model = tiny_gpt2()
    long = torch.tensor([[5, 6, 7, 8, 9]])
    short = torch.tensor([[11, 12, 13]])
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    masked = collect_statistics(model, [padded])["grams"]
    separate = collect_statistics(model, [{"input_ids": long}, {"input_ids": short}])["grams"]
    unmasked = collect_statistics(model, [padded], mask_padding=False)["grams"]
    for name, gram in separate.items():
        assert torch.allclose(masked[name], gram, rtol=1e-4, atol=1e-5), name
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(unmasked[name], separate[name], rtol=1e-4, atol=1e-5)


def test_collect_tensor_statistics_round_trip(tmp_path) -> None:
    provider = collect_tensor_statistics(
        [(tiny_mlp(0), tensor_batches(seed=1)), (tiny_mlp(1), tensor_batches(seed=2))],
        kinds=("grams", "fishers"),
    )
    loaded = TensorStatistics.load(provider.save(tmp_path))
    for task in range(2):
        for kind, name in [("grams", "0.weight"), ("fishers", "2.bias")]:
            assert torch.equal(loaded.get(kind, name, task), provider.get(kind, name, task))
    with pytest.raises(AceMergeError, match="no 'grams' statistic for parameter '0.bias'"):
        provider.get("grams", "0.bias", 0)


# ---------------------------------------------------------------------------- Fishers


def linear_classifier() -> torch.nn.Linear:
    torch.manual_seed(3)
    return torch.nn.Linear(3, 4).double()


def labelled_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(5, 3, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (5,), generator=gen)) for _ in range(2)]


def softmax_regression_fisher(model: torch.nn.Linear, batches, expected: bool
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-derived: d(-log p_y)/dW = (p - e_y) x^T, d/db = p - e_y."""
    fw, fb, n = torch.zeros_like(model.weight), torch.zeros_like(model.bias), 0
    for x, y in batches:
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=-1)
        for i in range(x.shape[0]):
            classes = range(4) if expected else [int(y[i])]
            for c in classes:
                weight = float(probs[i, c]) if expected else 1.0
                residual = probs[i] - torch.nn.functional.one_hot(torch.tensor(c), 4)
                fw += weight * torch.outer(residual, x[i]) ** 2
                fb += weight * residual**2
            n += 1
    return fw / n, fb / n


@pytest.mark.parametrize("labels", ["true", "expected"])
def test_fisher_of_softmax_regression(labels: str) -> None:
    model, batches = linear_classifier(), labelled_batches()
    fishers = collect_statistics(model, batches, ("fishers",), fisher_labels=labels)["fishers"]
    fw, fb = softmax_regression_fisher(model, batches, expected=labels == "expected")
    assert set(fishers) == {"weight", "bias"}
    assert torch.allclose(fishers["weight"], fw, rtol=1e-10, atol=1e-14)
    assert torch.allclose(fishers["bias"], fb, rtol=1e-10, atol=1e-14)


def test_sampled_labels_are_seeded() -> None:
    model, batches = linear_classifier(), labelled_batches()
    inputs = [x for x, _ in batches]

    def run(seed: int) -> torch.Tensor:
        return collect_statistics(model, inputs, ("fishers",), seed=seed)["fishers"]["weight"]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_loss_fn_replaces_the_likelihood() -> None:
    model, batches = linear_classifier(), labelled_batches()

    def nll(output: torch.Tensor, example) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(output, example[1], reduction="sum")

    custom = collect_statistics(model, batches, ("fishers",), loss_fn=nll)["fishers"]
    true = collect_statistics(model, batches, ("fishers",), fisher_labels="true")["fishers"]
    assert torch.allclose(custom["weight"], true["weight"], rtol=1e-12)


def test_gpt2_fishers_cover_the_state_dict_and_grams_in_one_pass() -> None:
    model = tiny_gpt2()
    for p in model.transformer.wpe.parameters():
        p.requires_grad_(False)  # frozen parameters still get a Fisher
    gen = torch.Generator().manual_seed(1)
    batches = (dict(input_ids=torch.randint(1, 50, (2, 5), generator=gen),
                    labels=torch.randint(0, 2, (2,), generator=gen)) for _ in range(2))
    stats = collect_statistics(model, batches, ("grams", "fishers"), fisher_labels="true")
    sd = model.state_dict()
    assert set(stats["fishers"]) == set(sd)
    for name, fisher in stats["fishers"].items():
        assert fisher.shape == sd[name].shape and (fisher >= 0).all(), name
    assert stats["fishers"]["transformer.h.0.attn.c_attn.weight"].abs().sum() > 0
    assert stats["fishers"]["transformer.wpe.weight"].abs().sum() > 0
    assert not model.transformer.wpe.weight.requires_grad
    assert stats["grams"]["transformer.h.0.attn.c_attn.weight"].shape == (16, 16)


def test_bad_options_and_batches() -> None:
    model = linear_classifier()
    inputs = [x for x, _ in labelled_batches()]
    with pytest.raises(AceMergeError, match="unknown statistic 'hessians'"):
        collect_statistics(model, inputs, ("hessians",))
    with pytest.raises(AceMergeError, match="fisher_labels"):
        collect_statistics(model, inputs, ("fishers",), fisher_labels="gold")
    with pytest.raises(AceMergeError, match="needs labels"):
        collect_statistics(model, inputs, ("fishers",), fisher_labels="true")
    lm = torch.nn.Sequential(torch.nn.Linear(3, 4)).double()
    with pytest.raises(AceMergeError, match="one prediction per example"):
        collect_statistics(lm, [torch.randn(2, 5, 3, dtype=torch.float64)], ("fishers",),
                           fisher_labels="expected")
