"""Import/export against the reference: tiny transformers Llama models written to tmp_path,
an InkubaLM-shaped shared-MLP checkpoint, and the Buzuzu-Mavi SentencePiece tokenizer."""
import csv
import io
import json
import pickle
import re

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

from lillm.checkpoint import unique_state_dict
from lillm.config import get_preset
from lillm.hf import HFError, HFFileNotFoundError, WeightFiles, export_llama, import_llama
from lillm.spm import SentencePieceModel, load_tokenizer, save_tokenizer, tokenizer_from_sentencepiece
from lillm.model import Transformer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")


# ---- helpers ----------------------------------------------------------------------------------
def hf_llama(n_kv: int, tie: bool, theta: float, vocab: int):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, rope_theta=theta,
                                   tie_word_embeddings=tie, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def save_as(model, folder, fmt: str) -> None:
    """transformers >= 5 writes safetensors only; .bin files are written the way transformers 4 did."""
    model.save_pretrained(folder, max_shard_size="20KB" if fmt == "sharded" else "5GB")
    if fmt.startswith("bin"):
        (folder / "model.safetensors").unlink()
        state = model.state_dict()
        if fmt == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = list(state)
            shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                      "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
            for shard, keys in shards.items():
                torch.save({k: state[k] for k in keys}, folder / shard)
            weight_map = {k: shard for shard, keys in shards.items() for k in keys}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def left_padded_batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def max_diff_on_real_tokens(hf_model, lillm_model, vocab: int) -> float:
    ids, mask, positions = left_padded_batch(vocab)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = lillm_model(ids, position_ids=positions, attention_mask=mask)
    real = mask.bool()
    return (expected[real] - got[real]).abs().max().item()


# ---- transformers Llama round trip ----------------------------------------------------------------
CASES = {
    "mha-untied-safetensors": (dict(n_kv=4, tie=False, theta=10000.0, vocab=96), "safetensors"),
    "gqa-tied-sharded": (dict(n_kv=2, tie=True, theta=500000.0, vocab=97), "sharded"),
    "gqa-untied-bin": (dict(n_kv=1, tie=False, theta=1e6, vocab=101), "bin"),
    "mha-tied-bin-sharded": (dict(n_kv=4, tie=True, theta=12345.0, vocab=99), "bin-sharded"),
}


@pytest.mark.parametrize("case", CASES)
def test_imported_llama_and_its_export_give_transformers_logits_with_left_padding(tmp_path, case):
    kwargs, fmt = CASES[case]
    reference = hf_llama(**kwargs)
    save_as(reference, tmp_path / "hf", fmt)
    model = import_llama(tmp_path / "hf").eval()
    assert model.config.tie_embeddings == kwargs["tie"] and model.config.rope_theta == kwargs["theta"]
    assert model.config.n_kv_heads == kwargs["n_kv"] and not model.config.shared_mlp
    assert max_diff_on_real_tokens(reference, model, kwargs["vocab"]) < 1e-4

    export_llama(model, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert max_diff_on_real_tokens(reloaded, model, kwargs["vocab"]) < 1e-4
    stored = load_file(tmp_path / "exported" / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not kwargs["tie"])


def test_import_in_bfloat16_converts_every_tensor(tmp_path):
    reference = hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=64)
    reference.save_pretrained(tmp_path)
    model = import_llama(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_copying_a_tensor_in_blocks_of_rows_equals_copying_it_whole(tmp_path, fmt):
    reference = hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=97)
    save_as(reference, tmp_path, fmt)
    target = torch.empty(97, 32, dtype=torch.bfloat16)
    WeightFiles(tmp_path).copy_into("model.embed_tokens.weight", target, block_bytes=5 * 32 * 4)  # 5 rows a read
    assert torch.equal(target, reference.model.embed_tokens.weight.detach().to(torch.bfloat16))


