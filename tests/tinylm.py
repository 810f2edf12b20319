"""A tiny causal LM saved as a local Hugging Face directory, with a character-level tokenizer.

Used by the command-line tests (errors, determinism, report): ``actpat ... --model <dir>`` runs
in a second on CPU, with real tokenization of any text, offline.
"""

from __future__ import annotations

import string
from pathlib import Path

from tiny import VOCAB, tiny_model

CHARS = string.printable[:95]  # digits, letters, punctuation, space: one token each
SPECIAL = ["<unk>", "</s>"]


def char_tokenizer():
    """A fast tokenizer with one token per printable character (97 ids <= VOCAB)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   pad_token="</s>")


def save_tiny_lm(path: str | Path, arch: str = "llama", seed: int = 0,
                 context: int | None = None) -> str:
    """Write a tiny ``arch`` model and the char tokenizer to ``path``.

    The context is 128 tokens unless ``context`` is given (Llama-style rotary models run at any
    length, so a larger declared context lets lm-eval feed long character-level items).
    """
    path = Path(path)
    model = tiny_model(arch, seed)
    model.config.eos_token_id = model.config.pad_token_id = 1
    if context is not None:
        model.config.max_position_embeddings = context
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def save_not_causal_lm(path: str | Path) -> str:
    """A directory holding an encoder-decoder (T5) model: not a causal LM."""
    import transformers as tf

    path = Path(path)
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    tf.T5ForConditionalGeneration(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


REMOTE_CONFIG = '''from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "actpat_remote_test"
'''

REMOTE_MODELING = '''import os

from transformers import LlamaForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    """A Llama whose construction leaves a mark: proof that this file's code ran."""

    config_class = RemoteConfig

    def __init__(self, config):
        super().__init__(config)
        marker = os.environ.get("ACTPAT_TEST_REMOTE_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write("remote code ran\\n")
'''


def save_remote_code_lm(path: str | Path) -> str:
    """A tiny Llama directory whose config names its own modeling code (``auto_map``) and an
    unknown model type: transformers loads it only with ``trust_remote_code``, offline."""
    import json

    path = Path(save_tiny_lm(path))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="actpat_remote_test", architectures=["RemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                         "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (path / "modeling_remote.py").write_text(REMOTE_MODELING)
    return str(path)
