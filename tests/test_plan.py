"""The plan: module kinds from the architecture, exclusion profiles, user overrides."""

from __future__ import annotations

import torch
import transformers

from acemerge.plan import Treatment, build_plan


def llama_specs():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=100, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    specs = [(n, tuple(p.shape), p.dtype) for n, p in model.state_dict().items()]
    return specs, config.to_dict()


def by_name(plan):
    return {e.name: e for e in plan.entries}


def test_llama_profile_excludes_vocabulary_matrices():
    specs, config = llama_specs()
    plan = by_name(build_plan(specs, config=config))
    assert plan["model.embed_tokens.weight"].treatment is Treatment.KEEP
    assert plan["lm_head.weight"].treatment is Treatment.KEEP
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert q.treatment is Treatment.MATRIX and not q.transpose and "module" in q.reason
    assert plan["model.layers.0.input_layernorm.weight"].treatment is Treatment.OTHER


def test_user_excludes_add_to_defaults_and_defaults_can_be_dropped():
    specs, config = llama_specs()
    plan = by_name(build_plan(specs, config=config, exclude=[r"mlp\."], default_excludes=False))
    assert plan["model.layers.0.mlp.up_proj.weight"].treatment is Treatment.KEEP
    assert plan["lm_head.weight"].treatment is Treatment.MATRIX
    assert plan["model.embed_tokens.weight"].treatment is Treatment.OTHER  # an Embedding


def test_without_config_names_and_shapes_decide():
    specs = [("enc.fc.weight", (4, 3), torch.float32), ("enc.fc.bias", (4,), torch.float32),
             ("tok_embed.weight", (10, 3), torch.float32), ("steps", (1,), torch.int64),
             ("classifier.weight", (2, 3), torch.float32)]
    plan = by_name(build_plan(specs))
    assert plan["enc.fc.weight"].treatment is Treatment.MATRIX
    assert plan["enc.fc.bias"].treatment is Treatment.OTHER
    assert plan["tok_embed.weight"].treatment is Treatment.OTHER
    assert plan["steps"].treatment is Treatment.KEEP
    assert plan["classifier.weight"].treatment is Treatment.KEEP  # generic head exclusion


def test_checkpoint_without_model_prefix_still_finds_conv1d():
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10,
                                     n_positions=4, architectures=["GPT2LMHeadModel"])
    specs = [("h.0.attn.c_attn.weight", (8, 24), torch.float32)]  # the hub's gpt2 layout
    (entry,) = build_plan(specs, config=config.to_dict()).entries
    assert entry.treatment is Treatment.MATRIX and entry.transpose
