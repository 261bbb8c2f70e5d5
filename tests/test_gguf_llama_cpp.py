"""GGUF files run in llama.cpp itself (through llama-cpp-python), compared with lillm.

Marked slow (llama-cpp-python builds llama.cpp from source; the default run skips these):
    python -m pytest tests/test_gguf_llama_cpp.py -m slow -q
    LILLM_TRAINED_CKPT=path/to/step_N LILLM_VAL_BIN=path/to/val.bin python -m pytest ... -m slow
The trained-model checks run when LILLM_TRAINED_CKPT names a checkpoint (a lillm byte-level BPE
model trained with pretrain.py); held-out loss uses LILLM_VAL_BIN when given.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.gguf import CHAT_TEMPLATE, export_gguf
from lillm.model import Transformer
from lillm.spm import load_tokenizer
from lillm.tokenizer import Tokenizer, train_bpe

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama]'")
pytestmark = pytest.mark.slow

TEXT = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau.", "Sawubona, unjani namhlanje?"] * 20
PROMPT = [1, 45, 120, 7, 300, 64, 9, 18, 250, 77, 31, 5, 199, 42, 100, 3]


def llama(path: Path, n_ctx: int = 256, all_logits: bool = True):
    """A llama.cpp context that keeps fp32 keys and values (its default f16 cache would round them)."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=all_logits,
                           verbose=False, type_k=f32, type_v=f32, flash_attn=False, seed=0)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def lillm_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float().numpy()


def save(tmp_path, model, tokenizer_path=None, name="ckpt") -> Path:
    return ckpt.save_checkpoint(tmp_path / name, model, tokenizer_path=tokenizer_path)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(TEXT, vocab_size=300, show_progress=False).save(path)
    return path


@pytest.mark.parametrize("shape", ["tiny", "untied-mha-head-dim"])
def test_tiny_logits_equal_lillm_in_f32_and_f16(tmp_path, bpe_tokenizer, shape):
    changes = {"vocab_size": 320, "init_std": 0.1}  # 0.1: logits that differ from token to token
    if shape != "tiny":
        changes.update(tie_embeddings=False, n_heads=4, n_kv_heads=4, head_dim=32)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", **changes)).eval()
    folder = save(tmp_path, model, bpe_tokenizer)
    expected = lillm_logits(model, PROMPT)
    for kind, tolerance in (("f32", 1e-4), ("f16", 1e-2)):
        got = llama_logits(llama(export_gguf(folder, tmp_path / f"{kind}.gguf", kind)), PROMPT)
        diff = float(np.abs(got - expected).max())
        print(f"{shape} {kind}: max |llama.cpp - lillm| = {diff:.2e} (logits up to {np.abs(expected).max():.2f})")
        assert diff <= tolerance


def test_mixture_of_experts_logits_equal_lillm_in_f32(tmp_path, bpe_tokenizer):
    """llama.cpp's llama architecture runs Mixtral's layout: router, stacked experts, top-k renormalised."""
    torch.manual_seed(0)
    model = Transformer(get_preset("moe-tiny", vocab_size=320, init_std=0.1)).eval()
    folder = save(tmp_path, model, bpe_tokenizer)
    expected = lillm_logits(model, PROMPT)
    got = llama_logits(llama(export_gguf(folder, tmp_path / "moe-f32.gguf", "f32")), PROMPT)
    diff = float(np.abs(got - expected).max())
    print(f"moe f32: max |llama.cpp - lillm| = {diff:.2e} (logits up to {np.abs(expected).max():.2f})")
    assert diff <= 1e-4


def test_inkuba_shaped_checkpoint_with_sentencepiece_exports_and_runs(tmp_path, buzuzu):
    """Shared MLP, untied head, no GQA, the Buzuzu-Mavi SentencePiece tokenizer (8,064 pieces)."""
    _, spm_folder = buzuzu
    cfg = get_preset("inkuba-0.4b", vocab_size=8064, d_model=64, n_heads=4, n_kv_heads=4, d_ff=128,
                     n_layers=3, max_seq_len=256, init_std=0.2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    folder = save(tmp_path, model)  # an imported checkpoint, its tokenizer given as tokenizer.model
    out = export_gguf(folder, tmp_path / "inkuba.gguf", "f32", sentencepiece=spm_folder / "tokenizer.model")
    llm = llama(out)
    expected = lillm_logits(model, PROMPT)
    assert float(np.abs(llama_logits(llm, PROMPT) - expected).max()) <= 1e-4
    # lillm's exact SentencePiece tokenizer with the tokenizer.json pipeline (a "▁" put before the
    # text, as transformers does for InkubaLM): the GGUF beside it says add_space_prefix
    reference = load_tokenizer(spm_folder, exact=True)
    lines = dev_sentences(buzuzu[0], "swa", 100) + dev_sentences(buzuzu[0], "hau", 100)
    equal = sum(llm.tokenize(line.encode(), add_bos=False, special=False) == reference.encode(line).ids[1:]
                for line in lines)
    print(f"SentencePiece in llama.cpp: {equal}/{len(lines)} dev lines tokenized as lillm does")
    assert equal >= 0.95 * len(lines)
    assert llm.tokenize("Habari".encode())[0] == 1  # add_bos_token


def dev_sentences(data: Path, lang: str, n: int) -> list[str]:
    path = data / "mafand_mt" / f"en-{lang}" / f"dev.{lang}"
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()[:n]]


