"""Tiny randomly initialised causal LMs built from configs, for fast unit tests only."""

import torch
import transformers as tf

VOCAB = 101


def _configs():
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=128)
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(common, num_key_value_heads=2)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(common, num_key_value_heads=2)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(common, num_key_value_heads=2)),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                        dict(common, num_key_value_heads=2, head_dim=8, sliding_window=16)),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                      bos_token_id=0, eos_token_id=0)),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(common)),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM,
                dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     ffn_dim=48, max_position_embeddings=128, word_embed_proj_dim=32)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,
                 dict(common, num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                      eos_token_id=0)),
    }


ARCHS = list(_configs())


def tiny_model(arch: str, seed: int = 0):
    cfg_cls, model_cls, kwargs = _configs()[arch]
    torch.manual_seed(seed)
    config = cfg_cls(**kwargs)
    model = model_cls(config).eval()
    return model
