import json

import pytest
import torch
import torch.nn.functional as F

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.model import Transformer
from lillm.errors import SFTDataError
from lillm.rows import read_conversations
from lillm.sft import (IGNORE_INDEX, SFTBatches, SFTExample, add_neftune, build_examples, pack_rows, packed_batch,
                       pad_batch, shorten_prompt, tokenize_conversation)
from lillm.tokenizer import train_bpe
from lillm.loss import causal_lm_loss

TEXTS = [
    "Habari za asubuhi, rafiki yangu? Nzuri sana, asante.",
    "Watoto wanacheza mpira uwanjani pamoja na walimu wao.",
    "Sannu da zuwa, ƴan uwa. Mun gode ƙwarai da gaske.",
    "Translate this English text into Swahili. The children play football every evening.",
    "Chanya Wastani Hasi Kyakkyawa Tsaka-tsaki Korau 0 1 2",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=300, min_frequency=1, show_progress=False)


def tiny_model(vocab=300, seed=0, max_seq_len=64):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=vocab, max_seq_len=max_seq_len))


def conversation(question="Habari za asubuhi?", answer="Nzuri sana, asante.", task="chat"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task": task}


TWO_TURNS = [{"role": "user", "content": "Habari za asubuhi?"}, {"role": "assistant", "content": "Nzuri sana."},
             {"role": "user", "content": "Watoto wanacheza?"}, {"role": "assistant", "content": "Mpira uwanjani."}]


# ---- the loss mask ------------------------------------------------------------------------------
def test_labels_are_exactly_the_assistant_tokens_and_their_eos_after_the_shift(tokenizer):
    inputs, labels = tokenize_conversation(tokenizer, TWO_TURNS)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    expected_ids, trained = [bos], [False]
    for message in TWO_TURNS:
        content = tokenizer.encode(message["content"])
        is_assistant = message["role"] == "assistant"
        expected_ids += [tokenizer.role_id(message["role"])] + content + [eos]
        trained += [False] + [is_assistant] * (len(content) + 1)
    assert inputs == expected_ids[:-1]
    for t in range(len(inputs)):  # labels[t] is the target of position t: token t + 1, if trained
        assert labels[t] == (expected_ids[t + 1] if trained[t + 1] else IGNORE_INDEX), f"position {t}"
    n_answer_tokens = sum(len(tokenizer.encode(m["content"])) + 1 for m in TWO_TURNS if m["role"] == "assistant")
    assert sum(label != IGNORE_INDEX for label in labels) == n_answer_tokens


def test_masked_positions_get_zero_gradient(tokenizer):
    model = tiny_model()
    example = SFTExample(*tokenize_conversation(tokenizer, TWO_TURNS))
    batch = pad_batch([example, SFTExample(*tokenize_conversation(tokenizer, [TWO_TURNS[0], TWO_TURNS[1]]))],
                      tokenizer.pad_id)
    captured = {}

    def keep_hidden(module, args, output):  # the final hidden states: the loss is fused with lm_head
        output.retain_grad()
        captured["hidden"] = output

    def keep_embeddings(module, args, output):
        output.retain_grad()
        captured["embeddings"] = output

    handles = [model.model.norm.register_forward_hook(keep_hidden),
               model.model.embed_tokens.register_forward_hook(keep_embeddings)]
    loss, n = causal_lm_loss(model, batch)
    loss.backward()
    for h in handles:
        h.remove()
    masked = batch["labels"] == IGNORE_INDEX
    assert captured["hidden"].grad[masked].abs().max() == 0
    assert (captured["hidden"].grad[~masked].abs().sum(-1) > 0).all()
    # Padding after the short example influences nothing that is trained.
    short_pad = batch["attention_mask"][1] == 0
    assert short_pad.any() and captured["embeddings"].grad[1][short_pad].abs().max() == 0
    assert n == (~masked).sum()


def test_masked_loss_equals_hand_computation(tokenizer):
    model = tiny_model()
    batch = pad_batch([SFTExample(*tokenize_conversation(tokenizer, TWO_TURNS))], tokenizer.pad_id)
    loss, n = causal_lm_loss(model, batch)
    with torch.no_grad():
        logprobs = F.log_softmax(model(batch["input_ids"]).float(), -1)[0]
    labels = batch["labels"][0].tolist()
    by_hand = -sum(logprobs[t, y].item() for t, y in enumerate(labels) if y != IGNORE_INDEX)
    assert n.item() == sum(y != IGNORE_INDEX for y in labels)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


# ---- padding and packing ------------------------------------------------------------------------------
def per_example_losses(model, batch):
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   attention_mask=batch.get("attention_mask"), segment_ids=batch.get("segment_ids"))
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX, reduction="none")


