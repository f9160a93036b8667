"""The embedded default model: a tiny random-weight llama with a real BPE tokenizer.

Made locally and deterministically (fixed seed, fixed corpus), no download. It runs in a separate
Python process (``python -m supervisord_llm.tinymodel DIR``) so the daemon never imports numpy,
tokenizers or mlx; it needs the ``mlx`` extra's dependencies (numpy, tokenizers, safetensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = ".supervisord-llm-tiny-model"
VERSION = "2"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world, this is a tiny model for supervising local inference servers.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?;:'\"()[]{}<>-_=+/*&^%$#@~`|\\",
    "<think> reasoning </think> user assistant system",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def is_complete(directory: Path) -> bool:
    marker = directory / MARKER
    return marker.is_file() and marker.read_text().strip() == VERSION


def make_tiny_model(directory: Path) -> Path:
    """Write the tiny model into ``directory`` (idempotent) and return it."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    if is_complete(directory):
        return directory
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Only the (ASCII) bytes of the corpus are in the vocabulary: every token the random weights pick
    # decodes to complete text, so a streaming server sends one chunk per token instead of holding
    # back partial UTF-8 sequences, and token rates can be measured from the stream.
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": _CHAT_TEMPLATE,
        "model_max_length": 4096,
    }))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        # An eos id outside the vocabulary: random weights never stop early, so max_tokens
        # always decides the length and token rates are comparable between runs.
        "eos_token_id": vocab + 7,
    }))
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        weights[p + "self_attn.q_proj.weight"] = w(HEADS * head_dim, HIDDEN)
        weights[p + "self_attn.k_proj.weight"] = w(KV_HEADS * head_dim, HIDDEN)
        weights[p + "self_attn.v_proj.weight"] = w(KV_HEADS * head_dim, HIDDEN)
        weights[p + "self_attn.o_proj.weight"] = w(HIDDEN, HEADS * head_dim)
        weights[p + "mlp.gate_proj.weight"] = w(INTERMEDIATE, HIDDEN)
        weights[p + "mlp.up_proj.weight"] = w(INTERMEDIATE, HIDDEN)
        weights[p + "mlp.down_proj.weight"] = w(HIDDEN, INTERMEDIATE)
        weights[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        weights[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    # The output head makes greedy decoding walk a fixed cycle of word tokens ("Ġword": a leading
    # space), whatever the prompt: the hidden state is dominated by the current token's embedding, so
    # row j of the head is the embedding of the token that should precede j. Each word token flushes
    # the streaming detokenizer, so the server streams one chunk per token, like a real model.
    embed = weights["model.embed_tokens.weight"]
    vocab_map = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab_map.items() if t.startswith("\u0120") and len(t) > 1 and t[1:].strip())
    head = np.zeros_like(embed)
    for k, token in enumerate(words):
        head[words[(k + 1) % len(words)]] += embed[token]
    others = [i for i in range(vocab) if i not in set(words)]
    head[words[0]] += embed[others].sum(axis=0) / max(1, len(others)) ** 0.5
    weights["lm_head.weight"] = head * 4.0
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "mlx"})
    (directory / MARKER).write_text(VERSION)
    return directory


if __name__ == "__main__":
    print(make_tiny_model(Path(sys.argv[1])))