# ---- InkubaLM-shaped checkpoints (one MLP shared by all layers) ----------------------------------
def inkuba_like():
    cfg = get_preset("inkuba-0.4b").replace(vocab_size=131, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4,
                                            d_ff=88, max_seq_len=64)
    torch.manual_seed(2)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_inkuba_folder(model, folder, mlp_storage: str) -> None:
    """As InkubaLM's repository holds it: Llama config (custom architecture name, no lillm flag)."""
    folder.mkdir()
    config = model.config.to_hf_dict()
    config.pop("lillm_shared_mlp")
    config["architectures"] = ["VulavulaLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    if mlp_storage == "layer 0 only":
        tensors = unique_state_dict(model)
    elif mlp_storage == "layer 2 only":
        tensors = {re.sub(r"layers\.0\.mlp", "layers.2.mlp", n): t for n, t in unique_state_dict(model).items()}
    else:  # "every layer": identical copies, as tools that do not deduplicate write it
        tensors = {n: t.clone() for n, t in model.state_dict().items()}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("mlp_storage", ["layer 0 only", "layer 2 only", "every layer"])
def test_inkuba_shaped_checkpoint_imports_as_one_shared_mlp_with_config_param_count(tmp_path, mlp_storage):
    writer = inkuba_like()
    write_inkuba_folder(writer, tmp_path / "inkuba", mlp_storage)
    notes = []
    model = import_llama(tmp_path / "inkuba", notes=notes).eval()
    assert model.config.shared_mlp, notes
    assert len({id(block.mlp) for block in model.model.layers}) == 1
    assert model.num_params() == model.config.num_params() == writer.num_params()
    ids = torch.randint(0, 131, (2, 12))
    assert torch.equal(logits(model, ids), logits(writer, ids))


def test_shared_mlp_false_unrolls_one_stored_mlp_into_every_layer(tmp_path):
    writer = inkuba_like()
    write_inkuba_folder(writer, tmp_path / "inkuba", "layer 0 only")
    model = import_llama(tmp_path / "inkuba", shared_mlp=False).eval()
    assert len({id(block.mlp) for block in model.model.layers}) == 3
    assert model.num_params() == writer.num_params() + 2 * 3 * 32 * 88
    ids = torch.randint(0, 131, (2, 12))
    assert torch.equal(logits(model, ids), logits(writer, ids))


def test_exported_shared_mlp_is_unrolled_for_transformers_and_folds_back_on_import(tmp_path):
    model = inkuba_like()
    export_llama(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert "lillm_shared_mlp" not in config and config["tie_word_embeddings"] is False
    stored = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(f"model.layers.{i}.mlp.up_proj.weight" in stored for i in range(3))
    unrolled = model.num_params() + 2 * 3 * 32 * 88
    assert sum(t.numel() for t in stored.values()) == unrolled
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert max_diff_on_real_tokens(reference, model, 131) < 1e-4
    again = import_llama(tmp_path / "exported")
    assert again.config.shared_mlp and again.num_params() == model.num_params()


def test_config_claiming_a_shared_mlp_with_different_layer_mlps_is_refused(tmp_path):
    reference = hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=64)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "lillm_shared_mlp": True}))
    with pytest.raises(HFError, match="different MLP in each layer"):
        import_llama(tmp_path)


# ---- tokenizers ----------------------------------------------------------------------------------------
SAMPLE = """Habari ya asubuhi, rafiki yangu. Watoto wanacheza mpira uwanjani.
Sannu da zuwa, yaya aiki? Ina kwana, lafiya lau.
Umntwana uyadlala ebaleni. Molo, unjani namhlanje?
Serikali imetangaza mpango mpya wa elimu kwa watoto wote 2024.
Ƙasar Najeriya tana da jihohi talatin da shida; ɗan'uwana yana ƙauye.""".splitlines()


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    """A freshly trained SentencePiece BPE model (distinct scores), Llama settings."""
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"{line} {i}" for i in range(40) for line in SAMPLE]), model_writer=buffer,
        model_type="bpe", vocab_size=420, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


def test_tokenizer_from_sentencepiece_encodes_like_sentencepiece_when_scores_are_distinct(tiny_spm):
    tok = tokenizer_from_sentencepiece(tiny_spm)
    reference = spm.SentencePieceProcessor(model_file=str(tiny_spm))
    probes = SAMPLE + ["  two  spaces, ünïcödé and 🤲 emoji", "ƴan uwa ƙasa", "tab\there", "x"]
    for text in probes:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("Habari").ids[0] == reference.bos_id()


def test_exported_tokenizer_loads_with_autotokenizer_and_gives_the_same_ids(tmp_path, tiny_spm):
    tok = tokenizer_from_sentencepiece(tiny_spm)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.get_vocab_size()))
    export_llama(model, tmp_path / "exported", tokenizer_path=tmp_path / "tokenizer.json")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    for text in SAMPLE:
        assert auto(text)["input_ids"] == tok.encode(text).ids
    assert (auto.bos_token, auto.eos_token, auto.unk_token) == ("<s>", "</s>", "<unk>")


