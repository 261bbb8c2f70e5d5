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
from lillm.generate import generate
from lillm.model import Transformer
from lillm.serve import ChatServer, Defaults, Engine, Job
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


def test_the_engine_batches_waiting_greedy_requests_and_each_row_decodes_as_alone(model_and_tokenizer):
    """Jobs queued before the worker starts all wait together: one batch of 8 rows of different
    prompt lengths and max_tokens; every row's text equals lillm.generate on that prompt alone."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(copy.deepcopy(model), tokenizer, max_batch=8)
    prompts = [tokenizer.encode(t, add_bos=True) for t in ["Habari", "Ina kwana? Lafiya", "S", "unjani namhla",
                                                            "Lafiya lau.", "rafiki", "za asubuhi, rafiki", "Ina"]]
    jobs = [Job(p, max_tokens=6 + 3 * i, temperature=0.0, top_p=None, top_k=None, seed=None)
            for i, p in enumerate(prompts)]
    for job in jobs:
        engine.submit(job)
    engine.start()
    try:
        for job, prompt in zip(jobs, prompts):
            pieces = []
            while (event := job.events.get(timeout=30))[0] == "text":
                pieces.append(event[1])
            text, n_tokens, finish = expected_text(model, tokenizer, prompt, job.max_tokens)
            assert ("".join(pieces), event) == (text, ("end", finish, n_tokens))
    finally:
        engine.stop()
    assert engine.batch_sizes == {8: 1}


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
    ("max_tokens past the context", "/v1/chat/completions", GOOD | {"max_tokens": 10**6}, 400, "max_tokens"),
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


# ----------------------------------------------------------------------------- the command line
def test_inference_serve_flag_starts_a_server_on_localhost(tmp_path, model_and_tokenizer, monkeypatch):
    """inference.py --serve, run in a thread: the flags become the server's defaults; shutting the
    HTTP server down makes main() return."""
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
    argv = [str(tmp_path / "ckpt"), "--serve", "--port", "0", "--temperature", "0", "--max-new-tokens", "5"]
    thread = threading.Thread(target=inference.main, args=(argv,))
    thread.start()
    try:
        for _ in range(600):
            if made and made[0].engine.thread.is_alive():
                break
            thread.join(0.05)
        served = made[0]
        assert served.httpd.server_address[0] == "127.0.0.1"
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
