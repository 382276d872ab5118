"""``sparsemerge serve STORE``: the task store behind an HTTP API of the OpenAI API's shape
(stdlib ``http.server``; request shapes in :mod:`.openai_api`).

``GET /v1/models`` lists ``base`` and the store's tasks; ``POST /v1/completions`` and
``POST /v1/chat/completions`` generate with the model named by ``model`` (a task, ``base``
or a combination ``0.5*a+0.5*b``), whole or streamed as server-sent events (``data: {...}``
lines, then ``data: [DONE]``). Every request goes to its task's queue
(:class:`.scheduler.TaskScheduler`); one worker switches the model (:class:`.switch.TaskSwitcher`,
in place, cached) between requests only, and runs the compiled decode loop
(:class:`~sparsemerge.runtime.engine.DecodeEngine`). Bad requests get OpenAI-style JSON
errors with 4xx codes; a failure inside one request never stops the server.
"""
from __future__ import annotations

import copy
import json
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from sparsemerge.deploy import openai_api as api
from sparsemerge.deploy.scheduler import Cancelled, TaskScheduler
from sparsemerge.errors import SparsemergeError

log = logging.getLogger(__name__)
MAX_BODY = 8 << 20


class TaskServer:
    """The loaded store, the worker and the HTTP server (``port=0``: any free port)."""

    def __init__(self, store_path: str, host: str = "127.0.0.1", port: int = 8000, max_seq: int = 2048,
                 cache_bytes: int = 1 << 30, burst: int = 8, act_quant: str = "none") -> None:
        from sparsemerge.deploy.store import TaskStore
        from sparsemerge.deploy.switch import TaskSwitcher
        from sparsemerge.kernels.model import load_for_run
        from sparsemerge.runtime.engine import DecodeEngine

        self.store = TaskStore(store_path)
        loaded = load_for_run(str(self.store.base_dir), act_quant=act_quant)  # as `sparsemerge run` loads it
        if loaded.tokenizer is None:
            raise SparsemergeError(f"the store's base {str(self.store.base_dir)!r} has no tokenizer files; pack it from a "
                                   "Hugging Face folder that has them")
        # request threads encode with their own copy, under a lock: a fast tokenizer used from
        # several threads at once can fail ("Already borrowed"); the worker decodes with the original
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self._tok_lock = threading.Lock()
        self.engine = DecodeEngine(loaded.model, loaded.tokenizer, act_quant=act_quant, max_seq=max_seq)
        self.switcher = TaskSwitcher(self.store, loaded.model, self.engine, cache_bytes=cache_bytes)
        self.context = self.engine.max_seq
        self.vocab = int(self.engine.plan.config["vocab"])
        self.scheduler = TaskScheduler(self.switcher.activate, burst, start=False)  # start() or serve_forever() runs it
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def models(self) -> list[str]:
        return ["base"] + self.store.tasks()

    def check_model(self, name: str) -> str:
        """The canonical queue key of ``name`` (a task, 'base' or 'w*a+w*b'); 404 if unknown."""
        from sparsemerge.deploy.switch import parse_spec

        try:
            weights = parse_spec(name)
        except SparsemergeError as exc:
            raise api.ApiError(404, f"The model {name!r} does not exist ({exc})", param="model", code="model_not_found") from None
        unknown = [n for n in weights if n not in self.store.index["tasks"]]
        if unknown:
            raise api.ApiError(404, f"The model {unknown[0]!r} does not exist; GET /v1/models lists the tasks",
                               param="model", code="model_not_found")
        if not weights:
            return "base"
        if len(weights) == 1 and next(iter(weights.values())) == 1.0:
            return next(iter(weights))
        return "+".join(f"{w:g}*{n}" for n, w in sorted(weights.items()))

    def chat_prompt(self, messages: list) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            with self._tok_lock:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return api.simple_chat_prompt(messages)

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text)["input_ids"])

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "TaskServer":
        """Serve in background threads (tests, embedding in a program); :meth:`stop` ends it.
        Decoding there is slower than under :meth:`serve_forever` (see TaskScheduler)."""
        self.scheduler.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (KeyboardInterrupt), then shut down cleanly: HTTP in a background
        thread, the model's worker in this one (numba's parallel regions are fastest launched
        from the main thread; see TaskScheduler)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        try:
            self.scheduler.run_here()
        except KeyboardInterrupt:
            pass
        finally:
            self.httpd.shutdown()
            self._thread.join(10)
            self.close()

    def stop(self) -> None:
        self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join(10)
        self.close()

    def close(self) -> None:
        self.scheduler.close()
        self.httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # open streams do not hold up the shutdown
    request_queue_size = 128  # the listen backlog (socketserver's 5 resets bursts of clients)


