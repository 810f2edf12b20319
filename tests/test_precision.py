"""Reduced-precision models compute with float32 sums where sums are formed."""

from __future__ import annotations

import torch

from tiny import tiny_model


def test_zero_shot_log_likelihoods_are_float32_in_a_bfloat16_model():
    """lm-eval sums choice log-likelihoods in the logits' dtype: they must leave the model as
    float32 even when it computes in bfloat16."""
    from actpat.evaluation.evaluate import float32_logits

    model = tiny_model("llama").to(torch.bfloat16).eval()
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert model(input_ids=x).logits.dtype == torch.bfloat16
        with float32_logits(model):
            inside = model(input_ids=x).logits
        assert inside.dtype == torch.float32
        assert model(input_ids=x).logits.dtype == torch.bfloat16  # the hook is gone afterwards


def _bf16_checkpoint(path):
    """A tiny Llama stored in bfloat16, with the char tokenizer."""
    from tinylm import char_tokenizer

    model = tiny_model("llama").to(torch.bfloat16)
    model.config.eos_token_id = model.config.pad_token_id = 1
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def _weights(directory):
    from safetensors.torch import load_file
    from pathlib import Path

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_pruned_checkpoint_keeps_its_own_dtype(tmp_path):
    """A bfloat16 checkpoint pruned in float32 is saved in bfloat16 (in memory and streamed):
    the kept weights are the original bf16 values bit for bit, the pruned ones exact zeros, and
    the mask is the float32 magnitude mask. --save-dtype float32 keeps float32."""
    import json

    from actpat.models.loading import load_model, stored_dtype
    from helpers import run

    src = _bf16_checkpoint(tmp_path / "bf16")
    assert stored_dtype(src) == "bfloat16"
    original = _weights(src)
    base = ["prune", "--model", src, "--sparsity", "0.5", "--pruner", "magnitude",
            "--dtype", "float32", "--quiet", "--device", "cpu"]
    run(*base, "--save", str(tmp_path / "mem"))
    run(*base, "--save", str(tmp_path / "stream"), "--stream-layers")
    run(*base, "--save", str(tmp_path / "f32"), "--save-dtype", "float32")
    mem, streamed, f32 = (_weights(tmp_path / d) for d in ("mem", "stream", "f32"))
    scored = [k for k in original if k.endswith("proj.weight")]
    assert scored
    for k in scored:
        w = original[k]
        assert mem[k].dtype == streamed[k].dtype == torch.bfloat16 and f32[k].dtype == torch.float32
        kept = mem[k] != 0
        assert torch.equal(mem[k][kept], w[kept])  # bit-identical kept weights
        assert torch.equal(mem[k], streamed[k]) and torch.equal(f32[k], mem[k].float())
        # the float32 magnitude mask: the larger half of |w| in each matrix is kept
        a = w.float().abs().flatten()
        assert kept.sum() == a.numel() - a.numel() // 2
        assert a[kept.flatten()].min() >= a[~kept.flatten()].max()
    for d, dt in (("mem", "bfloat16"), ("stream", "bfloat16"), ("f32", "float32")):
        assert json.loads((tmp_path / d / "actpat_prune.json").read_text())["saved_dtype"] == dt
        assert json.loads((tmp_path / d / "actpat_prune.json").read_text())["dtype"] == "float32"
        assert stored_dtype(str(tmp_path / d)) == dt
    assert next(load_model(str(tmp_path / "mem"), dtype="bfloat16").model.parameters()).dtype \
        == torch.bfloat16


def test_cast_checkpoint_stores_tied_embeddings_once(tmp_path):
    """Saving in another dtype keeps tied embeddings tied: one tensor on disk, and the reloaded
    model's logits are those of the model cast to that dtype."""
    import transformers as tf
    from safetensors.torch import load_file

    from actpat.sparsity.saving import save_pruned

    cfg = tf.LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48, num_key_value_heads=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    save_pruned(model, None, tmp_path, {}, "bfloat16")
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert next(model.parameters()).dtype == torch.float32  # the model in memory is untouched
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(again(x).logits, model.to(torch.bfloat16)(x).logits)
