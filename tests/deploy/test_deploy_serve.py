"""The OpenAI-shaped server: per-task queues, outputs equal to each task model run alone,
streaming, OpenAI-style errors, the official client, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy_testlib import make_base, make_finetune
from sparsemerge.deploy.scheduler import Cancelled, TaskScheduler
from sparsemerge.deploy.server import TaskServer
from sparsemerge.deploy.store import TaskStore
from sparsemerge.deploy.switch import TaskSwitcher
from sparsemerge.kernels.model import load_for_run
from sparsemerge.runtime.engine import DecodeEngine
from sparsemerge.runtime.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The government said", "Shares in the company", "The team won the match", "A new phone"]
MODELS = ["a", "b", "base", "0.5*a+0.5*b"]
TOKENS = 10


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("serve")
    hf, packed = make_base(tmp, tiny_tokenizer)
    store = TaskStore.init(tmp / "store", packed)
    store.add("a", make_finetune(hf, tmp / "fa", seed=1, scale=0.2), density=0.5)
    store.add("b", make_finetune(hf, tmp / "fb", seed=2, scale=0.2), density=0.5)
    return store


@pytest.fixture(scope="module")
def alone(store):
    """What each task model gives when run alone (greedy), one model at a time."""
    loaded = load_for_run(str(store.base_dir))  # as the server loads it
    engine = DecodeEngine(loaded.model, loaded.tokenizer, max_seq=128)
    switcher = TaskSwitcher(store, loaded.model, engine)
    out = {}
    for model in MODELS:
        switcher.activate(model)
        for prompt in PROMPTS:
            out[model, prompt] = engine.generate(prompt, TOKENS, SamplingConfig(temperature=0.0)).text
    # the tasks differ, so equal outputs are not a coincidence of identical models
    assert len({tuple(out[m, p] for p in PROMPTS) for m in MODELS}) == len(MODELS)
    return out


@pytest.fixture(scope="module")
def server(store):
    srv = TaskServer(str(store.path), port=0, max_seq=128).start()
    yield srv
    srv.stop()


def _post(url: str, body, raw: "bytes | None" = None) -> "tuple[int, str]":
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as f:
            return f.status, f.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _stream_text(payload: str, chat: bool) -> str:
    events = [line[len("data: "):] for line in payload.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    if chat:
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_concurrent_requests_for_different_tasks_each_get_their_task_models_output(server, alone):
    jobs = [(m, p, stream) for m in MODELS for p in PROMPTS for stream in (False, True)]
    results: dict = {}

    def one(model, prompt, stream):
        body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": stream}
        status, payload = _post(server.url + "/v1/completions", body)
        assert status == 200, payload
        results[model, prompt, stream] = _stream_text(payload, False) if stream else json.loads(payload)["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == len(jobs)
    for (model, prompt, _), text in results.items():
        assert text == alone[model, prompt], (model, prompt)
    # grouped by task: far fewer switches than requests
    assert server.scheduler.switches < len(jobs)


def test_chat_completions_and_models(server, alone):
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as f:
        listing = json.loads(f.read())
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["base", "a", "b"]
    msgs = [{"role": "user", "content": "hello"}]
    status, payload = _post(server.url + "/v1/chat/completions", {"model": "a", "messages": msgs, "max_tokens": 6, "temperature": 0})
    body = json.loads(payload)
    assert status == 200 and body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 6
    status, streamed = _post(server.url + "/v1/chat/completions", {"model": "a", "messages": msgs, "max_tokens": 6, "temperature": 0, "stream": True})
    assert status == 200 and _stream_text(streamed, True) == body["choices"][0]["message"]["content"]
    # stop strings are honoured and not returned
    text = alone["a", PROMPTS[0]]
    cut = text[3:5]
    if cut:
        status, payload = _post(server.url + "/v1/completions", {"model": "a", "prompt": PROMPTS[0], "max_tokens": TOKENS,
                                                                  "temperature": 0, "stop": [cut]})
        got = json.loads(payload)["choices"][0]
        assert got["text"] == text[: text.index(cut)] and got["finish_reason"] == "stop"


@pytest.mark.parametrize("path,body,raw,status,code", [
    ("/v1/completions", None, b"{not json", 400, "invalid_json"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, None, 404, "model_not_found"),
    ("/v1/completions", {"model": "0.5*a+0.5*zz", "prompt": "x"}, None, 404, "model_not_found"),
    ("/v1/completions", {"model": "a", "prompt": "word " * 400}, None, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 10**12}, None, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": -3}, None, 400, None),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": "many"}, None, 400, None),
    ("/v1/completions", {"model": "a", "prompt": "x", "temperature": 7}, None, 400, None),
    ("/v1/completions", {"model": "a", "prompt": [99999]}, None, 400, None),
    ("/v1/completions", {"prompt": "x"}, None, 400, None),
    ("/v1/chat/completions", {"model": "a", "messages": "hi"}, None, 400, None),
    ("/v1/completions", {"model": "a", "prompt": "x", "n": 3}, None, 400, None),
    ("/v1/nothing", {}, None, 404, "not_found"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, path, body, raw, status, code):
    got, payload = _post(server.url + path, body, raw)
    err = json.loads(payload)["error"]
    assert got == status and err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as f:
        assert f.status == 200


def test_scheduler_serves_a_task_in_bursts_and_switches_between_requests_only():
    switched, gate = [], threading.Event()
    sched = TaskScheduler(switched.append, burst=2)
    first = sched.submit("a", lambda job: gate.wait(10))
    time.sleep(0.1)  # the worker is inside the first job; the rest queue up behind it
    jobs = [sched.submit(t, lambda job, t=t: t) for t in ["b", "a", "a", "a", "b", "c"]]
    gate.set()
    assert [j.wait(10) for j in jobs] == ["b", "a", "a", "a", "b", "c"] and first.wait(1)
    # a runs on (2 in a row: burst), then the longest waiting (b), then a again, then b, then c
    assert [t for t, _ in sched.history] == ["a", "a", "b", "b", "a", "a", "c"]
    assert switched == [t for i, (t, _) in enumerate(sched.history) if i == 0 or sched.history[i - 1][0] != t]
    sched.close()


def test_scheduler_runs_in_the_callers_thread_and_ctrl_c_cancels_the_running_job():
    """`sparsemerge serve` runs the worker in the main thread (run_here); Ctrl-C there cancels
    the running job (its client gets Cancelled) and stops the loop."""
    ran_on = []
    sched = TaskScheduler(lambda task: None, start=False)
    ok = sched.submit("a", lambda job: ran_on.append(threading.current_thread()) or "done")

    def interrupted(job):
        raise KeyboardInterrupt

    stopped = sched.submit("a", interrupted)
    sched.submit("a", lambda job: sched.close())  # ends the loop (instead of a hang) if Ctrl-C were swallowed
    with pytest.raises(KeyboardInterrupt):
        sched.run_here()
    assert ok.wait(1) == "done" and ran_on == [threading.current_thread()]
    with pytest.raises(Cancelled):
        stopped.wait(1)
    sched.close()


def _openai_python() -> "str | None":
    for candidate in (os.environ.get("SPARSEMERGE_OPENAI_PYTHON"), str(ROOT / ".venv-peers" / "openai" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    try:
        import openai  # noqa: F401

        return sys.executable
    except ImportError:
        return None


CLIENT = r'''
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0)
out = {"models": [m.id for m in client.models.list().data]}
r = client.completions.create(model="a", prompt=sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0)
out["completion"] = r.choices[0].text
out["stream"] = "".join(c.choices[0].text for c in client.completions.create(
    model="b", prompt=sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0, stream=True))
msgs = [{"role": "user", "content": "hello"}]
out["chat"] = client.chat.completions.create(model="a", messages=msgs, max_tokens=5, temperature=0).choices[0].message.content
out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="a", messages=msgs, max_tokens=5, temperature=0, stream=True))
try:
    client.completions.create(model="nope", prompt="x", max_tokens=2)
except openai.NotFoundError as e:
    out["not_found"] = e.status_code
try:
    client.completions.create(model="a", prompt="word " * 400, max_tokens=2)
except openai.BadRequestError as e:
    out["too_long"] = e.status_code
print(json.dumps(out))
'''


def test_the_official_openai_client(server, alone):
    python = _openai_python()
    if python is None:
        pytest.skip("the openai client is not installed (benchmarks/peers/setup_openai.sh makes .venv-peers/openai)")
    run = subprocess.run([python, "-c", CLIENT, server.url, PROMPTS[1], str(TOKENS)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["models"] == ["base", "a", "b"]
    assert out["completion"] == alone["a", PROMPTS[1]] and out["stream"] == alone["b", PROMPTS[1]]
    assert out["chat"] == out["chat_stream"]
    assert out["not_found"] == 404 and out["too_long"] == 400


@pytest.mark.slow  # a fresh interpreter loads torch, numba and the model: ~15 s
def test_ctrl_c_stops_the_server_cleanly(store):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "sparsemerge.cli.main", "serve", str(store.path), "--port", "0", "--max-seq", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving 2 task(s)" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split("/v1")[0]
        status, _ = _post(url + "/v1/completions", {"model": "b", "prompt": "The", "max_tokens": 3})
        assert status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_client_that_leaves_a_stream_stops_its_generation(server):
    import socket

    host, port = server.url.split("//")[1].split(":")
    body = json.dumps({"model": "b", "prompt": "The", "max_tokens": 100, "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.0 200")
    before = len(server.scheduler.history)
    sock.close()  # leave mid-stream
    deadline = time.time() + 60
    while server.scheduler.pending() or server.scheduler._current is not None:
        assert time.time() < deadline, "the abandoned generation did not stop"
        time.sleep(0.05)
    assert server.scheduler.cancelled == 1  # stopped early, not run to its 100 tokens
    status, payload = _post(server.url + "/v1/completions", {"model": "a", "prompt": "The", "max_tokens": 2})
    assert status == 200 and len(server.scheduler.history) == before + 1
