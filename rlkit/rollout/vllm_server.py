"""The ``vllm`` engine's server mode: a client of ``rlkit vllm-serve`` (vLLM's OpenAI-compatible server in
dev mode). Prompts go as token ids to ``/v1/completions``; samples come back with token ids and the log-probs
of the distribution sampled; weights go through a safetensors directory and the server's
``reload_weights`` (``/collective_rpc``). At start the client waits for a server that is still starting and
checks that what answers is vLLM, in dev mode, with the trainer's tokenizer (see :class:`VLLMServerEngine`).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from rlkit.errors import first_line
from rlkit.models import resolve_model_path
from rlkit.rollout.base import Sample, SamplingParams
from rlkit.rollout.schema import base_server_url
from rlkit.rollout.vllm import EngineError, check_prompt_length, request_seeds, stop_token_ids, to_samples
from rlkit.runs import is_main_process
from rlkit.weights import full_weights


def make_server_engine(cfg, tokenizer, *, model=None, model_path=None, max_len=None, max_prompt_len=None,
                       **_) -> VLLMServerEngine:
    """A client of the server at ``cfg.server_url`` (``rollout:`` a VLLMServerRollout) that samples ``model``'s
    weights when given (pushed now), else the server's own, which must then be ``model_path``'s."""
    stop_ids = stop_token_ids(resolve_model_path(model_path), tokenizer) if model_path else None
    engine = VLLMServerEngine(cfg.server_url, tokenizer, timeout=cfg.server_timeout, stop_ids=stop_ids,
                              sync_dir=cfg.sync_dir, wait=cfg.server_wait, model_path=model_path)
    if max_prompt_len is not None:
        engine.check_prompt_length(max_prompt_len, max(0, (max_len or max_prompt_len) - max_prompt_len))
    if model is not None:
        engine.sync_weights(model)
    elif model_path and is_main_process():
        # no weights to push (rlkit eval, rlkit sample): the server's own must be model_path's
        path = resolve_model_path(model_path)
        if not same_model(engine.model_root, path):
            raise EngineError(f"rollout.server_url {engine.url}: the vLLM server serves {engine.model_root}, not "
                              f"{model_path}, and samples with its own weights; start it with `rlkit vllm-serve "
                              f"--model {model_path}`")
    return engine


class VLLMServerEngine:
    """A client of ``rlkit vllm-serve`` (vLLM's OpenAI-compatible server in dev mode).

    At start it waits up to ``wait`` seconds for a server that is still starting (its ``/health``, as TRL's
    client), then checks that what answers is vLLM (``/v1/models``, ``/version``), with the dev endpoints
    the weight reload needs (``/is_sleeping`` stands for them) and the trainer's tokenizer (``/tokenize``)."""

    def __init__(self, url: str, tokenizer, timeout: float = 600.0, stop_ids: list[int] | None = None,
                 sync_dir: str | None = None, wait: float = 0.0, model_path: str | None = None):
        self.url = _base_url(url)
        self.tokenizer = tokenizer
        self.timeout = timeout
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.stop_ids = stop_ids if stop_ids is not None else eos
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.model_path = model_path
        self._wait_for_server(wait)
        self.model, self.max_model_len = self._identify()
        self._check_tokenizer()

    # ---------------------------------------------------------------------------------- start-up checks

    def _wait_for_server(self, wait: float) -> None:
        """Poll ``/health`` until it answers 200, for up to ``wait`` seconds (a server that is starting
        refuses connections until its model is loaded)."""
        deadline = time.monotonic() + wait
        announced = False
        while True:
            left = deadline - time.monotonic()
            try:
                self._request("GET", "/health", timeout=10.0 if wait <= 0 else max(1.0, min(10.0, left)))
                return
            except EngineError as e:
                if e.kind == "reply":
                    return  # it answers 200 (what it is, _identify tells)
                if e.kind in ("dns", "tls") or (e.status is not None and 400 <= e.status < 500):
                    raise self._not_there(e) from None  # a wrong host, scheme or path: waiting cannot help
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._not_there(e, waited=wait) from None
                if not announced and is_main_process():
                    print(f"waiting up to {wait:g} s for the vLLM server at {self.url} to start "
                          "(rollout.server_wait)", flush=True)
                    announced = True
                time.sleep(min(1.0, left))

    def _not_there(self, e: EngineError, waited: float = 0.0) -> EngineError:
        port = urlsplit(self.url).port
        start = f"`rlkit vllm-serve --model DIR{f' --port {port}' if port else ''}`"
        if e.kind == "dns":
            return EngineError(f"rollout.server_url {self.url}: unknown host ({e.reason}); check the URL")
        if e.kind == "tls":
            return EngineError(f"rollout.server_url {self.url}: {e.reason}; check the URL")
        if e.status is not None and 400 <= e.status < 500:
            return EngineError(f"rollout.server_url {self.url} answers but is not a vLLM server (GET /health: "
                               f"HTTP {e.status}); start one with {start} or check the URL")
        waited_text = f"within {waited:g} s (rollout.server_wait)" if waited > 0 else "(rollout.server_wait 0)"
        return EngineError(f"rollout.server_url {self.url}: no vLLM server answers {waited_text}: {e.reason}; "
                           f"start one with {start}, check the URL, or raise rollout.server_wait")

    def _not_vllm(self, what: str) -> EngineError:
        return EngineError(f"rollout.server_url {self.url} answers but is not a vLLM server ({what}); start one "
                           "there with `rlkit vllm-serve --model DIR` or check the URL")

    def _get_json(self, path: str):
        """GET ``path``: its JSON, or EngineError(kind reply) when the answer is not JSON."""
        try:
            return self._request("GET", path, timeout=min(30.0, self.timeout))
        except EngineError as e:
            if e.kind == "reply" or (e.status is not None and 400 <= e.status < 500):
                raise self._not_vllm(f"GET {path}: {e.reason}") from None
            raise

    def _identify(self) -> tuple[str, int | None]:
        """The served model's name and context, after checking the server is vLLM with its dev endpoints."""
        models = self._get_json("/v1/models")
        data = models.get("data") if isinstance(models, dict) else None
        entry = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        if not isinstance(entry.get("id"), str):
            raise self._not_vllm(f"GET /v1/models: {json.dumps(models)[:80]}, not a list of models")
        version = self._get_json("/version")
        if not (isinstance(version, dict) and isinstance(version.get("version"), str)):
            raise self._not_vllm(f"GET /version: {json.dumps(version)[:80]}, not a vLLM version")
        try:
            sleeping = self._request("GET", "/is_sleeping", timeout=min(30.0, self.timeout))
        except EngineError as e:
            if e.status == 404:
                raise EngineError(f"rollout.server_url {self.url}: the vLLM server there ({version['version']}) has "
                                  "no dev endpoints (/collective_rpc reloads the trainer's weights): start it with "
                                  "`rlkit vllm-serve --model DIR`, or `vllm serve` with VLLM_SERVER_DEV_MODE=1") from None
            if e.kind == "reply":
                raise self._not_vllm(f"GET /is_sleeping: {e.reason}") from None
            raise
        if not (isinstance(sleeping, dict) and isinstance(sleeping.get("is_sleeping"), bool)):
            raise self._not_vllm(f"GET /is_sleeping: {json.dumps(sleeping)[:80]}")
        max_len = entry.get("max_model_len")
        self.model_root = entry["root"] if isinstance(entry.get("root"), str) else entry["id"]  # its --model
        return entry["id"], max_len if isinstance(max_len, int) and max_len > 0 else None

    def _check_tokenizer(self) -> None:
        """The server must read the trainer's token ids as the trainer does: its tokenizer on a probe text
        (with the EOS token) gives the same ids. A server without a tokenizer is not checked."""
        probe = "rlkit probe: 12 + 34 = 46 <think> Héllo, wörld! </think>" + (self.tokenizer.eos_token or "")
        want = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        try:
            got = self._request("POST", "/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False},
                                timeout=min(30.0, self.timeout))
        except EngineError as e:
            if e.status is None:
                raise
            return
        tokens = got.get("tokens") if isinstance(got, dict) else None
        if tokens is not None and list(tokens) != list(want):
            ours = f" ({self.model_path})" if self.model_path else ""
            raise EngineError(f"rollout.server_url {self.url}: the vLLM server serves {self.model}, whose tokenizer "
                              f"differs from the trainer's{ours}; start the server with the trainer's model: "
                              f"`rlkit vllm-serve --model {self.model_path or 'DIR'}`")

    # ------------------------------------------------------------------------------------------- wire

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        timeout = timeout or self.timeout
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e.read().decode(errors="replace"))
            raise EngineError(f"vLLM server {self.url}{path}: HTTP {e.code}: {detail}", reason=f"HTTP {e.code} {detail}",
                              status=e.code, kind="http") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            cause = getattr(e, "reason", e)
            if isinstance(cause, (http.client.BadStatusLine, http.client.LineTooLong)) and not isinstance(
                    cause, ConnectionError):  # RemoteDisconnected is a BadStatusLine: a server going away
                raise EngineError(f"vLLM server {self.url}{path}: the answer is not HTTP ({type(cause).__name__})",
                                  reason=f"the answer is not HTTP ({type(cause).__name__})", kind="reply") from None
            if isinstance(cause, ssl.SSLError):
                raise EngineError(f"vLLM server {self.url}: TLS failed ({first_line(cause)})",
                                  reason=f"TLS failed ({first_line(cause)}); `rlkit vllm-serve` speaks http://",
                                  kind="tls") from None
            if isinstance(cause, (TimeoutError, socket.timeout)):
                raise EngineError(f"vLLM server {self.url}{path}: no answer within {timeout:g} s (rollout.server_timeout "
                                  "for a request); raise it if the server is busy, or check the server; the last "
                                  "checkpoint is kept: run the same command to resume",
                                  reason=f"no answer within {timeout:g} s", kind="timeout") from None
            reason = str(cause) or type(cause).__name__
            kind = "dns" if isinstance(cause, socket.gaierror) else "refused"
            raise EngineError(f"vLLM server {self.url} stopped answering ({reason}); the last checkpoint is kept: "
                              f"restart the server and run the same command to resume", reason=reason, kind=kind) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            text = raw[:60].decode(errors="replace")
            raise EngineError(f"vLLM server {self.url}{path}: the answer is not JSON ({text!r})",
                              reason=f"the answer is not JSON ({text!r})", kind="reply") from None

    # -------------------------------------------------------------------------------------- the engine

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress=None) -> list[list[Sample]]:
        """One request per prompt, all in flight at once (the server batches them), each with its own seed."""
        from concurrent.futures import ThreadPoolExecutor

        self.check_prompt_length(max(map(len, prompt_ids), default=0), params.max_new_tokens)

        greedy = params.temperature == 0
        # every sampling field explicit: the server's defaults may come from the model's generation config
        base = {"model": self.model, "n": params.n, "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if greedy else params.temperature, "top_p": 1.0 if greedy else params.top_p,
                "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "logprobs": 0, "return_token_ids": True,
                "ignore_eos": params.ignore_eos, "skip_special_tokens": True}
        if not params.ignore_eos:
            base["stop_token_ids"] = self.stop_ids

        def one(ids_seed):
            ids, seed = ids_seed
            resp = self._request("POST", "/v1/completions", {**base, "prompt": list(ids), "seed": seed})
            out = []
            for c in sorted(resp["choices"], key=lambda c: c["index"]):
                tokens = c.get("token_ids")
                if tokens is None:
                    raise EngineError(f"vLLM server {self.url}: the response carries no token ids (rlkit needs "
                                      "a vLLM whose completions API has return_token_ids)")
                lps = (c.get("logprobs") or {}).get("token_logprobs")
                out.append((list(tokens), list(lps) if lps is not None else None, c.get("finish_reason") or "length"))
            if progress is not None:
                progress(len(out))
            return out

        with ThreadPoolExecutor(max_workers=max(1, min(64, len(prompt_ids)))) as pool:
            per_prompt = list(pool.map(one, zip(prompt_ids, request_seeds(params, len(prompt_ids)))))
        return to_samples(self.tokenizer, [o for group in per_prompt for o in group], params.n)

    def check_prompt_length(self, longest: int, budget: int) -> None:
        """EngineError when a prompt of ``longest`` tokens leaves no room for a completion in the server's
        max_model_len."""
        check_prompt_length(longest, budget, self.max_model_len,
                             f"the vLLM server at {self.url} has max_model_len {{n}}, no room for a completion after a "
                             "prompt of {longest} tokens; restart it with `rlkit vllm-serve --max-model-len {need}` "
                             "(the longest prompt + {m} new tokens)")

    def sync_weights(self, model) -> None:
        """Write the weights as safetensors into a directory the server can read (``rollout.sync_dir``, or a
        temporary one on this machine), then ask the server to reload from it."""
        from safetensors.torch import save_file

        if self.sync_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rlkit-vllm-sync-")
            self.sync_dir = Path(self._tmp.name)
        d = self.sync_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineError(f"rollout.sync_dir {d}: cannot create it ({e.strerror})") from None
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in full_weights(model)}
        tmp = d / "model.safetensors.tmp"
        save_file(_untie(tensors), str(tmp), metadata={"format": "pt"})
        tmp.replace(d / "model.safetensors")
        try:
            self._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(d)}})
        except EngineError as e:
            if e.status is None:
                raise
            model = self.model_path or "DIR"
            raise EngineError(f"vLLM server {self.url}: it could not reload the trainer's weights from {d} ({e.reason}; "
                              f"its log has the cause): the server must serve the trainer's model (`rlkit vllm-serve "
                              f"--model {model}`) and see rollout.sync_dir") from None
        self._request("POST", "/reset_prefix_cache")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = self.sync_dir = None

    def sleep(self) -> None:
        pass  # the server's memory is its own

    def wake(self) -> None:
        pass


def same_model(served: str, path: str) -> bool:
    """Whether the server's ``--model`` is ``path``: the same directory, or the same hub name; True when this
    machine cannot tell (one is a directory here, the other not)."""
    a, b = Path(served).expanduser(), Path(path).expanduser()
    if a.is_dir() and b.is_dir():
        return os.path.samefile(a, b)
    if a.is_dir() or b.is_dir():
        return True
    return served == path


def _base_url(url: str) -> str:
    try:
        return base_server_url(url)
    except ValueError as e:
        raise EngineError(f"rollout.server_url {e}") from None


def _error_detail(body: str) -> str:
    """The message of a server's error body (vLLM: ``{"error": {"message": ...}}``; FastAPI: ``{"detail": ...}``)."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
        msg = msg or doc.get("detail") or doc.get("message")
        if isinstance(msg, str) and msg:
            body = msg
    return " ".join(body.split())[:300] or "no details"


def _untie(tensors: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, t in tensors.items():
        ptr = t.data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.setdefault(ptr, k)
    return out
