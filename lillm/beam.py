"""Beam search: keep the k best partial outputs instead of one, for translation.

Greedy decoding commits to the likeliest next token; a sentence whose first word is only second
likeliest can still be the likelier sentence. Beam search (as in neural MT since Sutskever et al.,
2014) keeps, for each prompt, the `beam` partial outputs with the highest summed log-probability,
extends each by every token, and keeps the best `beam` of those. A hypothesis ends at `</s>`; it
is then scored by its log-probability divided by length^alpha (Wu et al., 2016, GNMT's length
penalty, simplified): without it, short outputs win because every token costs probability. A
prompt is done when `beam` hypotheses have ended (transformers' early_stopping=True).

All beams of all prompts decode as one batch of prompts x beam rows through the KV cache
(lillm/model.py); after each step the cache rows are reordered to follow the surviving beams.
`no_repeat_ngram` bans, per beam, the tokens that would repeat one of its own n-grams (as
lillm.generate.NoRepeatNgram does for greedy decoding). Beam 1 is greedy decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .generate import left_pad
from .model import Transformer


def _banned(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in history."""
    if n < 1 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - n + 1:])
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix}


def _reorder_cache(model: Transformer, rows: torch.Tensor) -> None:
    for block in model.model.layers:
        cache = block.self_attn.cache
        cache.k = cache.k.index_select(0, rows)
        cache.v = cache.v.index_select(0, rows)


@torch.no_grad()
def beam_search(model: Transformer, prompts: list[list[int]], max_new_tokens: int, beam: int = 4,
                eos_id: int | None = None, pad_id: int = 0, length_penalty: float = 1.0,
                no_repeat_ngram: int = 0) -> list[list[int]]:
    """The best output (new token ids, `</s>` not included) for each prompt."""
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    device = model.model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    n_prompts, prompt_len = ids.shape
    ids, mask = ids.repeat_interleave(beam, 0), mask.repeat_interleave(beam, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model.setup_cache(n_prompts * beam, prompt_len + max_new_tokens)
    try:
        hidden = model(ids, position_ids=positions, attention_mask=mask, cache_pos=0, return_hidden=True)
        logprobs = F.log_softmax(model.lm_head(hidden[:, -1]).float(), dim=-1)
        vocab = logprobs.shape[-1]
        scores = torch.full((n_prompts, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # every beam starts as the same prompt: only one may expand at first
        histories: list[list[int]] = [[] for _ in range(n_prompts * beam)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n_prompts)]
        for step in range(max_new_tokens):
            for row, history in enumerate(histories):
                banned = _banned(history, no_repeat_ngram) if no_repeat_ngram else ()
                if banned:
                    logprobs[row, list(banned)] = float("-inf")
            candidates = (scores[:, :, None] + logprobs.view(n_prompts, beam, vocab)).view(n_prompts, -1)
            top_scores, top_index = candidates.topk(2 * beam, dim=-1)
            next_rows, next_tokens, next_scores = [], [], []
            for p in range(n_prompts):
                kept = 0
                for rank, (score, index) in enumerate(zip(top_scores[p].tolist(), top_index[p].tolist())):
                    source, token = p * beam + index // vocab, index % vocab
                    if score == float("-inf"):
                        break
                    if token == eos_id or step == max_new_tokens - 1:
                        if rank >= beam:  # an ending below the best `beam` candidates does not count
                            continue
                        ended = histories[source] + ([] if token == eos_id else [token])
                        if len(finished[p]) < beam:  # step + 1 tokens scored, the `</s>` among them
                            finished[p].append((score / (step + 1) ** length_penalty, ended))
                        continue
                    if kept < beam and len(finished[p]) < beam:
                        next_rows.append(source)
                        next_tokens.append(token)
                        next_scores.append(score)
                        kept += 1
                while kept < beam:  # a prompt that is done (or out of candidates) keeps dead rows
                    next_rows.append(p * beam)
                    next_tokens.append(pad_id)
                    next_scores.append(float("-inf"))
                    kept += 1
            if all(len(f) >= beam for f in finished) or step == max_new_tokens - 1:
                break
            rows = torch.tensor(next_rows, device=device)
            histories = [histories[r] + [t] for r, t in zip(next_rows, next_tokens)]
            scores = torch.tensor(next_scores, device=device).view(n_prompts, beam)
            _reorder_cache(model, rows)
            positions = positions[rows]
            mask = mask[rows]
            token = torch.tensor(next_tokens, device=device)[:, None]
            logits = model(token, position_ids=positions[:, -1:] + 1 + step, attention_mask=mask,
                           cache_pos=prompt_len + step)[:, -1]
            logprobs = F.log_softmax(logits.float(), dim=-1)
    finally:
        model.clear_cache()
    return [max(f, key=lambda pair: pair[0])[1] if f else [] for f in finished]
