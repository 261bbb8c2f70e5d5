"""The local server (lillm.serve): OpenAI-shaped answers equal to lillm.generate's, requests that never
mix, 4xx for every bad request, the inference.py flag, and the chat page in a real headless browser."""
import copy
import http.client
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.errors import FlagError
from lillm.generate import StaticDecoder, generate
from lillm.model import Transformer
from lillm.batching import Engine, Job, StopMatcher
from lillm.serve import ChatServer, Defaults
from lillm.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent
TEXT = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau.", "Sawubona, unjani namhlanje?"] * 20
USER = [{"role": "user", "content": "Habari za asubuhi?"}]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = train_bpe(TEXT, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    # init_std 0.2: at the presets' 0.02 a random model only echoes its last token, and answers
    # that are all alike could not show two requests mixing.
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.2)).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # The server's worker owns its model (generation hangs a KV cache on it): the tests' reference
    # generations run on the original, the server on a copy.
    with ChatServer(copy.deepcopy(model), tokenizer, model_name="tiny", port=0, log=lambda record: None,
                    defaults=Defaults(max_tokens=16, temperature=0.0)) as running:
        yield running


def post(server, path, body, headers=None, raw=None):
    """(status, parsed JSON or the list of SSE data payloads)."""
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    connection.request("POST", path, body=data, headers=headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read().decode("utf-8")
    connection.close()
    if response.getheader("Content-Type", "").startswith("text/event-stream"):
        assert payload.endswith("data: [DONE]\n\n")
        blocks = [b for b in payload.split("\n\n") if b]
        assert all(b.startswith("data: ") for b in blocks)
        return response.status, [json.loads(b[6:]) for b in blocks[:-1]]
    return response.status, json.loads(payload)


def get(server, path):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read().decode("utf-8")


def expected_text(model, tokenizer, prompt_ids, max_tokens, **sampling):
    tokens = generate(model, [prompt_ids], max_new_tokens=max_tokens, eos_id=tokenizer.eos_id,
                      pad_id=tokenizer.pad_id, **({"temperature": 0} | sampling))[0]
    return tokenizer.decode(tokens), len(tokens), "stop" if tokens[-1] == tokenizer.eos_id else "length"


def chat_text(chunks):
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def answer_of(kind, status, result):
    """The text of a completion, streamed or not."""
    assert status == 200, result
    if isinstance(result, list):
        return chat_text(result) if kind == "chat" else "".join(c["choices"][0]["text"] for c in result)
    return result["choices"][0]["message"]["content"] if kind == "chat" else result["choices"][0]["text"]


# ----------------------------------------------------------------------------- answers
def test_chat_completion_equals_generate_on_the_chat_template(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    status, body = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 12, "temperature": 0})
    prompt, _ = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    text, n_tokens, finish = expected_text(model, tokenizer, prompt, 12)
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish}]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n_tokens,
                             "total_tokens": len(prompt) + n_tokens}