class _Handler(BaseHTTPRequestHandler):
    server_version = "sparsemerge"
    protocol_version = "HTTP/1.0"  # one request per connection: streams end when the connection closes

    @property
    def app(self) -> TaskServer:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ routing
    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _guard(self, fn) -> None:
        try:
            fn()
        except api.ApiError as exc:
            self._json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the server
            log.exception("request failed")
            self._json(500, api.ApiError(500, f"internal error: {exc}", type="server_error").body())

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _get(self) -> None:
        path = self._path()
        if path == "/v1/models":
            return self._json(200, api.models_body(self.app.models()))
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name not in self.app.models():
                raise api.ApiError(404, f"The model {name!r} does not exist", param="model", code="model_not_found")
            return self._json(200, api.models_body([name])["data"][0])
        if path == "/health":
            return self._json(200, {"status": "ok", "active": self.app.scheduler.active,
                                    "pending": self.app.scheduler.pending(), "switches": self.app.scheduler.switches,
                                    "cancelled": self.app.scheduler.cancelled})
        if path in ("/v1/completions", "/v1/chat/completions"):
            raise api.ApiError(405, f"{path} takes POST", code="method_not_allowed")
        raise api.ApiError(404, f"no route {path!r}; try GET /v1/models", code="not_found")

    def _post(self) -> None:
        path = self._path()
        kind = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}.get(path)
        if kind is None:
            raise api.ApiError(404 if path not in ("/v1/models", "/health") else 405, f"no POST route {path!r}", code="not_found")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise api.ApiError(411, "a Content-Length header is required", code="length_required") from None
        if not 0 <= length <= MAX_BODY:
            raise api.ApiError(413, f"the request body must be at most {MAX_BODY} bytes", code="too_large")
        body = api.parse_json(self.rfile.read(length))
        app = self.app
        req = api.parse_request(body, kind, app.check_model, app.encode, app.chat_prompt, app.context, app.vocab)
        if req.stream:
            return self._stream(req)
        job = app.scheduler.submit(req.model, lambda job: self._generate(job, req, None))
        result = self._wait(job)
        text = result.text
        self._json(200, api.response_body(req, text, api.finish_reason(result.stop_reason), len(req.ids), len(result.tokens)))

    # ------------------------------------------------------------------ generation
    def _generate(self, job, req: api.GenRequest, pieces: "Optional[queue.Queue]"):
        """Runs on the worker, with the model switched to ``req.model``."""
        from sparsemerge.runtime.sampling import SamplingConfig

        def on_token(_tok: int, piece: str) -> None:
            job.check()
            if pieces is not None and piece:
                pieces.put(piece)

        sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        return self.app.engine.generate(req.ids, req.max_tokens, sampling, req.stop, on_token=on_token)

    def _wait(self, job):
        try:
            return job.wait()
        except Cancelled:
            raise api.ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except SparsemergeError as exc:
            raise api.ApiError(400, str(exc)) from None

    def _stream(self, req: api.GenRequest) -> None:
        pieces: "queue.Queue[str]" = queue.Queue()
        job = self.app.scheduler.submit(req.model, lambda job: self._generate(job, req, pieces))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            first = True
            if req.kind == "chat":
                self._event(api.chunk_body(req, None, None, first=True))
                first = False
            while True:
                try:
                    piece = pieces.get(timeout=0.05)
                except queue.Empty:
                    if job.done.is_set() and pieces.empty():
                        break
                    continue
                self._event(api.chunk_body(req, piece, None, first=first))
                first = False
            try:
                result = self._wait(job)
                self._event(api.chunk_body(req, None, api.finish_reason(result.stop_reason)))
            except api.ApiError as exc:
                self._event(exc.body())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True  # the client left: stop generating for it

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
