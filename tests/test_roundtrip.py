"""Round trips through real transformers models (GPT-2 Conv1D, BERT Linear) and file formats."""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import acemerge
from acemerge.api import merge_from_config
from acemerge.io.readers import StateDictCheckpoint, open_checkpoint
from acemerge.mergekit_schema import load_any_config as load_config
from acemerge.methods import get
from tests.conftest import N_EXPERTS, save_family, tiny_gpt2_config


def load_all(folder) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {name: ckpt.get(name) for name in ckpt.specs()}


def expected_param(name, base, experts, transpose=False, **params):
    """base + ACE of the (oriented) task vectors, computed without the engine."""
    tvs = [e[name] - base[name] for e in experts]
    if transpose:
        return base[name] + get("ace")([t.T for t in tvs], **params).T
    return base[name] + get("ace")(tvs, **params)


def test_gpt2_conv1d_weights_are_transposed_and_model_loads(gpt2_family, tmp_path):
    base_dir, expert_dirs = gpt2_family
    acemerge.merge(base_dir, expert_dirs, tmp_path / "out")
    merged = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out")
    assert transformers.AutoModel.from_pretrained(tmp_path / "out") is not None
    base, experts = load_all(base_dir), [load_all(d) for d in expert_dirs]
    state = merged.state_dict()
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert state[name].shape == base[name].shape
        torch.testing.assert_close(state[name], expected_param(name, base, experts, True))
        wrong = expected_param(name, base, experts, transpose=False)
        assert not torch.allclose(state[name], wrong, atol=1e-6)
    torch.testing.assert_close(state["score.weight"], base["score.weight"])  # excluded head
    for name in ("transformer.h.0.ln_1.weight", "transformer.wte.weight"):  # mean
        mean = torch.stack([e[name] - base[name] for e in experts]).mean(0)
        torch.testing.assert_close(state[name], base[name] + mean)


def test_conv1d_as_stored_reproduces_authors_orientation(gpt2_family, tmp_path):
    base_dir, expert_dirs = gpt2_family
    acemerge.merge(base_dir, expert_dirs, tmp_path / "out", conv1d_as_stored=True)
    state = load_all(tmp_path / "out")
    base, experts = load_all(base_dir), [load_all(d) for d in expert_dirs]
    name = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(state[name], expected_param(name, base, experts, False))


