"""Architecture adapters, model loading and the GGUF cache."""

import json
from pathlib import Path

import pytest
import torch

from actpat.errors import UserError
from actpat.models.architectures import scored_matrices
from actpat.models.loading import load_model
from actpat.activation.profiling import Profile, compute_profile
from helpers import LM
from reference import decoder_layer_list, linear_modules
from tiny import ARCHS, tiny_model

EXPECTED = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "mistral": ["q", "k", "v", "o", "gate", "up", "down"],
    "qwen2": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma3_text": ["q", "k", "v", "o", "gate", "up", "down"],
    "gpt2": ["qkv", "o", "up", "down"],
    "gpt_neox": ["qkv", "o", "up", "down"],
    "opt": ["q", "k", "v", "o", "up", "down"],
    "phi3": ["qkv", "o", "gate_up", "down"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_every_linear_matrix_of_each_layer(arch):
    model = tiny_model(arch)
    mats = scored_matrices(model)
    n_layers = model.config.num_hidden_layers
    assert [m.matrix for m in mats] == EXPECTED[arch] * n_layers
    assert [m.layer for m in mats] == sorted(m.layer for m in mats)
    params = dict(model.named_parameters())
    mods = linear_modules(model)  # found without the adapter
    assert {m.name for m in mats} == set(mods)
    g = torch.Generator().manual_seed(0)
    for m in mats:
        assert params[f"{m.name}.weight"] is m.module.weight
        assert mods[m.name][:2] == (m.layer, m.matrix)
        # m.weight is (out, in) whatever the storage: the module computes x @ W^T + b
        x = torch.randn(3, m.weight.shape[1], generator=g)
        bias = getattr(m.module, "bias", None)
        want = x @ m.weight.t() + (0 if bias is None else bias)
        with torch.no_grad():
            assert torch.allclose(m.module(x), want, atol=1e-6), m.name
        assert m.transposed == (arch == "gpt2")  # only GPT-2's Conv1D stores (in, out)
        if m.transposed:
            assert m.weight.shape == m.module.weight.shape[::-1]
    # every non-embedding 2-D weight inside the decoder layers is scored (nothing forgotten)
    scored = {f"{m.name}.weight" for m in mats}
    layer_prefix = decoder_layer_list(model)[0] + "."
    matrices_in_layers = {n for n, p in params.items()
                          if n.startswith(layer_prefix) and p.dim() == 2}
    assert matrices_in_layers == scored


@pytest.mark.parametrize("arch", ARCHS)
def test_profile_keys_and_shapes_match_the_model(arch, tmp_path):
    model = tiny_model(arch)
    seqs = [[5, 6, 7, 8], [9, 10, 11]]
    prof = compute_profile(LM(model), seqs, batch_size=2, progress=False)
    prof.save(tmp_path)
    back = Profile.load(tmp_path)
    weights = {name: m.weight for name, (_, _, m) in linear_modules(model).items()}
    assert set(back.maps) == set(weights)
    for name, w in weights.items():
        assert back.maps[name].shape == w.shape
        assert torch.equal(back.maps[name], prof.maps[name])
    assert back.num_layers == model.config.num_hidden_layers


def test_unknown_architecture_is_named():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       is_decoder=True))
    with pytest.raises(UserError, match="unsupported architecture 'bert'"):
        scored_matrices(model)


def test_unknown_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a directory, a .gguf file or a hub id"):
        load_model(str(tmp_path / "nope"))


@pytest.mark.slow
def test_gguf_cache_reload_matches_the_dequantised_gguf(smollm2, smollm2_gguf):
    """The cached float32 copy gives the same logits as a fresh GGUF load (tied head, rotary)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.identity["path"]
    assert path == str(smollm2_gguf)
    # the copy was made in this session's temporary cache, not read from the user's
    cached = Path(smollm2.model.config._name_or_path)
    assert cached.resolve().is_relative_to(Path(os.environ["ACTPAT_CACHE_DIR"]).resolve())
    # found without the adapter: 30 layers x 7 linear matrices, all scored
    assert {m.name for m in scored_matrices(smollm2.model)} == set(linear_modules(smollm2.model))
    assert len(linear_modules(smollm2.model)) == 30 * 7
    directory, name = os.path.split(path)
    fresh = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    fresh_tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    text = "Hello world! The quick brown fox jumps over the lazy dog."
    ids = smollm2.tokenizer(text)["input_ids"]
    assert ids == fresh_tok(text)["input_ids"]
    assert smollm2.tokenizer.pad_token_id == smollm2.tokenizer.eos_token_id
    with torch.no_grad():
        a = smollm2.model(torch.tensor([ids])).logits
        b = fresh(torch.tensor([ids])).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    m = smollm2.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    cached = Path(m.config._name_or_path)
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
