"""GGUF fixtures for the Rust tests (tests/fixtures/gguf/), from gguf-py.

Run as `python3 tools/make_gguf_fixtures.py`. It re-executes itself inside the
pinned reference venv (tools/refenv.py: gguf 0.19.0, numpy 2.4.6, safetensors
0.8.0), works offline, and rewrites these files byte for byte identically:

tiny.gguf            tests/fixtures/tiny (Qwen2, tied, f32) as llama.cpp's
                     converter would write it: qwen2.* hyper-parameters, the
                     tokenizer of tiny/tokenizer.json as tokenizer.ggml.*
                     (gpt2 model, qwen2 pre-tokenizer, added tokens as control /
                     user-defined, ids padded to vocab_size with [PADn] unused
                     tokens), its chat template, and the tensors under GGUF
                     names in a mix of F32, F16, BF16 and Q8_0 (TINY_TYPES).
tiny_dequant.safetensors
                     every tensor of tiny.gguf under its HF name, dequantised by
                     gguf-py's numpy reference and stored in the GGUF's own
                     float type (Q8_0 as F32): an HF checkpoint of exactly the
                     GGUF's values.
quants.gguf          one tensor per supported type (F32, F16, BF16, Q8_0, Q4_0,
                     Q5_0, Q4_K, Q5_K, Q6_K), 2-3 rows each; the quantised ones
                     are random bytes with finite random f16 scales (valid
                     blocks that exercise every bit of the layout).
quants.safetensors   their dequantisation by gguf-py (float32, same names).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refenv import ensure_venv  # noqa: E402

ensure_venv()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/fixtures/tiny"
OUT = ROOT / "tests/fixtures/gguf"

# GGUF names of a layer's tensors (after blk.N.) -> HF names (after model.layers.N.).
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Storage type of each tiny tensor: every type in both layers, at least one of each kind
# (matrix, bias, norm) quantised, and few F32 matrices to keep the fixtures small.
TINY_TYPES = {
    "token_embd.weight": T.BF16,
    "output_norm.weight": T.F32,
    "blk.0.attn_norm.weight": T.F32,
    "blk.0.attn_q.weight": T.Q8_0,
    "blk.0.attn_q.bias": T.F32,
    "blk.0.attn_k.weight": T.F16,
    "blk.0.attn_k.bias": T.F16,
    "blk.0.attn_v.weight": T.BF16,
    "blk.0.attn_v.bias": T.BF16,
    "blk.0.attn_output.weight": T.F32,
    "blk.0.ffn_norm.weight": T.BF16,
    "blk.0.ffn_gate.weight": T.Q8_0,
    "blk.0.ffn_up.weight": T.F16,
    "blk.0.ffn_down.weight": T.BF16,
    "blk.1.attn_norm.weight": T.F16,
    "blk.1.attn_q.weight": T.BF16,
    "blk.1.attn_q.bias": T.F32,
    "blk.1.attn_k.weight": T.Q8_0,
    "blk.1.attn_k.bias": T.Q8_0,
    "blk.1.attn_v.weight": T.F16,
    "blk.1.attn_v.bias": T.F32,
    "blk.1.attn_output.weight": T.F16,
    "blk.1.ffn_norm.weight": T.F32,
    "blk.1.ffn_gate.weight": T.BF16,
    "blk.1.ffn_up.weight": T.F16,
    "blk.1.ffn_down.weight": T.Q8_0,
}

# llama.cpp's token types.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def hf_name(name):
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{LAYER[rest]}"


def encode(values, qtype):
    """(array to write, raw_dtype) for float32 values stored as qtype."""
    if qtype == T.F32:
        return values.astype(np.float32), None
    if qtype == T.F16:
        return values.astype(np.float16), None
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def add_tokenizer(w, config):
    tok = json.loads((TINY / "tokenizer.json").read_text())
    tok_config = json.loads((TINY / "tokenizer_config.json").read_text())
    vocab_size = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for piece, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = piece, NORMAL
    for a in tok["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a["special"] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])


def make_tiny():
    config = json.loads((TINY / "config.json").read_text())
    assert config["tie_word_embeddings"], "tiny is expected to tie its embeddings"
    weights = load_file(TINY / "model.safetensors")
    path = OUT / "tiny.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("protege tiny")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    add_tokenizer(w, config)
    assert len(TINY_TYPES) == len(weights), sorted(set(map(hf_name, TINY_TYPES)) ^ set(weights))
    for name, qtype in TINY_TYPES.items():
        data, raw_dtype = encode(weights[hf_name(name)], qtype)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    write(w)
    # The reference: what gguf-py reads back, in the tensor's own float type.
    reader = gguf.GGUFReader(path)
    ref = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        keep = {T.F16: np.float16, T.BF16: None}.get(t.tensor_type, np.float32)
        if t.tensor_type == T.BF16:
            # safetensors.numpy has no bfloat16: store the raw bits, retyped in the header below.
            keep = np.uint16
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        ref[hf_name(t.name)] = np.ascontiguousarray(values.astype(keep))
    save_bf16(ref, {n for n, q in TINY_TYPES.items() if q == T.BF16}, OUT / "tiny_dequant.safetensors")


def save_bf16(tensors, bf16_gguf_names, path):
    """save_file, then mark the uint16 tensors as BF16 in the header (same data bytes)."""
    save_file(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for name in bf16_gguf_names:
        assert header[hf_name(name)]["dtype"] == "U16"
        header[hf_name(name)]["dtype"] = "BF16"
    # Data offsets are relative to the end of the header, so it may change length.
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def random_blocks(rng, qtype, rows, cols):
    """Random bytes with finite random f16 scales at the positions ggml keeps them."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale_offsets = {
        T.Q8_0: [0],
        T.Q4_0: [0],
        T.Q5_0: [0],
        T.Q4_K: [0, 2],
        T.Q5_K: [0, 2],
        T.Q6_K: [208],
    }[qtype]
    for off in scale_offsets:
        scales = rng.uniform(-2, 2, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


def make_quants():
    rng = np.random.default_rng(20261203)
    path = OUT / "quants.gguf"
    w = gguf.GGUFWriter(path, "protege-quants-test")
    w.add_tensor("f32", rng.standard_normal((2, 3)).astype(np.float32))
    # Normal, subnormal and zero values of each 16-bit float type.
    halves = np.concatenate([rng.standard_normal(12), [1e-6, -3e-8, 0.0, -0.0]])
    w.add_tensor("f16", halves.astype(np.float16).reshape(2, 8))
    w.add_tensor("bf16", gguf.quants.quantize(halves.astype(np.float32) * 1e-30, T.BF16).reshape(2, 16), raw_dtype=T.BF16)
    for name, qtype, rows, cols in [
        ("q8_0", T.Q8_0, 2, 64),
        ("q4_0", T.Q4_0, 2, 64),
        ("q5_0", T.Q5_0, 2, 64),
        ("q4_k", T.Q4_K, 2, 512),
        ("q5_k", T.Q5_K, 2, 512),
        ("q6_k", T.Q6_K, 3, 256),
    ]:
        w.add_tensor(name, random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)
    write(w)
    reader = gguf.GGUFReader(path)
    ref = {t.name: np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)) for t in reader.tensors}
    for name, values in ref.items():
        assert np.isfinite(values).all(), name
    save_file(ref, OUT / "quants.safetensors")


def write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    make_tiny()
    make_quants()
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
