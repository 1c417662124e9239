"""Flax decoder models (GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 3 text) with LM / value / score heads, a KV
cache and HF checkpoint loading and saving.

    model, params = from_pretrained("/path/to/hf_dir")           # config.json + safetensors
    logits = model.apply(params, input_ids, attention_mask)      # [B, T, V] float32
    save_pretrained(model, params, "/path/to/out")               # loadable by transformers
"""

from jrlhf.models.checkpoint import from_pretrained, hf_state_dict, read_hf_config, save_pretrained
from jrlhf.models.config import FAMILIES, HEADS, ModelConfig, tiny_config
from jrlhf.models.logprobs import (logits_from_hidden, model_token_logprobs, selected_token_logprobs,
                                   token_entropy_from_hidden,
                                   token_logprobs_from_hidden, token_logprobs_from_logits, unembedding_matrix)
from jrlhf.models.transformer import (CausalLM, KVCache, ScalarHeadModel, abstract_params, build_model, init_cache,
                                      init_model, logical_axes, sequence_scores)
from jrlhf.models.weights import FAMILY_WEIGHTS, WeightRule

__all__ = [
    "FAMILIES", "HEADS", "FAMILY_WEIGHTS", "WeightRule", "ModelConfig", "tiny_config",
    "CausalLM", "ScalarHeadModel", "KVCache", "build_model", "init_model", "init_cache", "abstract_params",
    "logical_axes", "sequence_scores",
    "from_pretrained", "save_pretrained", "hf_state_dict", "read_hf_config",
    "token_entropy_from_hidden", "token_logprobs_from_hidden", "token_logprobs_from_logits", "model_token_logprobs",
    "unembedding_matrix", "logits_from_hidden", "selected_token_logprobs",
]
