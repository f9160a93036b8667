#!/usr/bin/env python3
"""Write a tiny random-weight llama GGUF for llama.cpp's ``llama-server``, deterministically.

The tokenizer is copied from the vocab-only ``models/ggml-vocab-llama-spm.gguf`` that llama.cpp
ships (the same tree ``llama-server`` is built from); the weights are seeded random numbers written
with that tree's ``gguf-py`` (put it on ``PYTHONPATH``). Same arguments, same bytes.

    PYTHONPATH=<llama.cpp>/gguf-py python tools/make_tiny_gguf.py --vocab <llama.cpp>/models/ggml-vocab-llama-spm.gguf \
        --out .engines/models/tiny-llama.gguf [--hidden 64 --layers 2 --heads 4 --kv-heads 2 --ff 128 --ctx 4096]

The defaults make a ~9 MB model that llama-server loads in well under a second on a CPU. The GPU
validation uses wider settings to make an engine whose weights and KV cache take real GPU memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SEED = 20261130
# chatml, the template llama-server falls back to for models without one; written explicitly so the
# prompt the tests see does not depend on that fallback.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", required=True, type=Path, help="llama.cpp's models/ggml-vocab-llama-spm.gguf")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ff", type=int, default=128)
    p.add_argument("--ctx", type=int, default=4096, help="the model's training context (llama-server's default -c)")
    p.add_argument("--f16", action="store_true", help="store the matrices as F16 (half the size)")
    args = p.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads")

    import gguf  # from the llama.cpp tree's gguf-py, on PYTHONPATH
    import numpy as np

    reader = gguf.GGUFReader(str(args.vocab))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    n_vocab = len(tokens)
    head_dim = args.hidden // args.heads

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("supervisord-llm tiny llama")
    writer.add_context_length(args.ctx)
    writer.add_embedding_length(args.hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ff)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.f16 else gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model(fields["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"].contents())
    writer.add_token_list(tokens)
    writer.add_token_scores(fields["tokenizer.ggml.scores"].contents())
    writer.add_token_types(fields["tokenizer.ggml.token_type"].contents())
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"].contents())
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"].contents())
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"].contents())
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"].contents())
    writer.add_add_eos_token(fields["tokenizer.ggml.add_eos_token"].contents())
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(SEED)
    matrix_dtype = np.float16 if args.f16 else np.float32

    def matrix(rows: int, cols: int) -> object:
        # ggml's ne order is (cols, rows); numpy's shape is (rows, cols).
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(matrix_dtype)

    def norm(n: int) -> object:
        return np.ones(n, dtype=np.float32)

    kv_dim = args.kv_heads * head_dim
    writer.add_tensor("token_embd.weight", matrix(n_vocab, args.hidden))
    for i in range(args.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm(args.hidden))
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(args.hidden, args.hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_dim, args.hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_dim, args.hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(args.hidden, args.hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm(args.hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(args.ff, args.hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(args.ff, args.hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(args.hidden, args.ff))
    writer.add_tensor("output_norm.weight", norm(args.hidden))
    writer.add_tensor("output.weight", matrix(n_vocab, args.hidden))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
