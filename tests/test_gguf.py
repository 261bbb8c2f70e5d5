"""GGUF export, checked without llama.cpp: the file read back with gguf's own reader (names, shapes,
types, metadata, the tokenizer), and the q/k row permutation proven by computing attention scores
both ways. tests/test_gguf_llama_cpp.py runs the files in llama.cpp itself."""
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.gguf import (
    CHAT_TEMPLATE,
    export_gguf,
    interleaved_to_rotate_half,
    rotate_half_to_interleaved,
)
from lillm.errors import GGUFExportError, OutputFolderError
from lillm.model import RotaryEmbedding, Transformer, apply_rotary
from lillm.tokenizer import train_bpe

REPO = Path(__file__).resolve().parent.parent
TEXT = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau.", "Sawubona, unjani namhlanje?"] * 20


@pytest.fixture
def folder(tmp_path):
    tokenizer = train_bpe(TEXT, vocab_size=300, show_progress=False)
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(0)
    # vocab 320 > 300 tokens: the padded rows of an expanded vocabulary; head_dim 32 != 64 / 4 on purpose.
    cfg = get_preset("tiny", vocab_size=320, d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=96)
    model = Transformer(cfg)
    ckpt.save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tmp_path / "tok.json")
    return tmp_path / "ckpt", model, tokenizer


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_the_permutation_turns_rotate_half_into_adjacent_pair_rotation():
    """Scores q.k with lillm's rotate-half on the original rows equal scores with llama.cpp's rope
    (channels 2i and 2i+1 rotated by angle i) on the permuted rows."""
    torch.manual_seed(0)
    heads, head_dim, d, positions = 3, 8, 16, 5
    w_q, w_k = torch.randn(heads * head_dim, d), torch.randn(heads * head_dim, d)
    x = torch.randn(positions, d)
    rotary = RotaryEmbedding(head_dim, positions, theta=10000.0)
    cos, sin = rotary(torch.arange(positions)[None])

    def heads_of(w):  # (1, heads, positions, head_dim)
        return (x @ w.T).view(positions, heads, head_dim).transpose(0, 1)[None]
    ours = apply_rotary(heads_of(w_q), cos, sin) @ apply_rotary(heads_of(w_k), cos, sin).transpose(-1, -2)

    def adjacent_rope(t):  # GPT-J / Meta layout: rotate (t[2i], t[2i+1]) by position * theta^(-2i/d)
        angle = torch.arange(positions)[:, None] * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
        even, odd = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2] = even * angle.cos() - odd * angle.sin()
        out[..., 1::2] = even * angle.sin() + odd * angle.cos()
        return out
    q = adjacent_rope(heads_of(rotate_half_to_interleaved(w_q, heads)))
    k = adjacent_rope(heads_of(rotate_half_to_interleaved(w_k, heads)))
    torch.testing.assert_close(q @ k.transpose(-1, -2), ours, atol=1e-4, rtol=1e-4)
    assert torch.equal(interleaved_to_rotate_half(rotate_half_to_interleaved(w_q, heads), heads), w_q)
    # the permutation of one head, by hand: channel 2i <- i, 2i+1 <- i + head_dim/2
    rows = rotate_half_to_interleaved(torch.arange(8.0)[:, None], 1)[:, 0].tolist()
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7]


