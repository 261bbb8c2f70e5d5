import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lillm import checkpoint as ckpt
from lillm.challenge import classification_pairs, translation_pairs
from lillm.config import get_preset
from lillm.dpo import (
    DPOConfig,
    DPOLoss,
    PreferenceBatches,
    adapters_disabled,
    add_reference_logps,
    build_pairs,
    packed_pair_batch,
    pair_batch,
    preference_metrics,
    sequence_logps,
    tokenize_pair,
)
from lillm.errors import DPODataError
from lillm.model import Transformer
from lillm.peft import apply_peft
from lillm.rows import read_pairs, read_user_pairs
from lillm.sft import IGNORE_INDEX
from lillm.tokenizer import train_bpe

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


def tiny_model(seed=0, max_seq_len=256):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", vocab_size=300, max_seq_len=max_seq_len))


def pair_row(prompt="Habari za asubuhi?", chosen="Nzuri sana, asante.", rejected="Hasi", task="chat"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task}


ROWS = [pair_row(),
        {"messages": [{"role": "user", "content": "Translate this English text into Swahili."},
                      {"role": "assistant", "content": "Sawa."},
                      {"role": "user", "content": "The children play football."}],
         "chosen": "Watoto wanacheza mpira.", "rejected": "Watoto wao.", "task": "translation"},
        pair_row("Tambua hisia: Mun gode ƙwarai", "Kyakkyawa", "Korau", task="sentiment")]


def pairs_of(tokenizer, rows=ROWS, seq_len=160):
    pairs, _ = build_pairs(tokenizer, rows, seq_len, verbose=False)
    assert len(pairs) == len(rows)
    return pairs


