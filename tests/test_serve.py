"""`mobilevlm-mlc serve` as a client sees it: a live server on 127.0.0.1 (a random free port), spoken to
with the official `openai` client (and httpx for what that client will not send). Answers are checked
against the engine's own greedy answers for the same prompts, run alone in this process."""

from __future__ import annotations

import base64
import collections
import copy
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mobilevlm_mlc.demo import DEMO_IMAGE
from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.sampling import GenerationConfig, Sampler

from .helpers import DELETE, VALUES, apply_edit, leaf_paths, reference_for

MODEL = "dist-ldpnet-q0f32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mobilevlm-mlc serve` in a child process, up once /health answers."""

    def __init__(self, built, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mobilevlm_mlc.cli", "serve", str(built.dist), "--lib", str(built.lib)]
        cmd += ["--port", str(self.port), "--model-id", MODEL, *flags]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited: {self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("serve did not come up in 60 s")

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(ldpnet_built):
    s = Server(ldpnet_built, "--max-sequences", "8", "--kv-cache-tokens", "4096")
    yield s
    s.stop()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def alone(engine, prompt: str, image: Path | None, max_tokens: int) -> tuple[str, object]:
    with engine.chat() as session:
        text = "".join(session.send(prompt, image, GenerationConfig(max_new_tokens=max_tokens)))
        return text, session.last


def user(prompt: str, image: Path | None = None) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": prompt}]
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": parts}]


def test_answers_equal_the_engines_greedy_answers(server, ldpnet_engine):
    client = server.client()
    for prompt, image in (("Name three colours.", None), ("What is in the image?", DEMO_IMAGE)):
        expected, turn = alone(ldpnet_engine, prompt, image, 12)
        reply = client.chat.completions.create(model=MODEL, messages=user(prompt, image), max_tokens=12)
        assert reply.choices[0].message.content == expected and expected
        assert reply.choices[0].finish_reason == turn.finish_reason == "length"
        image_tokens = ldpnet_engine.dist.config.num_image_tokens - 1 if image else 0
        assert reply.usage.prompt_tokens == len(turn.prompt_token_ids) + image_tokens
        assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == reply.usage.prompt_tokens + 12

        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=user(prompt, image),
                max_completion_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stop_strings_and_the_template_of_a_multi_turn_chat(server, ldpnet_engine, ldpnet_built):
    client = server.client()
    full, _ = alone(ldpnet_engine, "Tell me a story.", None, 16)
    stop = full[5:8]
    reply = client.chat.completions.create(model=MODEL, messages=user("Tell me a story."), max_tokens=16, stop=[stop])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    # a multi-turn chat is rendered as MobileVLM's v1 template renders it (the reference tokenizer's ids)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "And then?"},
    ]
    official = "Be brief. USER: Hi. ASSISTANT: Hello! How can I help?</s>USER: And then? ASSISTANT:"
    ids = reference_for(ldpnet_built.checkpoint.parent, "ldpnet").input_ids(official)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == greedy_text(ldpnet_engine, ids, 6)


def greedy_text(engine, ids: list[int], tokens: int, image: Path | None = None) -> str:
    """The engine's greedy continuation of prompt `ids`, one sequence, through its prefill and decode."""
    seq, sampler, out = engine.add_sequence(), Sampler(GenerationConfig(max_new_tokens=tokens)), []
    images = [engine.image_embed(engine.pixels(image))] if image else []
    try:
        logits = engine.prefill([seq], [engine.prompt(ids, images)])[0]
        for _ in range(tokens):
            [token] = engine.sample(logits, [sampler])
            if token in engine.stop_token_ids:
                break
            out.append(token)
            logits = engine.decode([seq], [token])
    finally:
        engine.remove_sequence(seq)
    return engine.tokenizer.decode(out)


def test_the_prefix_cache_shares_the_system_prompt_and_a_chats_earlier_turns(ldpnet_built, ldpnet_engine):
    """Prompts that begin the same share KV pages (a fork of a kept sequence, whole pages): the usage says how
    many prompt tokens came from the cache, and every answer equals the engine's greedy answer to the whole
    prompt prefilled alone. A small KV cache makes kept sequences give their pages back to a long request."""
    reference = reference_for(ldpnet_built.checkpoint.parent, "ldpnet")
    system = ldpnet_engine.dist.chat_config["conv_template"]["system_message"]
    image_tokens = ldpnet_engine.dist.config.num_image_tokens
    question = "What is in the image? Describe every object you see."
    server = Server(ldpnet_built, "--max-sequences", "2", "--kv-cache-tokens", "1024", "--prefix-cache", "2")
    try:
        client = server.client()
        assert server.metric("mobilevlm_prefix_cache_sequences") == 1  # the template's preamble, prefilled at start
        first = client.chat.completions.create(model=MODEL, messages=user(question, DEMO_IMAGE), max_tokens=8)
        ids = reference.input_ids(f"{system} USER: <image>\n{question} ASSISTANT:")
        assert first.usage.prompt_tokens == len(ids) - 1 + image_tokens
        # the template's preamble, all of it: BOS, the system message, "USER: " (the image follows)
        shared = len(reference.input_ids(f"{system} USER: "))
        assert ids[:shared] == reference.input_ids(f"{system} USER: ") and shared > 16
        assert first.usage.prompt_tokens_details.cached_tokens == shared
        answer = first.choices[0].message.content
        assert answer == greedy_text(ldpnet_engine, ids, 8, DEMO_IMAGE)

        follow_up = "And what colours are they?"
        messages = user(question, DEMO_IMAGE) + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": follow_up},
        ]
        second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        ids2 = reference.input_ids(
            f"{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: {follow_up} ASSISTANT:"
        )
        assert second.usage.prompt_tokens == len(ids2) - 1 + image_tokens
        # the first turn's prompt, image included, and its answer's tokens as far as they were retokenized alike
        shared2 = second.usage.prompt_tokens_details.cached_tokens
        assert len(ids) - 1 + image_tokens <= shared2 < second.usage.prompt_tokens
        assert second.choices[0].message.content == greedy_text(ldpnet_engine, ids2, 8, DEMO_IMAGE)
        assert server.metric("mobilevlm_prompt_tokens_cached_total") == shared + shared2

        # a request that must wait for a running one's pages does not empty the cache meanwhile: once
        # admitted it still forks the first conversation (all of its prompt but the last token)
        running = client.chat.completions.create(model=MODEL, messages=user("Count."), max_tokens=700, stream=True)
        again = client.chat.completions.create(model=MODEL, messages=user(question, DEMO_IMAGE), max_tokens=300)
        assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
        assert sum(1 for c in running if c.choices and c.choices[0].delta.content) > 0

        # 1024 KV tokens: this one's budget fits only once the kept sequences give their pages back
        long_answer = client.chat.completions.create(
            model=MODEL, messages=user("Count."), max_tokens=1024 - 64, temperature=0
        )
        assert long_answer.usage.completion_tokens == 1024 - 64 and long_answer.choices[0].finish_reason == "length"
        # kept: itself alone (its 63 of the 64 pages leave no other kept sequence room)
        assert server.metric("mobilevlm_prefix_cache_sequences") == 1
    finally:
        server.stop()
    server = Server(ldpnet_built, "--prefix-cache", "0")
    try:
        reply = server.client().chat.completions.create(model=MODEL, messages=user(question, DEMO_IMAGE), max_tokens=8)
        assert reply.usage.prompt_tokens_details.cached_tokens == 0 and reply.choices[0].message.content == answer
        assert server.metric("mobilevlm_prefix_cache_sequences") == 0
    finally:
        server.stop()