def test_streamed_chat_is_the_same_text_in_openai_chunks(server):
    request = {"messages": USER, "max_tokens": 12, "temperature": 0}
    _, whole = post(server, "/v1/chat/completions", request)
    status, chunks = post(server, "/v1/chat/completions",
                          request | {"stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) > 4  # the text came in pieces, not at the end
    assert chat_text(chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert len({c["id"] for c in chunks}) == 1


def test_completions_streamed_and_not_equal_generate(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text, n_tokens, finish = expected_text(model, tokenizer, tokenizer.encode("Ina kwana", add_bos=True), 10)
    status, body = post(server, "/v1/completions", {"prompt": "Ina kwana", "max_tokens": 10, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == finish
    assert body["usage"]["completion_tokens"] == n_tokens
    status, chunks = post(server, "/v1/completions", {"prompt": "Ina kwana", "max_tokens": 10, "temperature": 0,
                                                      "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    # token ids are a prompt too
    ids = tokenizer.encode("Ina kwana", add_bos=True)
    by_ids = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0})[1]
    assert by_ids["choices"] == body["choices"] and by_ids["usage"] == body["usage"]


def test_a_seeded_sampled_request_reproduces_and_equals_generate(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    request = {"prompt": "Sawubona", "max_tokens": 12, "temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 7}
    first = post(server, "/v1/completions", request)[1]["choices"][0]["text"]
    assert post(server, "/v1/completions", request)[1]["choices"][0]["text"] == first
    text, _, _ = expected_text(model, tokenizer, tokenizer.encode("Sawubona", add_bos=True), 12,
                               temperature=1.0, top_k=40, top_p=0.9, seed=7)
    assert first == text


def test_models_health_and_the_chat_page(server):
    status, _, body = get(server, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    status, content_type, page = get(server, "/")
    assert status == 200 and content_type.startswith("text/html") and "/v1/chat/completions" in page
    assert get(server, "/health")[0] == 200
    assert get(server, "/nowhere")[0] == 404


# ----------------------------------------------------------------------------- no mixing
REQUESTS = [("chat", {"messages": [{"role": "user", "content": text}], "max_tokens": n, "temperature": 0,
                      "stream": n % 2 == 0})
            for text, n in [("Habari?", 14), ("Ina kwana? Lafiya lau.", 9), ("Sawubona", 20), ("unjani", 5)]] + \
           [("text", {"prompt": text, "max_tokens": n, "temperature": 0, "stream": n % 2 == 1})
            for text, n in [("Habari za", 11), ("Lafiya", 16), ("Sawubona, unjani namhlanje?", 7), ("I", 13)]]
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}


def test_eight_concurrent_requests_get_the_answers_they_get_one_by_one(server):
    alone = [answer_of(kind, *post(server, PATHS[kind], body)) for kind, body in REQUESTS]
    assert len(set(alone)) == len(alone)  # distinct answers, so a mix-up would show
    together = [None] * len(REQUESTS)
    start = threading.Barrier(len(REQUESTS))

    def call(index, kind, body):
        start.wait()
        together[index] = answer_of(kind, *post(server, PATHS[kind], body))
    threads = [threading.Thread(target=call, args=(i, *r)) for i, r in enumerate(REQUESTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


PROMPTS = ["Habari", "Ina kwana? Lafiya", "S", "unjani namhla", "Lafiya lau.", "rafiki", "za asubuhi, rafiki", "Ina"]


def engine_jobs(tokenizer, sampled=()):
    """A job per PROMPTS line, max_tokens 6, 9, ...; the rows in `sampled` sample with a seed of their own."""
    jobs = []
    for i, text in enumerate(PROMPTS):
        options = dict(temperature=1.0, top_p=0.9, top_k=40, seed=100 + i) if i in sampled else \
            dict(temperature=0.0, top_p=None, top_k=None, seed=None)
        jobs.append(Job(tokenizer.encode(text, add_bos=True), max_tokens=6 + 3 * i, **options))
    return jobs


def run_until_idle(engine, jobs):
    """Queue the jobs and drive the engine (no thread) until every one has ended."""
    for job in jobs:
        engine.submit(job)
    while engine.busy() or not engine.jobs.empty():
        engine.work_once()


def received(job):
    """(text, final event) of a job that has ended."""
    pieces = []
    while (event := job.events.get(timeout=30))[0] == "text":
        pieces.append(event[1])
    return "".join(pieces), event


def alone(model, tokenizer, job):
    sampling = dict(temperature=job.temperature, top_p=job.top_p, top_k=job.top_k, seed=job.seed)
    text, n_tokens, finish = expected_text(model, tokenizer, job.prompt, job.max_tokens, **sampling)
    return text, ("end", finish, n_tokens)


def new_engine(model, tokenizer, slots, step="eager", backend="eager"):
    """An Engine on a copy of the model; step "fixed" runs every decoding step through a StaticDecoder
    (all slots, the whole cache): backend "eager" traces it with torch.compile's graph capture without
    compiling (fast, and proves one graph), "inductor" compiles it (the server's --compile on a CPU)."""
    copied = copy.deepcopy(model)
    decoder = StaticDecoder(copied, backend=backend, mode=None) if step == "fixed" else None
    engine = Engine(copied, tokenizer, slots=slots, decoder=decoder)
    engine.warm_up()
    return engine


@pytest.mark.parametrize("step", ["eager", "fixed"])
def test_greedy_and_seeded_requests_share_the_batch_and_each_decodes_as_alone(model_and_tokenizer, step):
    """8 jobs queued before the worker starts fill the 8 slots at once: prompts of different lengths,
    different max_tokens, greedy and sampled rows together; each answer equals lillm.generate alone."""
    model, tokenizer = model_and_tokenizer
    engine = new_engine(model, tokenizer, 8, step)
    jobs = engine_jobs(tokenizer, sampled={1, 4, 6})
    for job in jobs:
        engine.submit(job)
    engine.start()
    try:
        for job in jobs:
            assert received(job) == alone(model, tokenizer, job)
    finally:
        engine.stop()
    assert max(engine.batch_sizes) == 8 and all(job.first_step == 0 for job in jobs)


@pytest.mark.parametrize("step", ["eager", "fixed"])
def test_a_request_arriving_mid_batch_joins_at_the_next_step(model_and_tokenizer, step):
    """Counted in decoding steps (the test drives the engine one step at a time, no thread): a request
    submitted while two long ones run gets its first token at the next step and ends long before them."""
    model, tokenizer = model_and_tokenizer
    engine = new_engine(model, tokenizer, 4, step)
    first, second, late = engine_jobs(tokenizer, sampled={1})[5:8]  # max_tokens 21, 24 and 27
    late.max_tokens = 4
    engine.submit(first)
    engine.submit(second)
    for _ in range(5):
        engine.work_once()
    engine.submit(late)
    engine.work_once()
    assert late.first_step == 5 and engine.busy() == 3  # joined after step 5, decoded in step 6
    while engine.busy():
        engine.work_once()
    assert late.end_step == 5 + 3 < first.end_step < second.end_step
    for job in (first, second, late):
        assert received(job) == alone(model, tokenizer, job)
    engine.model.clear_cache()


@pytest.mark.parametrize("step", ["eager", "fixed"])
def test_a_finished_request_frees_its_slot_for_the_next_at_once(model_and_tokenizer, step):
    model, tokenizer = model_and_tokenizer
    engine = new_engine(model, tokenizer, 1, step)
    jobs = engine_jobs(tokenizer)[:3]
    run_until_idle(engine, jobs)
    assert [job.first_step for job in jobs[1:]] == [job.end_step for job in jobs[:-1]]
    assert set(engine.batch_sizes) == {1}
    for job in jobs:
        assert received(job) == alone(model, tokenizer, job)
    engine.model.clear_cache()


def test_compiled_steps_switch_to_the_whole_cache_when_a_row_passes_the_short_one():
    """A context of 256: a long request crosses the 128 positions of the short compiled shapes mid-answer
    while a short one runs beside it; both answers equal generate alone, and both cache lengths ran."""
    tokenizer = train_bpe(TEXT, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.2, max_seq_len=256)).eval()
    engine = new_engine(model, tokenizer, 2, "fixed")
    long_prompt = tokenizer.encode(" ".join(TEXT[:9]), add_bos=True)
    assert 100 < len(long_prompt) < 128
    jobs = [Job(long_prompt, max_tokens=40, temperature=0.0, top_p=None, top_k=None, seed=None)] + \
        engine_jobs(tokenizer)[:1]
    run_until_idle(engine, jobs)
    for job in jobs:
        assert received(job) == alone(model, tokenizer, job)
    assert engine.compiled_shapes() == [(1, 128), (1, 256), (2, 128), (2, 256)] == \
        sorted((end, length) for start, end, length in engine.views if start == 0)
    assert engine.step_shapes[(2, 128)] > 0 and engine.step_shapes[(1, 256)] + engine.step_shapes[(2, 256)] > 0
    engine.model.clear_cache()


@pytest.mark.slow
def test_the_inductor_compiled_server_step_serves_the_answers_of_the_eager_one(model_and_tokenizer):
    """inference.py --serve --compile on a CPU: the step compiled by inductor (C++), one compile per
    engine (warm_up). fp32: 8 requests with prompts of different lengths, greedy and sampled, each as
    generate alone. int8 rounds a call's activations with one scale for all its rows, so a row's
    logits depend on its neighbours (a dummy token in a free slot included): one slot, requests one
    after another, each as int8 generate alone."""
    from lillm.quant import quantize_int8
    model, tokenizer = model_and_tokenizer
    int8 = quantize_int8(copy.deepcopy(model))
    for reference, slots, jobs in ((model, 8, engine_jobs(tokenizer, sampled={1, 4})),
                                   (int8, 1, engine_jobs(tokenizer, sampled={1})[:3])):
        engine = new_engine(reference, tokenizer, slots, "fixed", backend="inductor")
        run_until_idle(engine, jobs)
        for job in jobs:
            assert received(job) == alone(reference, tokenizer, job)
        engine.model.clear_cache()


# ----------------------------------------------------------------------------- stop strings
def test_the_stop_matcher_holds_back_what_may_start_a_stop_string():
    matcher = StopMatcher(("ab", "xyz"))
    assert matcher.feed("hello a") == ("hello ", False)  # "a" may start "ab"
    assert matcher.feed("c x") == ("ac ", False)
    assert matcher.feed("y") == ("", False)
    assert matcher.feed("zzz") == ("", True)  # "xyz" across three pieces: nothing of it is sent
    matcher = StopMatcher(("ab",))
    assert matcher.feed("qa") == ("q", False) and matcher.flush() == "a"  # the end: held text goes out
    assert StopMatcher(("bc", "ab")).feed("xabc") == ("x", True)  # the earliest stop string wins


def stop_across_a_token_boundary(model, tokenizer, prompt_ids, max_tokens):
    """A 2-character stop string taken from the middle of the greedy answer, across two tokens' text,
    and the answer cut before its first occurrence."""
    tokens = generate(model, [prompt_ids], max_new_tokens=max_tokens, temperature=0, eos_id=tokenizer.eos_id)[0]
    text = tokenizer.decode(tokens)
    for n in range(len(tokens) // 2, len(tokens)):
        edge = len(tokenizer.decode(tokens[:n]))
        if 0 < edge < len(text) - 1 and text[edge - 1:edge + 1].strip():
            stop = text[edge - 1:edge + 1]
            return stop, text[:text.find(stop)]
    raise AssertionError(f"no token boundary to stop at in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_ends_the_answer_just_before_the_stop_string(server, model_and_tokenizer, stream):
    model, tokenizer = model_and_tokenizer
    stop, expected = stop_across_a_token_boundary(model, tokenizer, tokenizer.encode("Habari za", add_bos=True), 30)
    request = {"prompt": "Habari za", "max_tokens": 30, "temperature": 0, "stream": stream}
    for stops in (stop, ["never here", stop]):
        status, result = post(server, "/v1/completions", request | {"stop": stops})
        assert answer_of("text", status, result) == expected
        finish = result[-1] if stream else result
        assert finish["choices"][0]["finish_reason"] == "stop"
    # A stop string that never comes changes nothing, even when the answer ends with its start.
    whole = post(server, "/v1/completions", request | {"stream": False})[1]["choices"][0]
    status, result = post(server, "/v1/completions", request | {"stop": [whole["text"][-1] + "\u0000"]})
    assert answer_of("text", status, result) == whole["text"]


# ----------------------------------------------------------------------------- bad requests
GOOD = {"messages": USER, "max_tokens": 4}
BAD = [
    ("not json", "/v1/chat/completions", b"{\"messages\": [", 400, None),
    ("a JSON list", "/v1/chat/completions", b"[]", 400, None),
    ("NaN", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     None),
    ("not UTF-8", "/v1/chat/completions", b'{"messages": "\xff"}', 400, None),
    ("unknown field", "/v1/chat/completions", GOOD | {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("no messages", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("messages a string", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("a bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("an image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content"),
    ("a message field", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool": 1}]}, 400,
     "messages[0]"),
    ("temperature a string", "/v1/chat/completions", GOOD | {"temperature": "hot"}, 400, "temperature"),
    ("temperature < 0", "/v1/chat/completions", GOOD | {"temperature": -0.1}, 400, "temperature"),
    ("temperature > 2", "/v1/chat/completions", GOOD | {"temperature": 5}, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", GOOD | {"top_p": 0}, 400, "top_p"),
    ("top_p > 1", "/v1/chat/completions", GOOD | {"top_p": 1.5}, 400, "top_p"),
    ("top_k 0", "/v1/chat/completions", GOOD | {"top_k": 0}, 400, "top_k"),
    ("max_tokens < 0", "/v1/chat/completions", GOOD | {"max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens 0", "/v1/chat/completions", GOOD | {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens 1.5", "/v1/chat/completions", GOOD | {"max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens true", "/v1/chat/completions", GOOD | {"max_tokens": True}, 400, "max_tokens"),
    ("five stop strings", "/v1/chat/completions", GOOD | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("an empty stop string", "/v1/chat/completions", GOOD | {"stop": ""}, 400, "stop"),
    ("stop a number", "/v1/chat/completions", GOOD | {"stop": [3]}, 400, "stop"),
    ("n 2", "/v1/chat/completions", GOOD | {"n": 2}, 400, "n"),
    ("seed < 0", "/v1/chat/completions", GOOD | {"seed": -1}, 400, "seed"),
    ("stream a string", "/v1/chat/completions", GOOD | {"stream": "yes"}, 400, "stream"),
    ("stream_options without stream", "/v1/chat/completions", GOOD | {"stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("model a number", "/v1/chat/completions", GOOD | {"model": 3}, 400, "model"),
    ("a prompt longer than the context", "/v1/completions", {"prompt": "Habari za asubuhi " * 200}, 400, "prompt"),
    ("a long chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Habari " * 300}]}, 400,
     "messages"),
    ("prompt a number", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("token ids out of the vocabulary", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("messages on /v1/completions", "/v1/completions", {"messages": USER}, 400, "messages"),
    ("no route", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_a_bad_request_gets_a_4xx_with_an_openai_error_and_the_server_keeps_serving(server, case):
    _, path, body, status, param = case
    got, answer = post(server, path, None, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param
    assert post(server, "/v1/chat/completions", GOOD)[0] == 200


def test_bad_http_gets_a_4xx_too(server):
    too_big = b'{"prompt": "' + b"a" * (server.max_body + 10) + b'"}'
    assert post(server, "/v1/completions", None, raw=too_big)[0] == 413
    assert post(server, "/v1/completions", {"prompt": "x"}, headers={"Content-Type": "text/plain"})[0] == 415
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as raw:  # no Content-Length
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.0 411")
    assert post(server, "/v1/chat/completions", GOOD)[0] == 200


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "Habari", "max_tokens": 100,
                                                                    "stream": True, "temperature": 0}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.fp.readline().startswith(b"data: ")
    connection.close()
    assert post(server, "/v1/chat/completions", GOOD)[0] == 200


def test_max_tokens_past_the_context_gets_what_fits(server):
    status, body = post(server, "/v1/completions", {"prompt": [1, 5, 9], "max_tokens": 10**6, "temperature": 0})
    assert status == 200
    room = server.context - 3
    assert body["usage"]["completion_tokens"] <= room
    assert (body["choices"][0]["finish_reason"] == "length") == (body["usage"]["completion_tokens"] == room)


# ----------------------------------------------------------------------------- a real client
@pytest.fixture(scope="module")
def client(server):
    """OpenAI's own Python client (a dev dependency) pointed at the server."""
    openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e .[dev])")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_the_openai_client_gets_generate_s_answers_whole_and_streamed(client, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt, _ = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    text, n_tokens, finish = expected_text(model, tokenizer, prompt, 12)
    whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == finish
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), n_tokens)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == n_tokens
    ids = tokenizer.encode("Sawubona", add_bos=True)
    # top_k is not an OpenAI field: the server's default (50) applies
    text, n_tokens, finish = expected_text(model, tokenizer, ids, 10, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    completion = client.completions.create(model="tiny", prompt="Sawubona", max_tokens=10, temperature=1.0,
                                           top_p=0.9, seed=3)
    assert completion.choices[0].text == text and completion.usage.completion_tokens == n_tokens
    streamed = client.completions.create(model="tiny", prompt="Sawubona", max_tokens=10, temperature=1.0, top_p=0.9,
                                         seed=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_the_openai_client_s_stop_ends_before_the_stop_string(client, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    stop, expected = stop_across_a_token_boundary(model, tokenizer, tokenizer.encode("Habari za", add_bos=True), 30)
    whole = client.completions.create(model="tiny", prompt="Habari za", max_tokens=30, temperature=0, stop=stop)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model="tiny", prompt="Habari za", max_tokens=30, temperature=0,
                                            stop=[stop, "\n\n"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"
    prompt, _ = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    stop, expected = stop_across_a_token_boundary(model, tokenizer, prompt, 30)
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, temperature=0, stop=[stop])
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (expected, "stop")


def test_the_openai_client_sees_a_bad_request_as_its_error(client):
    import openai
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=USER, temperature=5)


# ----------------------------------------------------------------------------- one slot: leaving, queueing
@pytest.fixture(scope="module")
def one_slot_server(model_and_tokenizer):
    """One slot, a queue of one, and a context of 1024 so a request can run for many steps; every
    job the engine queues is kept in `.submitted`."""
    _, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.2, max_seq_len=1024)).eval()
    with torch.no_grad():  # a head whose </s> logit is 0 while the largest is far above: answers never end early
        model.lm_head = torch.nn.Linear(64, tokenizer.vocab_size, bias=False)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        model.lm_head.weight[tokenizer.eos_id] = 0
    with ChatServer(model, tokenizer, model_name="tiny", port=0, log=lambda record: None, slots=1, max_queue=1,
                    defaults=Defaults(max_tokens=16, temperature=0.0)) as running:
        running.submitted = []
        submit = running.engine.submit
        running.engine.submit = lambda job: (submit(job), running.submitted.append(job))  # once queued
        yield running


def open_stream(server, max_tokens=1000):
    """A streamed request whose first event has arrived, and its connection (still open)."""
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": [1, 7], "max_tokens": max_tokens,
                                                                    "stream": True, "temperature": 0}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def ended(job):
    for _ in range(600):
        if job.finish is not None:
            return job.finish
        threading.Event().wait(0.05)
    raise AssertionError("the job never ended")


def test_a_client_that_leaves_frees_its_slot_for_the_next_request(one_slot_server):
    server = one_slot_server
    assert not server.submitted  # the first test on this server (it counts the jobs)
    connection, response = open_stream(server)
    assert response.fp.readline().startswith(b"data: ")
    response.close()  # the response holds the socket too
    connection.close()  # streamed: seen when the next piece cannot be written
    assert ended(server.submitted[-1]) == "cancelled" and server.submitted[-1].generated < 1000
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as raw:  # not streamed: the socket's end is seen
        body = json.dumps({"prompt": [1, 7], "max_tokens": 1000, "temperature": 0}).encode()
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(600):  # until it has its first token
            if len(server.submitted) == 2 and server.submitted[-1].first_step is not None:
                break
            threading.Event().wait(0.01)
    assert ended(server.submitted[-1]) == "cancelled" and server.submitted[-1].generated < 1000
    status, body = post(server, "/v1/completions", {"prompt": "Habari", "max_tokens": 5})
    assert status == 200 and server.submitted[-1].finish in ("stop", "length")


def test_past_the_slots_and_the_queue_a_request_gets_503_with_retry_after(one_slot_server):
    server = one_slot_server
    running = open_stream(server)  # holds the slot, once its first piece has come
    assert running[1].fp.readline().startswith(b"data: ")
    waiting = open_stream(server)  # holds the one queue place
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "Habari"}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 503 and response.getheader("Retry-After") == "1"
    assert json.loads(response.read())["error"]["code"] == "overloaded"
    for connection, response in (running, waiting):
        response.close()
        connection.close()
    assert ended(server.submitted[-1]) == "cancelled"  # the waiting one: dropped without a token or run
    assert post(server, "/v1/completions", {"prompt": "Habari", "max_tokens": 5})[0] == 200


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("compiled", [False, True])
def test_inference_serve_flag_starts_a_server_on_localhost(tmp_path, model_and_tokenizer, monkeypatch, compiled):
    """inference.py --serve, run in a thread: the flags become the server's defaults; shutting the
    HTTP server down makes main() return. --compile gives the engine a StaticDecoder (here traced by
    the eager backend: inductor's compile is the slow test above)."""
    import inference
    import lillm.serve

    model, tokenizer = model_and_tokenizer
    tokenizer.save(tmp_path / "tok.json")
    ckpt.save_checkpoint(tmp_path / "ckpt", model, tokenizer_path=tmp_path / "tok.json")
    made = []

    class Recorded(lillm.serve.ChatServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(lillm.serve, "ChatServer", Recorded)
    monkeypatch.setattr(inference, "StaticDecoder", lambda model: StaticDecoder(model, backend="eager", mode=None))
    argv = [str(tmp_path / "ckpt"), "--serve", "--port", "0", "--temperature", "0", "--max-new-tokens", "5"]
    argv += ["--compile"] if compiled else []
    thread = threading.Thread(target=inference.main, args=(argv,))
    thread.start()
    try:
        for _ in range(600):
            if made and made[0].engine.thread.is_alive():
                break
            thread.join(0.05)
        served = made[0]
        assert served.httpd.server_address[0] == "127.0.0.1" and (served.engine.decoder is not None) == compiled
        answer = post(served, "/v1/completions", {"prompt": "Habari"})[1]
        expected, _, _ = expected_text(model, tokenizer, tokenizer.encode("Habari", add_bos=True), 5)
        assert answer["choices"][0]["text"] == expected  # --temperature 0 and --max-new-tokens are the defaults
    finally:
        if made:
            made[0].httpd.shutdown()
        thread.join(30)
    assert not thread.is_alive()
    with pytest.raises(FlagError, match="--serve"):
        inference.main([str(tmp_path / "ckpt"), "--serve", "--chat"])


# ----------------------------------------------------------------------------- a real browser
def chromium_driver(profile: Path):
    """Debian's chromium and chromium-driver through selenium, or a skip when any of them is absent."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[browser]'")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium / chromedriver absent (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=900,600"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_chat_page_streams_a_reply_in_headless_chromium(server, tmp_path):
    driver = chromium_driver(tmp_path / "profile")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        for field, value in [("temperature", "0"), ("max-tokens", "24")]:
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "input").send_keys("Habari za asubuhi?", Keys.ENTER)
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "Habari za asubuhi?"
        expected = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 24, "temperature": 0})[1]
        # The browser holds the text the API returns, and it arrived in pieces.
        assert reply.get_property("textContent") == expected["choices"][0]["message"]["content"]
        assert int(reply.get_attribute("data-chunks")) > 1
        assert "error" not in reply.get_attribute("class")
        driver.save_screenshot(str(tmp_path / "chat.png"))
        if os.environ.get("LILLM_CHAT_SCREENSHOT"):  # how docs/chat.png was made
            driver.save_screenshot(os.environ["LILLM_CHAT_SCREENSHOT"])
    finally:
        driver.quit()


# ----------------------------------------------------------------------------- the load test's client side
def test_the_load_test_counts_every_request_and_stops_by_itself(server):
    """bench.serve's clients against the test server: a short round, every request answered and
    timed, nothing failed, and the round ends on its own."""
    from bench.serve import Load, run_load
    port = server.httpd.server_address[1]
    load = Load(clients=3, seconds=1.0, max_tokens=4, think=0.05, spread=0.2, max_requests=20)
    row = run_load(port, load, memory_of=lambda: 1 << 20)
    assert row["requests"] == len(load.results) > 3 and row["failed"] == 0
    assert all(r.first is not None and 1 <= r.tokens <= 4 for r in load.results)
    assert row["first_token_ms_p99"] >= row["first_token_ms_median"] > 0 and row["memory_mib_peak"] == 1


@pytest.mark.slow
def test_the_load_test_runs_lillm_and_llama_server_side_by_side(tmp_path):
    """bench.serve end to end on the tiny preset: both servers as processes, no request failed."""
    from bench.serve import llama_cpp_python_server, llama_server_path, main
    path, why_not = llama_server_path(None)
    if path is None and not llama_cpp_python_server():
        pytest.skip(f"{why_not}; nor llama-cpp-python's server (the [llama] extra)")
    rows = main(["--preset", "tiny", "--clients", "2", "--seconds", "3", "--max-tokens", "8", "--threads", "1",
                 "--slots", "2", "--json", str(tmp_path / "load.json")])
    assert rows[0]["server"] == "lillm int8" and rows[1]["server"].startswith(("llama.cpp", "llama-cpp-python"))
    assert all(row["requests"] > 0 and row["failed"] == 0 for row in rows)
