"""An OpenAI-compatible chat client for API models: the seed's GPT-4 answers, GPT-3.5 judge and GPT-4o paraphrases.

A model spec ``openai:MODEL`` (``grader.judge=openai:gpt-3.5-turbo``, ``source.kind=openai:gpt-4``,
``paraphrase.model=openai:gpt-4o``) names a model behind any server that speaks the OpenAI chat-completions API
(``POST {api_base}/chat/completions`` with ``Authorization: Bearer <key>``): OpenAI itself (the default base
``https://api.openai.com/v1``) and the servers that mimic it (vLLM, llama.cpp's server, Ollama, LiteLLM; Azure
deployments that want an ``api-key`` header instead go through such a proxy). The key is read from the environment
(``OPENAI_API_KEY`` by default), never from a config file, so it never lands in a run folder.

Why ``httpx`` and not the ``openai`` package: one chat completion is one JSON POST, and every behaviour the
studies depend on (which replies are retried, how long to wait, what a refused model looks like, the cache) has
to be ours, written here where it can be tested against a stub server. ``httpx`` gives plain HTTP with a
connection pool shared by the threads and separate connect/read timeouts; the ``openai`` package would add a
dependency tree and its own retry and timeout policy on top of the one the studies need. Threads give the
bounded concurrency (the requests wait on the network, not the CPU):

* **bounded concurrency** (``concurrency`` requests in flight at most);
* **retries with exponential backoff** on 429 and 5xx replies, timeouts and dropped connections (a
  ``Retry-After`` header is honoured, capped at ``max_backoff_s``); other 4xx replies fail at once;
* **timeouts** per request (``timeout_s``);
* **an on-disk cache** (:class:`ReplyCache`, JSONL, one line per request and reply, appended as each reply arrives,
  in the run folder): a resumed run sends no request twice, and a finished run re-grades offline (no key needed
  when every request is cached). The cache key is the request body (model, messages, parameters), not the URL,
  so the same model behind another address reuses it;
* **clear errors** (:class:`ChatError`) for a missing key, an unreachable or wrong URL, a refused model or key,
  and a reply without ``choices[0].message.content``. Replies received before a failure stay in the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import httpx

API_PREFIX = "openai:"
DEFAULT_API_BASE = "https://api.openai.com/v1"
CACHE_FILE = "api_cache.jsonl"


class ChatError(RuntimeError):
    """A request to an API model failed in a way retrying will not fix (the message says what to do)."""


def is_api_spec(spec: Optional[str]) -> bool:
    return isinstance(spec, str) and spec.startswith(API_PREFIX)


def api_model(spec: str) -> str:
    """'openai:gpt-4o' -> 'gpt-4o' (a clear error for an empty name)."""
    if not is_api_spec(spec) or not spec[len(API_PREFIX):].strip():
        raise ChatError(f"an API model is written {API_PREFIX}MODEL, e.g. openai:gpt-3.5-turbo; got {spec!r}")
    return spec[len(API_PREFIX):].strip()


def request_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ReplyCache:
    """Every (request body, reply) pair in a JSONL file, appended and flushed as each reply arrives."""

    def __init__(self, path=None):
        self.path = pathlib.Path(path) if path else None
        self._lock = threading.Lock()
        self._replies: dict = {}
        if self.path and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self._replies[rec["key"]] = rec["reply"]
                except (ValueError, KeyError, TypeError):
                    if i < len(lines):
                        raise ChatError(f"{self.path}: line {i} is not a cache record; fix: delete the line or the "
                                        f"file (its replies are then requested again)") from None
                    # a last line cut by a crash mid-write: ignore it, the request is sent again

    def get(self, key: str) -> Optional[str]:
        return self._replies.get(key)

    def put(self, key: str, body: dict, reply: str) -> None:
        with self._lock:
            self._replies[key] = reply
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "request": body, "reply": reply}, ensure_ascii=False) + "\n")
                    f.flush()

    def __len__(self) -> int:
        return len(self._replies)


@dataclass
class ChatClient:
    """Chat completions from one API model (see the module docstring). ``complete`` keeps the input order."""
    model: str
    api_base: str = ""                       # '' = $OPENAI_BASE_URL or https://api.openai.com/v1
    key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    params: dict = field(default_factory=dict)   # extra body fields (temperature, max_tokens); the seed sent none
    cache: Optional[ReplyCache] = None
    requests_sent: int = 0

    def __post_init__(self):
        if is_api_spec(self.model):
            self.model = api_model(self.model)
        self.api_base = (self.api_base or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_BASE).rstrip("/")
        if not self.api_base.startswith(("http://", "https://")):
            raise ChatError(f"api_base {self.api_base!r} is not an http(s) URL; fix: e.g. --set "
                            f"grader.api_base=https://api.openai.com/v1 (the part before /chat/completions)")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ChatError("concurrency >= 1, max_retries >= 0 and timeout_s > 0, got "
                            f"{self.concurrency}, {self.max_retries}, {self.timeout_s}")
        self.cache = self.cache if self.cache is not None else ReplyCache()
        self._count_lock = threading.Lock()
        self._client: Optional[httpx.Client] = None

    @property
    def url(self) -> str:
        return self.api_base + "/chat/completions"

    def body(self, messages: list) -> dict:
        return {"model": self.model, "messages": messages, **self.params}

    def ask(self, prompts: Sequence[str], system: Optional[str] = None, desc: str = "",
            extras: Optional[Sequence[dict]] = None) -> list:
        """One reply per user prompt, each sent as [system?, user]."""
        sys_msg = [{"role": "system", "content": system}] if system else []
        return self.complete([sys_msg + [{"role": "user", "content": p}] for p in prompts], desc, extras)

    def complete(self, conversations: Sequence[list], desc: str = "", extras: Optional[Sequence[dict]] = None) -> list:
        """Replies in input order. ``extras[i]``: body fields of request i only (e.g. a per-note ``seed``, which
        also keeps identical prompts apart in the cache where each should get its own sample)."""
        extras = list(extras) if extras is not None else [{}] * len(conversations)
        bodies = [{**self.body(list(m)), **x} for m, x in zip(conversations, extras)]
        keys = [request_key(b) for b in bodies]
        todo = {}
        for k, b in zip(keys, bodies):
            if self.cache.get(k) is None:
                todo.setdefault(k, b)
        if todo:
            key = self._key()
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                futures = [pool.submit(self._send, k, b, key) for k, b in todo.items()]
                errors = []
                for f in futures:
                    try:
                        f.result()
                    except ChatError as e:
                        errors.append(e)
                if errors:
                    done = len(todo) - len(errors)
                    raise ChatError(f"{errors[0]} ({len(errors)} of {len(todo)} requests failed; {done} replies "
                                    f"received are kept in the cache"
                                    + (f" {self.cache.path}" if self.cache.path else "") + ", so a rerun sends only "
                                    "the missing ones)") from errors[0]
        return [self.cache.get(k) for k in keys]

    # ---- one request ------------------------------------------------------------------------------------------
    def _key(self) -> str:
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise ChatError(f"the API key is missing: set the environment variable {self.key_env} (e.g. `export "
                            f"{self.key_env}=sk-...`); a local server that needs no key accepts any value")
        return key

    def _send(self, k: str, body: dict, api_key: str) -> None:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                with self._count_lock:
                    self.requests_sent += 1
                resp = self._http().post(self.url, content=json.dumps(body).encode(), headers=headers)
            except httpx.ConnectError as e:
                last = f"cannot reach {self.url} ({e}); fix: check api_base and that the server is running"
            except httpx.TransportError as e:        # timeouts, connections dropped mid-reply, protocol errors
                last = f"no reply from {self.url} ({type(e).__name__}: {e}); the server is slow, down or unreachable"
            else:
                code = resp.status_code
                if code < 300:
                    self.cache.put(k, body, self._content(resp.content))
                    return
                detail = _error_detail(resp)
                if code == 429 or code >= 500:
                    last, retry_after = f"HTTP {code} from {self.url}: {detail}", resp.headers.get("Retry-After")
                elif code in (401, 403):
                    raise ChatError(f"{self.url} refused the API key (HTTP {code}: {detail}); fix: check "
                                    f"{self.key_env}")
                elif code == 404 and "model" not in detail.lower():
                    raise ChatError(f"{self.url} does not exist (HTTP 404: {detail}); fix: api_base is the URL "
                                    f"before /chat/completions, e.g. https://api.openai.com/v1")
                else:
                    raise ChatError(f"{self.url} refused the request for model {self.model!r} (HTTP {code}: "
                                    f"{detail}); fix: check the model name and that this server serves it")
            if attempt < self.max_retries:
                time.sleep(self._wait(attempt, retry_after))
        raise ChatError(f"{last} (after {self.max_retries + 1} attempts)")

    def _http(self) -> httpx.Client:
        """One connection pool for the client's threads (httpx.Client is thread-safe), made on first use."""
        with self._count_lock:
            if self._client is None:
                self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 30.0)),
                                            limits=httpx.Limits(max_connections=self.concurrency),
                                            follow_redirects=True)
            return self._client

    def _wait(self, attempt: int, retry_after) -> float:
        try:
            if retry_after is not None:
                return min(float(retry_after), self.max_backoff_s)
        except ValueError:
            pass
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * (0.5 + random.random() / 2)

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatError(f"malformed reply from {self.url}: expected JSON with choices[0].message.content, got "
                            f"{raw[:200]!r}; fix: point api_base at an OpenAI-compatible chat-completions server")
        if content is None:           # a filtered or empty completion: the seed stored such replies as errors
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"malformed reply from {self.url}: message.content is {type(content).__name__}, not text")
        return content


def _error_detail(resp: httpx.Response) -> str:
    try:
        msg = resp.json().get("error", {})
        return str(msg.get("message") if isinstance(msg, dict) else msg) or resp.text[:200]
    except Exception:
        return resp.reason_phrase or resp.text[:200]


def client_for(spec: str, api_base: str = "", run_dir=None, api=None, **params) -> ChatClient:
    """A :class:`ChatClient` for ``openai:MODEL`` with its cache in ``run_dir/api_cache.jsonl`` and the limits of
    an :class:`ApiConfig`-like ``api`` (concurrency, timeout_s, retries, key_env)."""
    kw = {}
    if api is not None:
        kw = dict(concurrency=api.concurrency, timeout_s=api.timeout_s, max_retries=api.retries, key_env=api.key_env,
                  backoff_s=api.backoff_s)
    cache = ReplyCache(pathlib.Path(run_dir) / CACHE_FILE if run_dir else None)
    return ChatClient(api_model(spec), api_base=api_base, cache=cache, params={k: v for k, v in params.items()
                                                                               if v is not None}, **kw)
