"""Machine participants: a model observer answers survey trials through the same JSON API as people.

The client sees exactly what a browser sees (opaque image URLs, queries by position) and nothing
else.  The default observer applies the MIS decision rule (DESIGN §6) to an image embedding:
with s(q, E) the mean cosine similarity of q to the examples E,

    Δ = [s(upper, right) − s(upper, left)] − [s(lower, right) − s(lower, left)],

it answers "upper" when Δ > 0, with confidence from P = σ(α·|Δ|).  Embeddings come from
:mod:`survey_app.embeddings`, so the machine participant and the offline MIS (:mod:`survey_app.mis`)
see the same features.
"""
from __future__ import annotations

import http.client
import io
import json
import math
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from PIL import Image


class SurveyRequestError(RuntimeError):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status, self.reason = status, reason


# ---- transports --------------------------------------------------------------------------
class Transport(Protocol):
    def request(self, method: str, path: str, body: dict | None, headers: dict) -> tuple[int, bytes]: ...


class HttpTransport:
    """HTTP/1.1 with one kept-alive connection (reopened after a failure)."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"survey URL {base_url!r} must look like http://host:port")
        self.scheme, self.host, self.port, self.timeout = url.scheme, url.hostname, url.port, timeout
        self.prefix = url.path.rstrip("/")
        self.conn = None

    def _connect(self):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def request(self, method, path, body, headers):
        data = None if body is None else json.dumps(body).encode()
        headers = {**headers, **({"Content-Type": "application/json"} if data is not None else {})}
        for attempt in range(3):
            self.conn = self.conn or self._connect()
            try:
                self.conn.request(method, self.prefix + path, body=data, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class FlaskTransport:
    """In-process transport on a Flask test client (tests, offline runs)."""

    def __init__(self, app):
        self.client = app.test_client()

    def request(self, method, path, body, headers):
        r = self.client.open(path, method=method, json=body, headers=headers)
        return r.status_code, r.data


# ---- the API client --------------------------------------------------------------------
@dataclass
class TrialImages:
    left: list[Image.Image]
    right: list[Image.Image]
    upper: Image.Image
    lower: Image.Image


class SurveyClient:
    """One machine session: create it with the API token, then fetch trials and post answers."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.session: str | None = None
        self.token: str | None = None
        self._images: dict[str, Image.Image] = {}

    def _call(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        status, data = self.transport.request(method, path, body, {"Authorization": f"Bearer {token or self.token}"})
        if status >= 400:
            try:
                reason = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                reason = data[:200].decode(errors="replace")
            raise SurveyRequestError(status, reason)
        return json.loads(data)

    def start(self, api_token: str, observer: str, *, mode: str = "exhaustive", condition: str | None = None,
              seed: int | None = None) -> dict:
        body = {"observer": observer, "mode": mode, **({"condition": condition} if condition else {}),
                **({"seed": seed} if seed is not None else {})}
        out = self._call("POST", "/api/sessions", body, token=api_token)
        self.session, self.token = out["session"], out["token"]
        return out["state"]

    def state(self) -> dict:
        return self._call("GET", f"/api/sessions/{self.session}")

    def respond(self, trial_id: str, choice: str, confidence: int, rt_ms: float = 0.0) -> dict:
        key = f"m-{secrets.token_hex(8)}"
        body = {"trial": trial_id, "choice": choice, "confidence": confidence, "rt_ms": rt_ms, "key": key}
        try:
            return self._call("POST", f"/api/sessions/{self.session}/responses", body)
        except (OSError, http.client.HTTPException):   # lost reply: the same key makes the retry safe
            return self._call("POST", f"/api/sessions/{self.session}/responses", body)

    def image(self, url: str) -> Image.Image:
        if url not in self._images:
            status, data = self.transport.request("GET", url, None, {})
            if status != 200:
                raise SurveyRequestError(status, f"image {url} could not be fetched")
            self._images[url] = Image.open(io.BytesIO(data)).convert("RGB")
        return self._images[url]

    def images(self, trial: dict) -> TrialImages:
        return TrialImages([self.image(u) for u in trial["left"]], [self.image(u) for u in trial["right"]],
                           self.image(trial["upper"]), self.image(trial["lower"]))


# ---- observers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    choice: str        # upper | lower
    confidence: int    # 1..3
    delta: float
    p: float           # σ(α·|Δ|): the observer's probability of being right


Embedding = Callable[[list[Image.Image]], torch.Tensor]


def confidence_from(p: float) -> int:
    return 1 if p < 0.6 else (2 if p < 0.8 else 3)


class SimilarityObserver:
    """The MIS decision rule on an embedding (any function from images to row vectors)."""

    def __init__(self, embed: Embedding, alpha: float = 16.0, name: str = "similarity"):
        self.embed, self.alpha, self.name = embed, alpha, name

    def delta(self, t: TrialImages) -> float:
        """Δ with the upper query in the max role (the formula of :func:`survey_app.mis.similarity_deltas`)."""
        from .mis import similarity_deltas
        feats = self.embed(t.left + t.right + [t.upper, t.lower])
        k_left, k_right = len(t.left), len(t.right)
        n = k_left + k_right
        return float(similarity_deltas(feats, torch.tensor([n]), torch.tensor([n + 1]),
                                       torch.arange(k_left, n).view(1, -1), torch.arange(k_left).view(1, -1))[0])

    def decide(self, t: TrialImages) -> Decision:
        d = self.delta(t)
        p = 1.0 / (1.0 + math.exp(-self.alpha * abs(d)))
        return Decision("upper" if d > 0 else "lower", confidence_from(p), d, p)


def run_session(client: SurveyClient, observer, *, api_token: str, mode: str = "exhaustive",
                condition: str | None = None, progress: Callable[[int, int], None] | None = None,
                seed: int | None = None) -> dict:
    """Answer every trial of a new machine session (``seed``: its draws, else random); return a summary with
    per-trial decisions."""
    state = client.start(api_token, observer.name, mode=mode, condition=condition, seed=seed)
    decisions = []
    while "trial" in state:
        trial = state["trial"]
        d = observer.decide(client.images(trial))
        result = client.respond(trial["id"], d.choice, d.confidence)
        decisions.append({"trial": trial["id"], "choice": d.choice, "confidence": d.confidence, "delta": d.delta,
                          "p": d.p, "correct": result["correct"]})
        if progress:
            progress(result["progress"]["done"], result["progress"]["total"])
        state = client.state()
    n = len(decisions)
    return {"session": client.session, "stage": state["stage"], "trials": n,
            "accuracy": sum(x["correct"] for x in decisions) / n if n else float("nan"), "decisions": decisions}