@pytest.fixture(scope="module")
def trained():
    folder = os.environ.get("LILLM_TRAINED_CKPT")
    if not folder:
        pytest.skip("set LILLM_TRAINED_CKPT to a trained lillm checkpoint folder")
    folder = ckpt.resolve_checkpoint(folder)
    return folder, ckpt.load_model(folder).eval(), Tokenizer.from_file(folder / "tokenizer.json")


def test_trained_model_logits_f32_f16(tmp_path, trained):
    folder, model, tokenizer = trained
    ids = tokenizer.encode("Rais wa Tanzania alisema kwamba serikali itaendelea", add_bos=True)
    expected = lillm_logits(model, ids)
    for kind, tolerance in (("f32", 1e-4), ("f16", 1e-2)):
        got = llama_logits(llama(export_gguf(folder, tmp_path / f"{kind}.gguf", kind)), ids)
        diff = float(np.abs(got - expected).max())
        print(f"trained {kind}: max |llama.cpp - lillm| = {diff:.2e}")
        assert diff <= tolerance


def test_llama_cpp_tokenizes_200_dev_sentences_per_language_as_lillm(tmp_path, trained, buzuzu):
    folder, _, tokenizer = trained
    llm = llama_cpp.Llama(model_path=str(export_gguf(folder, tmp_path / "v.gguf", "q8_0")), vocab_only=True,
                          verbose=False)
    for lang in ("swa", "hau"):
        lines = dev_sentences(buzuzu[0], lang, 200)
        mismatched = [line for line in lines
                      if llm.tokenize(line.encode(), add_bos=False, special=False) != tokenizer.encode(line)]
        print(f"{lang}: {len(lines) - len(mismatched)}/{len(lines)} dev sentences tokenized id for id")
        assert not mismatched, mismatched[:3]
        for line in lines[:20]:  # and back: llama.cpp's detokenizer gives the text
            assert llm.detokenize(tokenizer.encode(line)).decode() == line


def test_chat_template_renders_to_lillm_chat_ids(tmp_path, trained):
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 is not installed: pip install -e '.[llama]'")
    folder, _, tokenizer = trained
    if tokenizer.token_to_id("<|user|>") is None:
        pytest.skip("tokenizer without role tokens")
    llm = llama_cpp.Llama(model_path=str(export_gguf(folder, tmp_path / "c.gguf", "q8_0")), vocab_only=True,
                          verbose=False)
    messages = [{"role": "system", "content": "Jibu kwa Kiswahili."}, {"role": "user", "content": "Habari za leo?"},
                {"role": "assistant", "content": "Nzuri sana."}, {"role": "user", "content": "Asante"}]
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True,
                                                 bos_token="<s>", eos_token="</s>")
    assert text.startswith("<s>")
    # llama.cpp adds BOS itself and drops the template's leading bos_token
    ids = llm.tokenize(text[len("<s>"):].encode(), add_bos=True, special=True)
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)[0]


PROMPTS = ["Rais wa Tanzania", "Watoto wa shule", "Gwamnatin tarayya", "A jihar Kano", "Habari za leo"]


def test_q8_0_top1_agrees_with_lillm_fp32(tmp_path, trained):
    folder, model, tokenizer = trained
    from lillm.generate import generate
    llm = llama(export_gguf(folder, tmp_path / "q8.gguf", "q8_0"))
    agree = total = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_bos=True)
        new = generate(model, [ids], max_new_tokens=64, temperature=0)[0]
        # teacher-forced: llama.cpp's top-1 at each position where lillm chose a token
        top1 = llama_logits(llm, ids + new)[len(ids) - 1:-1].argmax(-1)
        agree += int((top1 == np.array(new)).sum())
        total += len(new)
    print(f"q8_0 top-1 agreement with lillm fp32: {agree}/{total} = {agree / total:.2%}")
    assert agree >= 0.99 * total
    val = os.environ.get("LILLM_VAL_BIN")
    if val:
        tokens = np.memmap(val, dtype=np.uint16, mode="r")
        windows = [tokens[i:i + 128].astype(np.int64).tolist() for i in range(0, 20 * 128, 128)]
        ours = [cross_entropy(lillm_logits(model, w), w) for w in windows]
        theirs = [cross_entropy(llama_logits(llm, w), w) for w in windows]
        print(f"held-out loss: lillm fp32 {np.mean(ours):.4f}, llama.cpp q8_0 {np.mean(theirs):.4f} "
              f"({(np.mean(theirs) / np.mean(ours) - 1):+.3%})")


def cross_entropy(logits: np.ndarray, tokens: list[int]) -> float:
    logits = torch.from_numpy(logits[:-1]).double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])))
