
import pytest
import torch

import inference
from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.errors import CheckpointError
from lillm.generate import generate
from lillm.model import Transformer
from lillm.tokenizer import train_bpe

TEXT = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau.", "Sawubona, unjani namhlanje?"] * 20


@pytest.fixture
def folder(tmp_path):
    tokenizer = train_bpe(TEXT, vocab_size=300, show_progress=False)
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    ckpt.save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tmp_path / "tok.json")
    return tmp_path / "ckpt", model, tokenizer


def test_streamed_text_equals_the_decoded_generation(folder, capsys):
    path, model, tokenizer = folder
    result = inference.main([str(path), "--prompt", "Habari", "--temperature", "0", "--max-new-tokens", "12"])
    expected = generate(model.eval(), [tokenizer.encode("Habari", add_bos=True)], max_new_tokens=12, temperature=0,
                        eos_id=tokenizer.eos_id)[0]
    assert result == [tokenizer.decode(expected)]
    assert capsys.readouterr().out == "Habari" + tokenizer.decode(expected) + "\n"


def test_compile_flag_decodes_through_the_fixed_shape_step_with_the_same_result(folder, capsys, monkeypatch):
    """--compile takes lillm.generate's StaticDecoder path; here traced by the eager backend, because
    compiling for real takes half a minute on a CPU (the GPU speed is in the README's table)."""
    import lillm.generate

    path, _, _ = folder
    used = []

    def traced_decoder(model):
        used.append(model)
        return lillm.generate.StaticDecoder(model, backend="eager", mode=None)
    monkeypatch.setattr(lillm.generate, "static_decoder", traced_decoder)
    args = [str(path), "--prompt", "Habari", "--prompt", "Ina", "--temperature", "0", "--max-new-tokens", "8"]
    assert inference.main(args + ["--compile"]) == inference.main(args)
    assert len(used) == 1


def test_a_batch_of_prompts_gives_one_result_each(folder, capsys):
    path, _, _ = folder
    result = inference.main([str(path), "--prompt", "Habari", "--prompt", "Ina kwana", "--max-new-tokens", "5"])
    assert len(result) == 2


def test_chat_reads_turns_until_an_empty_line(folder, capsys, monkeypatch):
    path, _, _ = folder
    turns = iter(["Habari?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    inference.main([str(path), "--chat", "--max-new-tokens", "4"])
    assert "chat:" in capsys.readouterr().out


def test_a_folder_without_tokenizer_says_what_is_missing(folder, tmp_path):
    path, model, _ = folder
    ckpt.save_checkpoint(tmp_path / "bare", model)
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        inference.main([str(tmp_path / "bare"), "--prompt", "x"])