def test_packed_rows_give_the_same_loss_per_example_as_one_at_a_time(tokenizer):
    model = tiny_model()
    rows = [conversation(), conversation("Watoto wanacheza?", "Mpira uwanjani pamoja na walimu wao."),
            {"messages": TWO_TURNS}]
    examples = [SFTExample(*tokenize_conversation(tokenizer, r["messages"])) for r in rows]
    seq_len = sum(len(e) for e in examples) + 5  # room for filler at the end
    assert pack_rows([len(e) for e in examples], seq_len) == [[0, 1, 2]]
    packed = packed_batch([examples], seq_len, tokenizer.pad_id)
    with torch.no_grad():
        packed_losses = per_example_losses(model, packed)[0]
        at = 0
        for example in examples:
            alone = per_example_losses(model, pad_batch([example], tokenizer.pad_id))[0]
            assert torch.allclose(packed_losses[at:at + len(example)], alone, atol=1e-5)
            assert packed["position_ids"][0, at:at + len(example)].tolist() == list(range(len(example)))
            at += len(example)
    assert (packed["labels"][0, at:] == IGNORE_INDEX).all() and (packed["segment_ids"][0, at:] == 0).all()
    assert packed["segment_ids"][0, :at].unique().tolist() == [1, 2, 3]


def test_padded_batch_gives_the_same_loss_per_example_as_one_at_a_time(tokenizer):
    model = tiny_model()
    examples = [SFTExample(*tokenize_conversation(tokenizer, r["messages"]))
                for r in (conversation(), {"messages": TWO_TURNS})]
    with torch.no_grad():
        padded = per_example_losses(model, pad_batch(examples, tokenizer.pad_id))
        for row, example in enumerate(examples):
            alone = per_example_losses(model, pad_batch([example], tokenizer.pad_id))[0]
            assert torch.allclose(padded[row, :len(example)], alone, atol=1e-5)
            assert (padded[row, len(example):] == 0).all()


def test_pack_rows_never_exceeds_seq_len_and_keeps_order():
    rows = pack_rows([5, 4, 3, 6, 1, 8], 10)
    assert rows == [[0, 1], [2, 3, 4], [5]]
    with pytest.raises(SFTDataError, match="more than seq_len"):
        pack_rows([11], 10)