def test_eight_concurrent_streams_each_equal_its_run_alone(server, ldpnet_engine):
    prompts = [f"Question number {i}: what comes next?" for i in range(8)]
    images = [DEMO_IMAGE if i % 3 == 0 else None for i in range(8)]
    expected = [alone(ldpnet_engine, p, im, 10)[0] for p, im in zip(prompts, images)]
    generated_before = server.metric("mobilevlm_generation_tokens_total")
    answers: dict[int, str] = {}

    def stream(i: int) -> None:
        chunks = server.client().chat.completions.create(
            model=MODEL, messages=user(prompts[i], images[i]), max_tokens=10, stream=True
        )
        answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [answers.get(i) for i in range(8)] == expected
    assert server.metric("mobilevlm_generation_tokens_total") == generated_before + 80


def test_the_load_benchmarks_client_reads_what_the_server_streams(server):
    """`benchmarks/serve_load.py` reads streams with `http.client` lines (cheap on the cores it shares with
    the server): its text, token count and timings are those of the same request made by `openai`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from serve_load import EOS, load, stream_chat

    messages = user("Tell me about the lighthouse.")
    started, deltas, usage = stream_chat(server.url, MODEL, messages, 7)
    expected = server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=7, temperature=0, logit_bias={str(EOS): -100}
    )
    assert "".join(text for _, text in deltas) == expected.choices[0].message.content
    assert usage["completion_tokens"] == expected.usage.completion_tokens == 7
    stamps = [stamp for stamp, _ in deltas]
    assert started < stamps[0] and stamps == sorted(stamps)

    result = load(server.url, MODEL, clients=3, requests=2, max_tokens=5)
    assert (result["requests"], result["tokens"], result["answer_tokens_min"]) == (6, 30, 5)
    assert result["generated_tok_s"] == pytest.approx(30 / result["wall_s"])
    assert 0 < result["ttft_ms"]["p50"] <= result["ttft_ms"]["p95"] and result["client_cpu_s"] > 0
    # a refusal inside a client thread ends the load with the server's own message, once
    with pytest.raises(MobileVLMError, match=r"HTTP 400: this model's context window is"):
        load(server.url, MODEL, clients=2, requests=1, max_tokens=10**6)


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_pages(server):
    free = server.metric("mobilevlm_kv_cache_free_pages")
    body = {"model": MODEL, "messages": user("Tell me a long story."), "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]  # the role chunk and a few tokens, then hang up
        assert seen[0].startswith("data: ") and server.metric("mobilevlm_running_sequences") == 1
        assert server.metric("mobilevlm_kv_cache_free_pages") < free
    assert wait_for(lambda: server.metric("mobilevlm_running_sequences") == 0)
    assert wait_for(lambda: server.metric("mobilevlm_kv_cache_free_pages") == free)


def bad_requests(tmp_path: Path) -> list[tuple[object, int, str]]:
    big = png_url(Image.new("RGB", (5000, 4000)))
    ok = user("hi")
    image_part = {"type": "image_url", "image_url": {"url": data_url(DEMO_IMAGE)}}
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    base = {"model": MODEL, "messages": ok}
    return [
        (b"{not json", 400, "the body is not valid JSON"),
        (b"[1, 2]", 400, "the body is a JSON list, expected an object"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "the body's JSON is nested deeper than this server parses"),
        (base | {"messages": user("caf\ud800")}, 400, "the text holds '\\ud800', a lone UTF-16 surrogate"),
        ({"messages": ok}, 422, "model: Field required"),
        (base | {"messages": []}, 422, "messages: List should have at least 1 item"),
        (base | {"temperature": "hot"}, 422, "temperature: Input should be a valid number"),
        (
            base | {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            422,
            "messages[0].content[0].text: Input should be a valid string",
        ),
        (base | {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
        (base | {"model": "gpt-4o"}, 404, "model 'gpt-4o' not found; this server has 'dist-ldpnet-q0f32'"),
        (base | {"n": 2}, 400, "n: not supported by this server"),
        (base | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools: not supported"),
        (base | {"max_tokens": -5}, 400, "max_tokens is -5, expected an integer >= 1"),
        (base | {"max_tokens": 10**6}, 400, "context window is"),
        (base | {"messages": user("word " * 5000)}, 400, "context window is"),
        (base | {"temperature": -1}, 400, "temperature is -1.0, expected a finite number >= 0"),
        (base | {"top_p": 0}, 400, "top_p is 0.0, expected a number in (0, 1]"),
        (base | {"logit_bias": {"abc": 1}}, 400, "logit_bias: key 'abc' is not a token id"),
        (base | {"logit_bias": {"\u00b2": 1}}, 400, "logit_bias: key '\u00b2' is not a token id"),
        (base | {"messages": user("x" * 20_000_000)}, 413, "the request body is"),
        (base | {"logit_bias": {"99999999": 1}}, 400, "logit_bias: token id 99999999 is outside the vocabulary"),
        (base | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop: expected up to 4 non-empty strings"),
        (
            base | {"messages": [{"role": "assistant", "content": "x"}]},
            400,
            "messages[0].role is 'assistant', expected 'user'",
        ),
        (base | {"messages": [{"role": "user", "content": "a <image> b"}]}, 400, "text may not hold '<image>'"),
        (
            base | {"messages": [{"role": "user", "content": [image_part, image_part]}]},
            400,
            "messages[0].content[1]: more than 1 image(s) in one request",
        ),
        (
            base
            | {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                    }
                ]
            },
            400,
            "messages[0].content[0].image_url: not a readable image (no image format Pillow reads)",
        ),
        (
            base
            | {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,@@@"}]}
                ]
            },
            400,
            "the data URL is not valid base64",
        ),
        (
            base | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]},
            413,
            "image is 5000x4000, more than the 16777216 pixels allowed",
        ),
        (
            base
            | {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                    }
                ]
            },
            400,
            "remote image URLs are not fetched by this server",
        ),
        (
            base
            | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(outside)}}]}]},
            400,
            "local image paths are refused (start the server with --allow-image-dir DIR",
        ),
    ]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, tmp_path, ldpnet_engine):
    for body, status, fragment in bad_requests(tmp_path):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=30)
        assert response.status_code == status, (body if isinstance(body, bytes) else list(body), response.text)
        error = response.json()["error"]
        assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}, error
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    # the official client raises its typed errors on them
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="n: not supported"):
        server.client().chat.completions.create(model=MODEL, messages=user("hi"), n=3)
    expected, _ = alone(ldpnet_engine, "Name three colours.", None, 5)
    reply = server.client().chat.completions.create(model=MODEL, messages=user("Name three colours."), max_tokens=5)
    assert reply.choices[0].message.content == expected
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'mobilevlm_requests_total{status="413"} 2.0' in metrics  # the big image, the big body
    assert "mobilevlm_time_to_first_token_seconds_bucket" in metrics


def test_fuzzed_requests_get_a_status_of_their_own_never_a_500(server):
    """A valid request with 1-3 of its fields set to any JSON value (or removed): a 200 or an OpenAI error
    object with a client status; never a 500, and the server goes on."""
    base = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_url(Image.new("RGB", (8, 6), "teal"))}},
                ],
            },
        ],
        "max_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 1,
        "stop": ["\n"],
        "logit_bias": {"5": 1.0},
        "stream": False,
    }
    paths = list(leaf_paths(base))
    seen = collections.Counter()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.tuples(st.sampled_from(paths), st.one_of(VALUES, st.just(DELETE))), min_size=1, max_size=3))
    @example([(("temperature",), DELETE)])  # an answer and a refusal are always among the requests: most random
    @example([(("model",), None)])  # edits are refused, and 40 draws once held no answer at all
    def check(edits):
        body = copy.deepcopy(base)
        for path, value in edits:
            apply_edit(body, path, value)
        body["max_completion_tokens"] = 2  # whatever max_tokens became: answers stay short
        content = json.dumps(body)  # NaN and Infinity as Python writes them (not strict JSON)
        response = httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60)
        seen[response.status_code] += 1
        assert response.status_code in (200, 400, 404, 413, 422), (edits, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
    assert seen[200] and len(seen) > 1, seen  # both answers and refusals were reached
    assert server.client().chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2).choices


def test_memory_stays_flat_over_200_requests(server):
    client = server.client()

    def ask(i: int) -> None:
        image = DEMO_IMAGE if i % 10 == 0 else None
        client.chat.completions.create(model=MODEL, messages=user(f"Request {i}.", image), max_tokens=4)

    for i in range(20):  # warm-up: every buffer size the pool will keep
        ask(i)
    warm = server.rss_kib()
    for i in range(200):
        ask(i)
    assert server.rss_kib() <= warm * 1.05, (warm, server.rss_kib())


def test_api_key_queue_bound_and_allowed_image_folder(ldpnet_built, ldpnet_engine, tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "demo.png").write_bytes(DEMO_IMAGE.read_bytes())
    (allowed / "escape.png").symlink_to(tmp_path / "elsewhere.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    s = Server(
        ldpnet_built,
        "--api-key",
        "sesame",
        "--max-sequences",
        "1",
        "--max-waiting",
        "1",
        "--allow-image-dir",
        str(allowed),
    )
    try:
        assert httpx.get(f"{s.url}/health").status_code == 200  # no key needed
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(f"{s.url}{path}")
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        for authorization, status in [
            ("Bearer sesame", 200),
            ("bearer sesame", 200),  # an auth scheme is case-insensitive
            ("Bearer sesam", 401),
            ("Bearer sesame2", 401),
            ("Basic sesame", 401),
            ("sesame", 401),
        ]:
            response = httpx.get(f"{s.url}/v1/models", headers={"Authorization": authorization})
            assert response.status_code == status, authorization
        client = s.client("sesame")
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' not found"):
            client.models.retrieve("gpt-4o")

        expected, _ = alone(ldpnet_engine, "What is in the image?", DEMO_IMAGE, 6)
        for url in (str(allowed / "demo.png"), f"file://{allowed / 'demo.png'}"):
            parts = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in the image?"},
            ]
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=6
            )
            assert reply.choices[0].message.content == expected
        for url, fragment in (
            (str(allowed / "escape.png"), "is outside --allow-image-dir"),
            (str(allowed / "none.png"), "no such image file"),
        ):
            with pytest.raises(openai.BadRequestError, match=fragment):
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                )

        # one sequence runs, one waits: the rest are told to come back later
        statuses: list[int] = []

        def ask() -> None:
            body = {"model": MODEL, "messages": user("Tell me a long story."), "max_tokens": 300}
            r = httpx.post(
                f"{s.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"}, timeout=120
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(statuses).count(200) >= 2 and 429 in statuses, statuses
    finally:
        s.stop()


def test_serve_refuses_bad_flags(ldpnet_built, tmp_path):
    busy = socket.create_server(("127.0.0.1", 0))  # a port something else listens on
    cmd = [sys.executable, "-m", "mobilevlm_mlc.cli", "serve", str(ldpnet_built.dist), "--lib", str(ldpnet_built.lib)]
    for flags, fragment in (
        (["--allow-image-dir", str(tmp_path / "none")], f"--allow-image-dir {tmp_path / 'none'}: not a folder"),
        (["--port", "70000"], "argument --port"),
        (["--port", str(busy.getsockname()[1])], "cannot listen there (Address already in use)"),
        (["--max-sequences", "0"], "argument --max-sequences"),
        (["--prefix-cache", "-1"], "argument --prefix-cache"),
        (["--api-key", ""], "argument --api-key: expected a non-empty key"),  # "$UNSET" would leave it open
        (["--host", "999.1.1.1"], "--host 999.1.1.1 --port 8000: cannot listen there (Name or service not known)"),
    ):
        proc = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=60, env=os.environ)
        assert proc.returncode != 0 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