def test_bert_linear_weights_and_authors_exclusions(bert_family, tmp_path):
    base_dir, expert_dirs = bert_family
    acemerge.merge(base_dir, expert_dirs, tmp_path / "out", eps="roberta-base")
    state = transformers.BertModel.from_pretrained(tmp_path / "out").state_dict()
    base, experts = load_all(base_dir), [load_all(d) for d in expert_dirs]
    for name in ("encoder.layer.0.attention.self.query.weight", "pooler.dense.weight"):
        torch.testing.assert_close(state[name], expected_param(name, base, experts, eps=2e-4))
    for name in ("encoder.layer.0.attention.self.query.bias",
                 "encoder.layer.1.output.LayerNorm.weight",
                 "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(state[name], base[name])


def test_pickled_bin_experts_give_the_same_merge(tmp_path, gpt2_family):
    base_dir, expert_dirs = save_family(tmp_path / "bin", transformers.GPT2Model,
                                        tiny_gpt2_config(), safe=False)
    assert (base_dir / "pytorch_model.bin").is_file()
    acemerge.merge(base_dir, expert_dirs, tmp_path / "from-bin")
    safe_dirs = save_family(tmp_path / "safe", transformers.GPT2Model, tiny_gpt2_config())
    acemerge.merge(safe_dirs[0], safe_dirs[1], tmp_path / "from-safe")
    a, b = load_all(tmp_path / "from-bin"), load_all(tmp_path / "from-safe")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_sharded_output_loads_and_equals_single_file(gpt2_family, tmp_path):
    base_dir, expert_dirs = gpt2_family
    cfg = acemerge.config.build_config(base_model=str(base_dir),
                                       models=[str(p) for p in expert_dirs])
    merge_from_config(cfg, tmp_path / "single")
    merge_from_config(cfg, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    for shard in shards:  # each shard is a valid safetensors file for the library
        with safe_open(tmp_path / "sharded" / shard, framework="pt") as handle:
            assert set(handle.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    single = load_file(tmp_path / "single" / "model.safetensors")
    sharded = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "sharded")
    for name, tensor in sharded.state_dict().items():
        if name in single:
            assert torch.equal(tensor, single[name])


def test_output_dtype_card_and_config_rerun(gpt2_family, tmp_path):
    base_dir, expert_dirs = gpt2_family
    base_copy = tmp_path / "base"
    shutil.copytree(base_dir, base_copy)
    (base_copy / "tokenizer.json").write_text('{"fake": true}')
    acemerge.merge(base_copy, expert_dirs, tmp_path / "out", dtype="bfloat16", tau=0.5)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("transformer.h.0.attn.c_attn.weight").dtype == torch.bfloat16
    card = (out / "README.md").read_text()
    assert "ace" in card and "tau: 0.5" in card and acemerge.__version__ in card
    assert str(expert_dirs[2]) in card
    saved = yaml.safe_load((out / "acemerge_config.yaml").read_text())
    assert saved["merge_method"] == "ace" and saved["parameters"] == {"tau": 0.5}
    merge_from_config(load_config(out / "acemerge_config.yaml"), tmp_path / "rerun")
    first, second = load_all(out), load_all(tmp_path / "rerun")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_merge_state_dicts_treats_2d_as_linear_and_rest_as_mean():
    gen = torch.Generator().manual_seed(1)
    base = {"lin.weight": torch.randn(8, 5, generator=gen),
            "lin.bias": torch.randn(8, generator=gen)}
    experts = [{k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for i in range(3)]
    merged = acemerge.merge_state_dicts(base, experts, tau=0.1)
    torch.testing.assert_close(merged["lin.weight"], expected_param("lin.weight", base, experts,
                                                                    tau=0.1))
    mean = torch.stack([e["lin.bias"] - base["lin.bias"] for e in experts]).mean(0)
    torch.testing.assert_close(merged["lin.bias"], base["lin.bias"] + mean)
    scaled = acemerge.merge_state_dicts(base, experts, method="average", scale=0.5)
    torch.testing.assert_close(scaled["lin.bias"], base["lin.bias"] + 0.5 * mean)


def test_identical_expert_to_base_gives_finite_weights():
    base = {"w.weight": torch.randn(6, 4), "w.bias": torch.randn(6)}
    experts = [dict(base), {k: v + 0.1 for k, v in base.items()}]
    merged = acemerge.merge_state_dicts(base, experts)
    assert all(torch.isfinite(t).all() for t in merged.values())


class CountingCheckpoint(StateDictCheckpoint):
    """Counts how many tensors it handed out are alive at once."""

    alive = 0
    peak = 0

    def _load(self, name):
        tensor = self.tensors[name].clone()
        type(self).alive += 1
        type(self).peak = max(type(self).peak, type(self).alive)
        weakref.finalize(tensor, self._release)
        return tensor

    @classmethod
    def _release(cls):
        cls.alive -= 1


def test_engine_streams_one_parameter_at_a_time():
    from acemerge.engine import merge_stream
    from acemerge.plan import build_plan

    params = {f"layer{i}.weight": torch.randn(6, 6) for i in range(20)}
    base = CountingCheckpoint(params)
    experts = [CountingCheckpoint({k: v + 0.1 * torch.randn(6, 6) for k, v in params.items()})
               for _ in range(N_EXPERTS)]
    plan = build_plan([(k, tuple(v.shape), v.dtype) for k, v in params.items()])
    method = get("ace")
    merge_stream(base, experts, method, method.validate({}), plan, lambda name, t: None)
    # one parameter of the base and of each expert, plus the next base tensor being read
    assert CountingCheckpoint.peak <= N_EXPERTS + 2


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(acemerge.AceMergeError, match="some-org/some-model"):
        open_checkpoint("some-org/some-model")