# ---- reading -----------------------------------------------------------------------------------------
def test_malformed_rows_are_reported_with_file_and_line_and_skipped(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    good = json.dumps(conversation())
    path.write_text("\n".join([
        good,
        "{not json",
        json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
        "",
        good,
    ]) + "\n")
    rows, problems = read_conversations(path)
    assert len(rows) == 2
    assert [p.split(": ")[0] for p in problems] == [f"{path}, line {n}" for n in (2, 3, 4, 5, 6)]
    assert "not valid JSON" in problems[0] and "no 'role'" in problems[1]
    assert "empty assistant turn" in problems[2] and "unknown role 'robot'" in problems[3]
    assert "not a string" in problems[4]
    assert f"{path}, line 2" in capsys.readouterr().out
    with pytest.raises(SFTDataError, match=r"data.jsonl, line 2: not valid JSON"):
        read_conversations(path, strict=True)


def test_too_long_conversations_are_dropped_or_truncated_with_counts(tokenizer, capsys):
    long_question = " ".join(["Watoto wanacheza mpira uwanjani pamoja na walimu wao."] * 6)
    rows = [conversation(long_question, "Nzuri sana."), conversation()]
    dropped, stats = build_examples(tokenizer, rows, seq_len=40, too_long="drop")
    assert len(dropped) == 1 and stats["dropped"] == 1 and stats["too_long"] == 1
    assert "1 dropped" in capsys.readouterr().out
    kept, stats = build_examples(tokenizer, rows, seq_len=40, too_long="truncate")
    assert len(kept) == 2 and stats["truncated"] == 1 and len(kept[0]) <= 40
    answer = tokenizer.encode("Nzuri sana.") + [tokenizer.eos_id]
    assert [y for y in kept[0].labels if y != IGNORE_INDEX] == answer  # the prompt was cut, not the answer


def test_shorten_prompt_cuts_the_middle_of_user_content_only(tokenizer):
    ids, mask = tokenizer.apply_chat_template(conversation("a b c d e f g h i j k l", "x")["messages"])
    roles = {tokenizer.role_id(r) for r in ("system", "user", "assistant")}
    short, short_mask = shorten_prompt(ids, mask, len(ids) - 4, roles)
    assert len(short) == len(ids) - 4
    assert short[:3] == ids[:3] and short[-6:] == ids[-6:]  # head of the content, its tail and the answer
    assert [m for m in short_mask if m] == [m for m in mask if m]


# ---- the batch source ---------------------------------------------------------------------------------
def make_examples(n=13):
    return [SFTExample(list(range(1, 3 + i % 5)), [5] * (2 + i % 5), task=str(i)) for i in range(n)]


def step_examples(batches):
    """The unpadded examples of one step's micro batches, as tuples."""
    out = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            out.append(tuple(ids[mask.bool()].tolist()))
    return out


def test_global_batch_is_the_same_for_any_world_size():
    examples = make_examples()
    one = SFTBatches(examples, micro_batch=2, accum=2, world=1, seed=3)
    ranks = [SFTBatches(examples, micro_batch=2, accum=1, rank=r, world=2, seed=3) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary (13 examples, 4 per step)
        together = step_examples(one.next_step())
        split = step_examples(ranks[0].next_step()) + step_examples(ranks[1].next_step())
        assert together == split


def test_each_epoch_is_a_seeded_permutation_and_resume_continues_the_stream():
    examples = [SFTExample([i + 1], [i + 1]) for i in range(12)]
    source = SFTBatches(examples, micro_batch=4, accum=1, seed=1)
    epoch = [x for _ in range(3) for x in step_examples(source.next_step())]
    assert sorted(epoch) == [(i + 1,) for i in range(12)] and epoch != sorted(epoch)
    state = source.state_dict()
    expected = [step_examples(source.next_step()) for _ in range(4)]
    resumed = SFTBatches(examples, micro_batch=4, accum=1, seed=1)
    resumed.load_state_dict(state)
    assert [step_examples(resumed.next_step()) for _ in range(4)] == expected
    with pytest.raises(ValueError, match="global_batch"):
        SFTBatches(examples, micro_batch=2, accum=1, seed=1).load_state_dict(state)


def test_pack_mode_yields_rows_of_seq_len_with_every_example_once_per_epoch():
    examples = make_examples(10)
    source = SFTBatches(examples, micro_batch=1, accum=1, batching="pack", seq_len=12, seed=0)
    n_rows = len(source.units(0))
    assert n_rows < len(examples)  # several examples share a row
    labels_seen = 0
    for _ in range(n_rows):  # one packed row per step: exactly one epoch
        (batch,) = source.next_step()
        assert batch["input_ids"].shape == (1, 12) and set(batch) >= {"segment_ids", "position_ids"}
        labels_seen += int((batch["labels"] != IGNORE_INDEX).sum())
    assert labels_seen == sum(len(e.labels) for e in examples)
    assert source.state_dict()["epoch"] == 1 and source.state_dict()["position"] == 0


# ---- NEFTune ---------------------------------------------------------------------------------------------
def test_neftune_adds_bounded_noise_only_when_training_with_gradients():
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 10))
    clean = model.model.embed_tokens(ids)
    handle = add_neftune(model, alpha=5.0)
    noisy = model.model.embed_tokens(ids)
    bound = 5.0 / (10 * model.config.d_model) ** 0.5
    assert not torch.equal(noisy, clean) and (noisy - clean).abs().max() <= bound + 1e-6
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), clean)
    model.eval()
    assert torch.equal(model.model.embed_tokens(ids), clean)
    model.train()
    handle.remove()
    assert torch.equal(model.model.embed_tokens(ids), clean)


# ---- sft_train.py end to end -------------------------------------------------------------------------------
def test_sft_train_runs_end_to_end_in_two_stages(tmp_path, tokenizer):
    import sft_train

    tokenizer.save(tmp_path / "tokenizer.json")
    ckpt.save_checkpoint(tmp_path / "base", tiny_model(), tmp_path / "tokenizer.json")
    data = tmp_path / "sft"
    data.mkdir()
    rows = [conversation(task="translation"), conversation("Watoto wanacheza?", "Chanya", task="sentiment")] * 8
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", str(data), "--max-steps", "3", "--global-batch", "4", "--micro-batch", "2",
              "--eval-every", "3", "--save-every", "3", "--warmup-steps", "1", "--log-every", "1"]
    first = sft_train.main(["--init-from", str(tmp_path / "base"), "--out", str(tmp_path / "stage1"),
                            "--tasks", "translation", "--batching", "pack", "--neftune-alpha", "5", *common])
    assert first["step"] == 3 and "val_loss" in first and "val_loss_translation" in first
    assert "val_loss_sentiment" not in first
    second = sft_train.main(["--init-from", str(tmp_path / "stage1"), "--out", str(tmp_path / "stage2"), *common])
    assert "val_loss_sentiment" in second
    assert (tmp_path / "stage2" / "step_000003" / "model.safetensors").is_file()
    info = json.loads((tmp_path / "stage2" / "step_000003" / "lillm.json").read_text())
    assert info["stage"] == "sft" and info["origin"].endswith("step_000003")