def swahili_hausa_dev_lines(root) -> list[str]:
    lines = []
    for rel in ("mafand_mt/en-swa/dev.swa", "mafand_mt/en-hau/dev.hau"):
        lines += (root / rel).read_text(encoding="utf-8").splitlines()
    for rel in ("afrisenti/swa/dev.tsv", "afrisenti/hau/dev.tsv"):
        with open(root / rel, newline="", encoding="utf-8") as f:
            lines += [row["tweet"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [line for line in lines if line]


def sentencepiece_ids(folder, lines):
    """This tokenizer.model has add_dummy_prefix=false (a transformers legacy=False save), while
    tokenizer.json prepends "▁"; so the reference is SentencePiece on "▁" + line (identity normalizer)."""
    assert SentencePieceModel.read(folder / "tokenizer.model").add_dummy_prefix is False
    reference = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return [reference.encode("\u2581" + line) for line in lines]


def test_buzuzu_exact_tokenizer_encodes_swahili_and_hausa_dev_text_like_sentencepiece(capsys, buzuzu):
    root, folder = buzuzu
    with pytest.raises(Exception, match="out of vocabulary"):
        tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))  # why a repair is needed at all
    lines = swahili_hausa_dev_lines(root)
    tok = load_tokenizer(folder, exact=True)
    got = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    expected = sentencepiece_ids(folder, lines)
    mismatched = [line for line, a, b in zip(lines, got, expected) if a != b]
    with capsys.disabled():
        print(f"\nexact tokenizer: {len(lines) - len(mismatched)}/{len(lines)} dev lines equal to SentencePiece")
    assert not mismatched, mismatched[:3]
    assert all(tok.decode(ids) == line for ids, line in zip(got[:500], lines[:500]))


def test_buzuzu_repaired_tokenizer_json_loads_and_agrees_with_sentencepiece_on_most_lines(tmp_path, capsys, buzuzu):
    root, folder = buzuzu
    lines = swahili_hausa_dev_lines(root)
    tok = tokenizers.Tokenizer.from_file(str(save_tokenizer(load_tokenizer(folder), tmp_path / "tokenizer.json")))
    assert tok.get_vocab_size() == 8064 and tok.token_to_id("<0x0A>") == 13
    got = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    expected = sentencepiece_ids(folder, lines)
    equal = sum(a == b for a, b in zip(got, expected))
    with capsys.disabled():
        print(f"\nrepaired tokenizer.json: {equal}/{len(lines)} dev lines equal to SentencePiece "
              "(the rest need SentencePiece's leftmost rule for equal scores, or merge characters missing from the vocabulary)")
    assert equal >= 0.9 * len(lines)
    assert all(tok.decode(ids) == line for ids, line in zip(got[:500], lines[:500]))
    assert tok.encode("Habari").tokens[0] == "<s>"


# ---- refusals and clear errors -------------------------------------------------------------------
class CodeRunningPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_bin_holding_a_code_running_pickle_is_refused_without_running_it(tmp_path):
    hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=64).config.save_pretrained(tmp_path)
    marker = tmp_path / "marker"
    torch.save({"model.embed_tokens.weight": CodeRunningPayload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(HFError, match=r"pytorch_model\.bin was refused"):
        import_llama(tmp_path)
    assert not marker.exists()
    # The payload is real: plain unpickling (what an unsafe load does) runs it.
    pickle.loads(pickle.dumps(CodeRunningPayload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "plain RoPE"),
    ("attention_bias", True, "attention_bias=true"),
    ("mlp_bias", True, "mlp_bias=true"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("sliding_window", 4096, "sliding_window=4096"),
    ("model_type", "mistral", "model_type is 'mistral'"),
    ("head_dim", 7, "head_dim=7 must be even"),
])
def test_config_with_unsupported_field_is_refused_naming_it(tmp_path, field, value, message):
    hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=64).config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(HFError, match=re.escape(message)):
        import_llama(tmp_path)


def test_missing_config_or_shard_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        import_llama(tmp_path)
    hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=64).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HFFileNotFoundError, match=f"shard {shard.name} named in model.safetensors.index.json"):
        import_llama(tmp_path)


def test_misshapen_missing_and_unexpected_tensors_are_named(tmp_path):
    reference = hf_llama(n_kv=2, tie=False, theta=10000.0, vocab=64)
    reference.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    bad = dict(state, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 32)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight has shape \(8, 32\), the config needs \(16, 32\)"):
        import_llama(tmp_path)
    incomplete = {k: v for k, v in state.items() if k != "model.norm.weight"}
    save_file(dict(incomplete, **{"model.extra.weight": torch.zeros(2)}), str(tmp_path / "model.safetensors"))
    with pytest.raises(HFError, match=r"Missing: \['model\.norm\.weight'\]; unexpected: \['model\.extra\.weight'\]"):
        import_llama(tmp_path)