def logp_by_hand(model, example) -> float:
    """Summed log-probability of an example's labelled tokens, one sequence alone."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([example.input_ids])).float(), -1)[0]
    return sum(logprobs[t, y].item() for t, y in enumerate(example.labels) if y != IGNORE_INDEX)


# ---- tokenizing ------------------------------------------------------------------------------------------
def test_both_answers_follow_the_same_prompt_and_only_answers_are_labelled(tokenizer):
    pair = tokenize_pair(tokenizer, ROWS[1])
    prompt, _ = tokenizer.apply_chat_template(ROWS[1]["messages"], add_generation_prompt=True)
    for example, text in ((pair.chosen, ROWS[1]["chosen"]), (pair.rejected, ROWS[1]["rejected"])):
        assert example.input_ids[:len(prompt)] == prompt
        assert [y for y in example.labels if y != IGNORE_INDEX] == tokenizer.encode(text) + [tokenizer.eos_id]
        assert example.labels[:len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)  # earlier turns too
    long_prompt = pair_row(" ".join(["Watoto wanacheza mpira uwanjani pamoja na walimu wao."] * 8))
    short = tokenize_pair(tokenizer, long_prompt, seq_len=40, too_long="truncate")
    assert max(len(short.chosen), len(short.rejected)) <= 40
    n_prompt = len(short.chosen) - len(tokenizer.encode(long_prompt["chosen"])) - 1
    assert short.chosen.input_ids[:n_prompt + 1] == short.rejected.input_ids[:n_prompt + 1]
    assert tokenize_pair(tokenizer, long_prompt, seq_len=40, too_long="drop") is None


def test_malformed_preference_rows_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(pair_row()), "{oops", json.dumps({"prompt": "x", "chosen": "a"}),
                               json.dumps(pair_row(chosen="same", rejected="same")),
                               json.dumps({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}],
                                           "chosen": "b", "rejected": "c"})]) + "\n")
    rows, problems = read_pairs(path)
    assert len(rows) == 1 and [p.split(": ")[0] for p in problems] == [f"{path}, line {n}" for n in (2, 3, 4, 5)]
    assert "'rejected'" in problems[1] and "same text" in problems[2] and "ends with an assistant" in problems[3]
    with pytest.raises(DPODataError, match="line 2"):
        read_pairs(path, strict=True)


# ---- the loss -------------------------------------------------------------------------------------------
def test_loss_equals_a_hand_computation_on_a_two_pair_batch(tokenizer):
    model = tiny_model()
    pairs = pairs_of(tokenizer, ROWS[:2])
    pairs[0].ref_logps, pairs[1].ref_logps = (-20.5, -9.25), (-30.0, -31.5)
    batch = pair_batch(pairs, tokenizer.pad_id)
    for cfg in (DPOConfig("dpo", beta=0.1), DPOConfig("dpo", beta=0.5, label_smoothing=0.2),
                DPOConfig("simpo", beta=2.0, gamma=0.5, label_smoothing=0.1)):
        loss, count = DPOLoss(cfg)(model, batch)
        expected = 0.0
        for pair in pairs:
            lc, lr = logp_by_hand(model, pair.chosen), logp_by_hand(model, pair.rejected)
            if cfg.loss_type == "dpo":
                h = cfg.beta * ((lc - pair.ref_logps[0]) - (lr - pair.ref_logps[1]))
            else:
                n_c = sum(y != IGNORE_INDEX for y in pair.chosen.labels)
                n_r = sum(y != IGNORE_INDEX for y in pair.rejected.labels)
                h = cfg.beta * (lc / n_c - lr / n_r) - cfg.gamma
            sig = 1 / (1 + math.exp(-h))
            expected += -(1 - cfg.label_smoothing) * math.log(sig) - cfg.label_smoothing * math.log(1 - sig)
        assert count.item() == 2
        assert loss.item() == pytest.approx(expected, rel=1e-5), cfg


def test_at_initialisation_the_loss_is_log_2_the_margins_0_and_accuracy_one_half(tokenizer):
    model = tiny_model()
    pairs = add_reference_logps(model, pairs_of(tokenizer), batch_size=2, pad_id=tokenizer.pad_id)
    cfg = DPOConfig("dpo", beta=0.1)
    loss, count = DPOLoss(cfg)(model, pair_batch(pairs, tokenizer.pad_id))
    assert loss.item() / count.item() == pytest.approx(math.log(2), abs=1e-6)
    metrics = preference_metrics(model, pairs, cfg, batch_size=2, pad_id=tokenizer.pad_id)
    assert metrics["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["val_reward_margin"] == pytest.approx(0, abs=1e-5)
    assert metrics["val_chosen_reward"] == pytest.approx(0, abs=1e-5)
    assert metrics["val_reward_accuracy"] == 0.5 and metrics["val_reward_accuracy_sentiment"] == 0.5


def test_gradients_flow_only_through_the_policy(tokenizer):
    model = tiny_model()
    pairs = add_reference_logps(model, pairs_of(tokenizer), pad_id=tokenizer.pad_id)
    with torch.no_grad():  # move the policy away from the reference so the weights are not all 1/2
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = pair_batch(pairs, tokenizer.pad_id)
    assert not batch["ref_logps"].requires_grad
    cfg = DPOConfig("dpo", beta=0.5)
    loss, _ = DPOLoss(cfg)(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # d loss / d theta = -beta * sigmoid(-h) * (grad log pi(y_c) - grad log pi(y_r)): the reference is a constant.
    logps, _ = sequence_logps(model, batch)
    n = len(pairs)
    h = cfg.beta * ((logps[:n] - batch["ref_logps"][:n]) - (logps[n:] - batch["ref_logps"][n:]))
    weight = (-cfg.beta * torch.sigmoid(-h)).detach()
    surrogate = (weight * (logps[:n] - logps[n:])).sum()
    expected = torch.autograd.grad(surrogate, list(model.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_masked_prompt_tokens_contribute_nothing(tokenizer):
    model = tiny_model()
    pairs = add_reference_logps(model, pairs_of(tokenizer), pad_id=tokenizer.pad_id)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = pair_batch(pairs, tokenizer.pad_id)
    captured = {}

    def keep_hidden(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = model.model.norm.register_forward_hook(keep_hidden)
    loss, _ = DPOLoss(DPOConfig())(model, batch)
    loss.backward()
    handle.remove()
    masked = batch["labels"] == IGNORE_INDEX
    assert masked.sum() > 0 and captured["hidden"].grad[masked].abs().max() == 0
    assert (captured["hidden"].grad[~masked].abs().sum(-1) > 0).all()


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tokenizer):
    model = tiny_model()
    pairs = add_reference_logps(model, pairs_of(tokenizer), pad_id=tokenizer.pad_id)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_fn = DPOLoss(DPOConfig(beta=0.3, label_smoothing=0.1))
    seq_len = 200
    rows = [[pairs[0], pairs[1]], [pairs[2]]]  # two pairs share a row, with filler after them
    assert sum(len(p) for p in rows[0]) < seq_len
    results = []
    for batch in (pair_batch(pairs, tokenizer.pad_id), packed_pair_batch(rows, seq_len, tokenizer.pad_id)):
        model.zero_grad()
        loss, count = loss_fn(model, batch)
        loss.backward()
        results.append((loss.item(), count.item(), [p.grad.clone() for p in model.parameters()]))
    (padded, n1, g1), (packed, n2, g2) = results
    assert n1 == n2 == 3 and packed == pytest.approx(padded, rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_pack_mode_keeps_every_pair_whole_in_one_micro_batch(tokenizer):
    pairs = add_reference_logps(tiny_model(), pairs_of(tokenizer) * 3, pad_id=tokenizer.pad_id)
    source = PreferenceBatches(pairs, micro_batch=1, accum=2, batching="pack", seq_len=200, seed=0)
    seen = 0
    for _ in range(3):
        for batch in source.next_step():
            n = int(batch["loss_count"])
            ids = batch["sequence_ids"][batch["labels"] != IGNORE_INDEX]
            assert set(ids.tolist()) == set(range(2 * n)) and batch["ref_logps"].shape == (2 * n,)
            seen += n
    assert seen >= len(pairs)


# ---- LoRA: the reference is the model with its adapters off --------------------------------------------
def test_lora_dpo_holds_one_copy_of_the_base_weights(tokenizer):
    base = tiny_model()
    plain = tiny_model()  # an independent copy, for the test's comparison only
    base_params = {name: p for name, p in base.named_parameters()}
    model = apply_peft(base, "lora", targets="all", rank=4)
    assert model is base
    for name, p in model.named_parameters():  # the frozen weights ARE the base's Parameters, not copies
        if "lora_" not in name:
            assert p is base_params[name] and not p.requires_grad
    n_base = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == n_base
    with torch.no_grad():  # a "trained" adapter: the policy now differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pairs = pairs_of(tokenizer)
    reference = [v for p in add_reference_logps(model, pairs, pad_id=tokenizer.pad_id) for v in p.ref_logps]
    expected = [logp_by_hand(plain, s) for p in pairs for s in (p.chosen, p.rejected)]
    assert reference == pytest.approx(expected, rel=1e-5)
    policy = [logp_by_hand(model, s) for p in pairs for s in (p.chosen, p.rejected)]
    assert policy != pytest.approx(expected, rel=1e-3)  # adapters are back on after the reference pass
    loss, _ = DPOLoss(DPOConfig())(model, pair_batch(pairs, tokenizer.pad_id))
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_adapters_disabled_covers_prefix_and_houlsby_adapters(tokenizer):
    pairs = pairs_of(tokenizer)
    expected = [(logp_by_hand(tiny_model(), p.chosen)) for p in pairs]
    for method in ("prefix", "adapters"):
        model = apply_peft(tiny_model(), method, prefix_length=4, adapter_size=8)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1)
        with adapters_disabled(model):
            assert [logp_by_hand(model, p.chosen) for p in pairs] == pytest.approx(expected, rel=1e-5)
        assert [logp_by_hand(model, p.chosen) for p in pairs] != pytest.approx(expected, rel=1e-3)


# ---- building pairs -------------------------------------------------------------------------------------------
def sft_row(task, label=None, answer=None, options=None, source="x:1", lang="swa"):
    row = {"messages": [{"role": "user", "content": "Tambua hisia: Habari"},
                        {"role": "assistant", "content": answer or label}], "task": task, "lang": lang,
           "source": source, "input": "Habari"}
    if label is not None:
        row |= {"label": label, "options": options}
    return row


def test_classification_pairs_put_the_gold_label_against_a_wrong_one():
    rows = [sft_row("sentiment", "Chanya", options=["Chanya", "Wastani", "Hasi"], source=f"s:{i}") for i in range(20)]
    pairs = classification_pairs(rows, seed=0)
    assert len(pairs) == 20 and all(p["chosen"] == "Chanya" and p["rejected"] in ("Wastani", "Hasi") for p in pairs)
    assert {p["rejected"] for p in pairs} == {"Wastani", "Hasi"}  # the wrong label varies by row
    assert pairs == classification_pairs(rows, seed=0)  # deterministic
    assert pairs[0]["messages"] == rows[0]["messages"][:1]
    assert len(classification_pairs(rows[:2], negatives="all")) == 4


def test_translation_pairs_reject_the_models_own_worse_sample(tokenizer):
    rows = [sft_row("translation", answer="Watoto wanacheza mpira.", source=f"t:{i}") for i in range(3)]
    pairs, stats = translation_pairs(tiny_model(), tokenizer, rows, samples=2, max_new_tokens=8, batch_size=2)
    assert stats["sources"] == 3 and stats["pairs"] == len(pairs) >= 1
    for pair in pairs:
        assert pair["chosen"] == "Watoto wanacheza mpira." and pair["rejected"] != pair["chosen"]
        assert pair["rejected_chrf"] < 100


def test_user_files_in_jsonl_and_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [pair_row(), pair_row("Sannu", "Mun gode", "Korau")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("pairs.parquet", "pairs.jsonl"):
        got, problems = read_user_pairs(tmp_path / name)
        assert not problems and [(r["prompt"], r["chosen"]) for r in got] == [(r["prompt"], r["chosen"]) for r in rows]
    with pytest.raises(DPODataError, match="unknown file type"):
        read_user_pairs(tmp_path / "pairs.txt")


# ---- dpo_train.py end to end, and an exact resume ------------------------------------------------------------
def make_run_inputs(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    ckpt.save_checkpoint(tmp_path / "sft", tiny_model(), tmp_path / "tokenizer.json")
    data = tmp_path / "dpo"
    data.mkdir()
    rows = ROWS * 4
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--init-from", str(tmp_path / "sft"), "--data", str(data), "--global-batch", "4", "--micro-batch", "2",
            "--warmup-steps", "1", "--log-every", "1", "--lr", "1e-3", "--beta", "0.5"]


def test_dpo_train_learns_the_preferences_and_logs_rewards(tmp_path, tokenizer):
    import dpo_train

    common = make_run_inputs(tmp_path, tokenizer)
    metrics = dpo_train.main([*common, "--out", str(tmp_path / "run"), "--max-steps", "6", "--eval-every", "6",
                              "--save-every", "6", "--batching", "pack"])
    assert metrics["val_reward_accuracy"] > 0.5 and metrics["val_loss"] < math.log(2)
    assert metrics["val_reward_margin"] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("val_reward_accuracy_translation" in record for record in log)
    info = json.loads((tmp_path / "run" / "step_000006" / "lillm.json").read_text())
    assert info["stage"] == "dpo"
    lora = dpo_train.main([*common, "--out", str(tmp_path / "lora"), "--max-steps", "2", "--eval-every", "2",
                           "--save-every", "2", "--peft", "lora", "--lora-targets", "all", "--loss", "simpo"])
    assert "val_reward_accuracy" in lora
    assert (tmp_path / "lora" / "step_000002" / "peft.json").is_file()


def test_resume_is_exact(tmp_path, tokenizer):
    import dpo_train

    common = make_run_inputs(tmp_path, tokenizer) + ["--max-steps", "4", "--save-every", "2", "--eval-every", "4",
                                                    "--label-smoothing", "0.1"]
    dpo_train.main([*common, "--out", str(tmp_path / "whole")])
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copytree(tmp_path / "whole" / "step_000002", partial / "step_000002")  # as if stopped after step 2
    dpo_train.main([*common, "--out", str(partial), "--resume"])
    whole = ckpt.read_weights(tmp_path / "whole" / "step_000004" / ckpt.WEIGHTS)
    resumed = ckpt.read_weights(partial / "step_000004" / ckpt.WEIGHTS)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
