"""Parity of jrlhf.models with the transformers PyTorch models: load, forward, export, reload, per family."""

import json
import os

import numpy as np
import pytest

import transformers

try:
    import torch
except ImportError:  # the `test` extra; the tests marked `torch` skip without it
    torch = None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jrlhf.models import (FAMILIES, ModelConfig, from_pretrained, save_pretrained, sequence_scores,  # noqa: E402
                          tiny_config)

VOCAB = 96
PAD = 0


def torch_config(family, **overrides):
    """A tiny transformers config; initializer_range 0.2 so that logits are far from uniform."""
    common = dict(vocab_size=VOCAB, initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gemma3_text":  # head_dim (16) independent of the width; a sliding and a global layer
        common = dict(dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=3,
                           layer_types=["sliding_attention", "full_attention"]), **common)
        common["rope_parameters"] = dict(
            {"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}, **common.get("rope_parameters", {}))
    if family == "qwen3":
        common = dict(dict(head_dim=16), **common)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig, "gemma3_text": transformers.Gemma3TextConfig}[family]
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **common)


def randomize_norms(model, seed=0):
    """Norm weights of a fresh transformers model are constant (1, or 0 for Gemma's ``1 + w``): random ones make a
    swapped or missing norm visible in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) + (0.0 if "gemma" in type(model).__name__.lower()
                                                                     else 1.0))
    return model


def left_padded_batch():
    """ids/mask ``[3, 10]`` left-padded (3, 6 and 0 pads) with HF-style positions ``cumsum(mask) - 1``."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[0, :3] = 0
    mask[1, :6] = 0
    ids[mask == 0] = PAD
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return ids, mask, positions