def test_f32_file_holds_every_tensor_and_the_metadata_llama_cpp_reads(folder, tmp_path):
    path, model, tokenizer = folder
    out = export_gguf(path, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(out)
    cfg = model.config
    assert field(reader, "general.architecture") == "llama"
    expected = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 96,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 128,
                "llama.rope.dimension_count": 32, "llama.attention.key_length": 32, "llama.vocab_size": 320,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE}
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert math.isclose(field(reader, "llama.rope.freq_base"), cfg.rope_theta)
    assert math.isclose(field(reader, "llama.attention.layer_norm_rms_epsilon"), cfg.norm_eps, rel_tol=1e-6)

    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == 320
    assert tokens[:300] == [tokenizer.id_to_token(i) for i in range(300)]
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and set(types[300:]) == {gguf.TokenType.UNUSED}
    assert types[:7] == [gguf.TokenType.CONTROL] * 7 and set(types[7:300]) == {gguf.TokenType.NORMAL}
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 9 * cfg.n_layers
    state = model.state_dict()
    for layer in range(cfg.n_layers):
        def read(name, layer=layer):
            t = tensors[f"blk.{layer}.{name}"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            return torch.from_numpy(np.array(t.data)).reshape(tuple(reversed(t.shape.tolist())))
        prefix = f"model.layers.{layer}."
        q, k = read("attn_q.weight"), read("attn_k.weight")
        assert q.shape == (4 * 32, 64) and k.shape == (2 * 32, 64)
        assert not torch.equal(q, state[prefix + "self_attn.q_proj.weight"])  # permuted in the file
        assert torch.equal(interleaved_to_rotate_half(q, 4), state[prefix + "self_attn.q_proj.weight"])
        assert torch.equal(interleaved_to_rotate_half(k, 2), state[prefix + "self_attn.k_proj.weight"])
        assert torch.equal(read("attn_v.weight"), state[prefix + "self_attn.v_proj.weight"])
        assert torch.equal(read("ffn_down.weight"), state[prefix + "mlp.down_proj.weight"])
        assert torch.equal(read("ffn_norm.weight"), state[prefix + "post_attention_layernorm.weight"])
    embed = tensors["token_embd.weight"]
    assert embed.shape.tolist() == [64, 320]  # GGUF lists the fastest-moving dimension first


def test_q8_0_quantizes_whole_block_rows_and_keeps_norms_f32(folder, tmp_path):
    path, model, _ = folder
    reader = gguf.GGUFReader(export_gguf(path, tmp_path / "q.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    Q8, F16, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == Q8 and types["blk.0.attn_q.weight"] == Q8
    assert types["blk.0.ffn_down.weight"] == Q8  # rows of 96 = 3 blocks of 32
    assert types["blk.0.attn_norm.weight"] == F32 and types["output_norm.weight"] == F32
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    q8 = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    back = gguf.quants.dequantize(np.array(q8.data), Q8)
    original = model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    # an int8 step is max|block| / 127: the error is at most half a step (plus the f16 scale's rounding)
    assert np.abs(back - original).max() <= np.abs(original).max() / 127 * 0.51
    assert F16 not in types.values()


def test_shared_mlp_is_written_into_every_block_and_untied_head_as_output(tmp_path):
    tokenizer = train_bpe(TEXT, vocab_size=300, show_progress=False)
    tokenizer.save(tmp_path / "tok.json")
    cfg = get_preset("tiny", vocab_size=300, shared_mlp=True, tie_embeddings=False, n_layers=3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ckpt.save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tmp_path / "tok.json")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "s.gguf", "f16"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    gate = model.model.layers[0].mlp.gate_proj.weight.detach().half().numpy()
    for layer in range(3):
        assert np.array_equal(tensors[f"blk.{layer}.ffn_gate.weight"].reshape(gate.shape), gate)
    assert tensors["output.weight"].dtype == np.float16
    assert tensors["blk.0.attn_norm.weight"].dtype == np.float32
    assert "tokenizer.chat_template" in reader.fields


def test_sentencepiece_tokenizer_goes_in_as_llama_with_scores_and_types(folder, tmp_path, buzuzu):
    _, spm_folder = buzuzu
    from lillm.spm import SentencePieceModel
    sp = SentencePieceModel.read(spm_folder / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=len(sp.pieces)))
    ckpt.save_checkpoint(tmp_path / "spm_ckpt", model)
    out = export_gguf(tmp_path / "spm_ckpt", tmp_path / "spm.gguf", "f32", sentencepiece=spm_folder / "tokenizer.model")
    reader = gguf.GGUFReader(out)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == sp.pieces
    assert np.allclose(field(reader, "tokenizer.ggml.scores"), sp.scores)
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    # the model's spec says add_dummy_prefix=false, but its tokenizer.json (what transformers and
    # lillm run) puts "▁" before the text: the file follows tokenizer.json
    assert types[3] == gguf.TokenType.BYTE and field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert "tokenizer.chat_template" not in reader.fields  # no role tokens: no lillm chat template


def test_an_existing_file_is_refused_and_kept_unless_overwrite(folder, tmp_path):
    path, _, _ = folder
    target = tmp_path / "model.gguf"
    export_gguf(path, target, "f32")
    before = target.read_bytes()
    with pytest.raises(OutputFolderError, match="--overwrite"):
        export_gguf(path, target, "f16")
    assert target.read_bytes() == before
    export_gguf(path, target, "f16", overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF" and target.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    # a file that is not a GGUF file is the user's: never replaced, not even with --overwrite
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"the user's file")
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match="not a GGUF file"):
            export_gguf(path, mine, "f16", overwrite=overwrite)
    assert mine.read_bytes() == b"the user's file"


def test_script_reports_bad_input_in_one_line_with_status_2(folder, tmp_path):
    path, _, _ = folder
    (tmp_path / "taken.gguf").write_bytes(b"x")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "export_gguf.py"), str(path),
                          str(tmp_path / "taken.gguf")], capture_output=True, text=True, cwd=REPO, check=False,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "exists" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    missing = tmp_path / "no_tokenizer"
    ckpt.save_checkpoint(missing, path_model(path))
    with pytest.raises(GGUFExportError, match="tokenizer.json is missing"):
        export_gguf(missing, tmp_path / "x.gguf")


def path_model(path):
    return ckpt.load_model(path)
