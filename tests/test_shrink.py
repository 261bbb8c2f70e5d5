"""scripts/shrink.py end to end: a tiny transformers Llama with a SentencePiece tokenizer (byte fallback)
and a lillm checkpoint with a byte-level BPE, shrunk to a requested shape with a report."""
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.model import Transformer
from lillm.tokenizer import train_bpe
from scripts import shrink

pytestmark = pytest.mark.filterwarnings("ignore:skipping corpora missing")  # the tiny data dir has two files

SWAHILI = """Habari ya asubuhi, rafiki yangu. Leo ni siku nzuri sana ya kufanya kazi shambani.
Watoto wanakwenda shule kila siku asubuhi na kurudi nyumbani jioni pamoja na wazazi wao.
Serikali imetangaza mpango mpya wa kuboresha huduma za afya vijijini mwaka huu.
Mvua kubwa imenyesha usiku kucha na mito mingi imejaa maji mpaka kingoni.
Wakulima wanasema mavuno ya mahindi yatakuwa mazuri kuliko mwaka uliopita.""".splitlines()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory laid out like the real one, with Swahili train and dev text only."""
    root = tmp_path_factory.mktemp("data")
    train = root / "lacuna_language_corpus" / "swa" / "swa.txt"
    dev = root / "mafand_mt" / "en-swa" / "dev.swa"
    for path, n in ((train, 60), (dev, 8)):
        path.parent.mkdir(parents=True)
        path.write_text("".join(f"{line} {i}\n" for i in range(n) for line in SWAHILI), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, data_dir):
    """transformers.LlamaForCausalLM (untied, 4 heads, 2 kv heads) saved with save_pretrained, and a
    SentencePiece BPE tokenizer.model with byte fallback (no tokenizer.json: lillm.spm converts it)."""
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("llama")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SWAHILI * 20), model_writer=buffer, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def run(source, out, data_dir, *extra):
    return shrink.main(["--source", str(source), "--out", str(out), "--langs", "swa", "--data-dir", str(data_dir),
                        "--seq-len", "32", "--batch", "4", "--micro-batch", "2", "--calib-batches", "2",
                        "--eval-tokens", "400", "--device", "cpu", "--log-every", "1", *extra])


def stored_params(folder: Path) -> int:
    return sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())


def test_shrink_llama_folder_to_the_requested_shape_with_distilled_healing(tmp_path, llama_folder, data_dir):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "shrunk"
    report = run(llama_folder, out, data_dir, "--vocab", "330", "--d-model", "16", "--d-ff", "32", "--layers", "1",
                 "--layer-choice", "influence", "--importance", "activation", "--tie", "mean",
                 "--heal-steps", "2", "--distill")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (16, 32, 1)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == report["vocab"]["vocab_size"] <= 330
    assert [s["step"] for s in report["steps"]] == ["source", "vocab", "width", "depth", "tie", "heal (distilled)"]
    final = report["steps"][-1]["params"]
    assert final["total"] == stored_params(out) == ckpt.load_model(out).num_params()
    assert final["zindi_size_factor"] == pytest.approx(1 - final["total"] / 421_939_200, abs=1e-4)
    assert report["vocab"]["reachability_after"]["reachable_fraction"] == 1.0
    assert set(report["fertility"]["swa"]) == {"before", "after"}
    for name in ("shrink_report.md", "shrink_report.json", "tokenizer.json"):
        assert (out / name).is_file()
    assert "zindi size factor" in (out / "shrink_report.md").read_text()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert len(fast) == config["vocab_size"]
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([fast(SWAHILI[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ckpt.load_model(out).eval()(ids), rtol=1e-4, atol=1e-4)


def test_shrink_lillm_checkpoint_with_byte_level_bpe_by_first_layers_and_weights(tmp_path, data_dir):
    tokenizer = train_bpe(SWAHILI * 20, vocab_size=400, min_frequency=2, show_progress=False)
    tokenizer.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=400, n_layers=3))
    ckpt.save_checkpoint(tmp_path / "base", model, tmp_path / "tokenizer.json")
    report = run(tmp_path / "base", tmp_path / "out", data_dir, "--vocab", "300", "--d-ff", "88", "--n-heads", "2",
                 "--layers", "2", "--layer-choice", "first", "--importance", "weight")
    cfg = ckpt.read_config(tmp_path / "out")
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers) == (300, 64, 88, 2, 1, 2)
    assert report["layers_kept"] == [0, 1]
    assert [s["step"] for s in report["steps"]] == ["source", "vocab", "width", "depth"]  # tied already: no tie step
    assert report["steps"][0]["params"]["total"] == model.num_params()


def test_source_without_model_is_a_file_not_found_error_naming_it(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        run(tmp_path / "nothing", tmp_path / "out", data_dir)