def torch_forward(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


def make_torch_model(config, auto_cls, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(auto_cls.from_config(config, attn_implementation="eager").eval(), seed)


CAUSAL_CASES = {
    "gpt2": ("gpt2", {}),
    "llama_gqa": ("llama", {}),
    "llama3_rope_scaling_tied": ("llama", dict(
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "qwen2": ("qwen2", {}),
    "mistral_sliding_window": ("mistral", dict(sliding_window=4)),
    "qwen2_sliding_window_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3_untied": ("qwen3", {}),
    "qwen3_tied_sliding_window_layers": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=True,
                                                       sliding_window=3, max_window_layers=1)),
    "gemma3_text_local_global": ("gemma3_text", {}),
    "gemma3_text_linear_rope_scaling_global": ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}})),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_causal_lm_parity_and_export(case, tmp_path):
    family, overrides = CAUSAL_CASES[case]
    torch_model = make_torch_model(torch_config(family, **overrides), transformers.AutoModelForCausalLM)
    torch_model.save_pretrained(tmp_path / "hf")
    ids, mask, positions = left_padded_batch()
    reference = torch_forward(torch_model, ids, mask, positions)
    real = mask.astype(bool)

    model, params = from_pretrained(str(tmp_path / "hf"))
    assert model.config.family == family
    logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(mask)))
    assert logits.dtype == np.float32 and logits.shape == (3, 10, VOCAB)
    assert np.abs(reference[real]).max() > 1.0  # informative logits
    np.testing.assert_allclose(logits[real], reference[real], atol=1e-4, rtol=0)

    # the feature under test changes the output (so this test could fail)
    if case == "llama3_rope_scaling_tied":
        assert model.config.rope_type == "llama3"
        plain = model.clone(config=model.config.replace(rope_scaling=()))
        assert np.abs(np.asarray(plain.apply(params, ids, mask))[real] - reference[real]).max() > 1e-2
    if case.startswith("gemma3_text"):
        assert model.config.tie_word_embeddings and model.config.embed_scale and model.config.sandwich_norm
        local = model.clone(config=model.config.replace(rope_local_theta=model.config.rope_theta))
        assert np.abs(np.asarray(local.apply(params, ids, mask))[real] - reference[real]).max() > 1e-2
        scalar = model.clone(config=model.config.replace(query_pre_attn_scalar=None))
        assert np.abs(np.asarray(scalar.apply(params, ids, mask))[real] - reference[real]).max() > 1e-2
    if case == "gemma3_text_linear_rope_scaling_global":
        assert model.config.rope_type == "linear"
        plain = model.clone(config=model.config.replace(rope_scaling=()))
        assert np.abs(np.asarray(plain.apply(params, ids, mask))[real] - reference[real]).max() > 1e-2
    if "sliding" in case or case.startswith("gemma3_text"):
        assert any(model.config.window_layers)
        full = model.clone(config=model.config.replace(sliding_window=None, sliding_window_layers=None))
        assert np.abs(np.asarray(full.apply(params, ids, mask))[real] - reference[real]).max() > 1e-3

    save_pretrained(model, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                                 attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    np.testing.assert_allclose(torch_forward(reloaded, ids, mask, positions)[real], reference[real], atol=1e-4,
                               rtol=0)
    # config round trip keeps the architecture
    assert ModelConfig.from_hf_dict(json.load(open(tmp_path / "out" / "config.json"))) == model.config


@pytest.mark.torch
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_classification_score_parity(family, tmp_path):
    config = torch_config(family, num_labels=1)
    torch_model = make_torch_model(config, transformers.AutoModelForSequenceClassification, seed=1)
    torch_model.save_pretrained(tmp_path / "hf")
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        reference = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                position_ids=torch.tensor(positions)).logits[:, 0].numpy()

    model, params = from_pretrained(str(tmp_path / "hf"), head="score")
    values = model.apply(params, jnp.asarray(ids), jnp.asarray(mask))
    assert values.shape == (3, 10) and values.dtype == jnp.float32
    scores = np.asarray(sequence_scores(values, jnp.asarray(mask)))
    np.testing.assert_allclose(scores, reference, atol=1e-4, rtol=0)

    save_pretrained(model, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager").eval()
    assert reloaded.config.num_labels == 1
    with torch.no_grad():
        again = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits[:, 0].numpy()
    np.testing.assert_allclose(again, reference, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_torch_model(torch_config("llama"), transformers.AutoModelForCausalLM).save_pretrained(path)
    return path


def _rewrite_weights(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    return config


@pytest.mark.torch
def test_missing_tensor_is_an_error(llama_dir, tmp_path):
    config = _rewrite_weights(llama_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 32\)"):
        from_pretrained(str(tmp_path))


@pytest.mark.torch
def test_mismatched_tensor_names_both_shapes(llama_dir, tmp_path):
    config = _rewrite_weights(llama_dir, tmp_path, lambda t: None)
    config["intermediate_size"] = 48
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*\(64, 32\).*\(48, 32\)"):
        from_pretrained(str(tmp_path))


@pytest.mark.torch
def test_unexpected_tensors_are_an_error(llama_dir, tmp_path):
    config = _rewrite_weights(llama_dir, tmp_path, lambda t: None)
    config["num_hidden_layers"] = 1
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"does not use.*model\.layers\.1\."):
        from_pretrained(str(tmp_path))
    model, _ = from_pretrained(str(tmp_path), strict=False)
    assert model.config.num_layers == 1


@pytest.mark.torch
def test_scalar_head_needs_checkpoint_weight_or_rng(llama_dir):
    with pytest.raises(ValueError, match="score.weight.*head_rng"):
        from_pretrained(str(llama_dir), head="value")
    model, params = from_pretrained(str(llama_dir), head="lm+value", head_rng=jax.random.key(0))
    logits, values = model.apply(params, jnp.ones((1, 4), jnp.int32))
    assert logits.shape == (1, 4, VOCAB) and values.shape == (1, 4)
    assert float(jnp.abs(params["params"]["score"]).max()) > 0


@pytest.mark.torch
def test_sharded_safetensors_and_torch_bin(llama_dir, tmp_path):
    model, params = from_pretrained(str(llama_dir))
    save_pretrained(model, params, str(tmp_path / "sharded"), max_shard_size=20_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _, sharded = from_pretrained(str(tmp_path / "sharded"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).eval()

    os.makedirs(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((llama_dir / "config.json").read_text())
    _, from_bin = from_pretrained(str(tmp_path / "bin"))
    for other in (sharded, from_bin):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               params, other)


@pytest.mark.torch
def test_bf16_checkpoint_loads_into_fp32_params(llama_dir, tmp_path):
    model, params = from_pretrained(str(llama_dir))
    save_pretrained(model, params, str(tmp_path), dtype=jnp.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    model16, params16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert params16["params"]["embed"]["embedding"].dtype == jnp.float32
    ids = jnp.arange(1, 9)[None]
    ref = model.apply(params, ids)
    out = model16.apply(params16, ids)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.15 * float(jnp.abs(ref).max())


def test_unsupported_config_keys_are_named():
    base = torch_config("llama").to_dict()
    yarn = dict(base, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig.from_hf_dict(yarn)
    qwen = torch_config("qwen2", use_sliding_window=True, sliding_window=8).to_dict()
    qwen["layer_types"] = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_dict(qwen)
    gpt2 = dict(torch_config("gpt2").to_dict(), scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf_dict(gpt2)
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict(dict(base, model_type="falcon"))


def test_transformers_default_configs_are_read():
    """transformers 5 defaults: Mistral writes sliding_window=4096 (implemented), Qwen2 writes none."""
    mistral = ModelConfig.from_hf_dict(transformers.MistralConfig().to_dict())
    assert mistral.sliding_window == 4096 and all(mistral.window_layers)
    qwen = ModelConfig.from_hf_dict(transformers.Qwen2Config().to_dict())
    assert qwen.sliding_window is None and qwen.qkv_bias and not qwen.out_bias
    legacy = dict(transformers.LlamaConfig().to_dict(), rope_theta=5e5,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))
    legacy.pop("rope_parameters")
    config = ModelConfig.from_hf_dict(legacy)
    assert config.rope_theta == 5e5 and config.rope_type == "llama3"
    assert tiny_config("mistral").sliding_window is None
    qwen3 = ModelConfig.from_hf_dict(transformers.Qwen3Config().to_dict())
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128 and qwen3.sliding_window is None
    gemma = ModelConfig.from_hf_dict(transformers.Gemma3TextConfig().to_dict())
    assert gemma.window_layers == tuple((i + 1) % 6 != 0 for i in range(26)) and gemma.sliding_window == 4096
    assert (gemma.rope_theta, gemma.rope_local_theta, gemma.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
    assert gemma.activation == "gelu_pytorch_tanh" and gemma.tie_word_embeddings and gemma.norm_offset == 1.0
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        with pytest.raises(ValueError, match=key):
            ModelConfig.from_hf_dict(dict(transformers.Gemma3TextConfig().to_dict(), **{key: 30.0}))


@pytest.mark.torch
def test_lm_plus_value_model_exports_each_view(tmp_path):
    from jrlhf.models import init_model

    model, params = init_model(tiny_config("qwen2", pad_token_id=PAD, initializer_range=0.2), jax.random.key(0),
                               head="lm+value")
    ids = np.arange(3, 11)[None]
    logits, values = model.apply(params, jnp.asarray(ids))
    save_pretrained(model, params, str(tmp_path / "lm"), head="lm")
    causal = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(causal(torch.tensor(ids)).logits.numpy(), np.asarray(logits), atol=1e-4)
    save_pretrained(model, params, str(tmp_path / "value"), head="value")
    critic = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "value")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(critic(torch.tensor(ids)).logits[:, 0].numpy(), np.asarray(values[:, -1]),
                                   atol=1e-4)
    save_pretrained(model, params, str(tmp_path / "both"))
    _, again = from_pretrained(str(tmp_path / "both"), head="lm+value")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)
    with pytest.raises(ValueError, match="cannot export head='lm'"):
        value_model, value_params = init_model(tiny_config("qwen2"), jax.random.key(0), head="value")
        save_pretrained(value_model, value_params, str(tmp_path / "bad"), head="lm")


@pytest.mark.torch
def test_sharded_load_through_logical_axes(llama_dir):
    """Tensor-parallel (heads, kv_heads, mlp, vocab) x fsdp (embed) placement from the logical axis names."""
    import flax.linen as nn
    from jax.sharding import AxisType

    from jrlhf.models import logical_axes

    model, params = from_pretrained(str(llama_dir))
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    rules = (("embed", "fsdp"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"))
    shardings = nn.logical_to_mesh_sharding(logical_axes(model), mesh, rules)
    _, placed = from_pretrained(str(llama_dir), shardings=shardings)
    wq = placed["params"]["layers"]["attn"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model", None)
    ids, mask, _ = left_padded_batch()
    forward = jax.jit(model.apply)
    np.testing.assert_allclose(np.asarray(forward(placed, ids, mask)), np.asarray(forward(params, ids, mask)),
                               atol=1e-5)
