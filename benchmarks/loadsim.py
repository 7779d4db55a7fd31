"""Simulated participants over real HTTP against a multi-worker gunicorn server, and the database
checks that follow: shared by ``benchmarks.survey_load`` and ``tests/survey/test_load.py``.

A simulated participant behaves like the browser page: it opens the study link, consents,
reads the instructions, loads the trial page (and its stylesheet), then loops GET state → fetch
the trial's images (each URL once, as a browser cache would; ``prefetch`` too) → answer → POST the
response, until the session is complete, and finally follows ``/complete`` to the completion
redirect.  It answers by brightness (max images are bright in :mod:`survey_app.testing` banks), so
practice passes; it claims ``rt_ms`` ≥ ``min_response_ms`` instead of waiting (``think_ms`` adds a
real delay).  To exercise idempotency it re-sends some responses with the same key — half of
them after the first reply, half at the same moment on a second connection (a browser retry
whose first reply was lost) — and once per session sends an already-answered trial with a new
key and reuses a key for a different answer (both must be refused with 409).

Each participant keeps a ledger of the responses the server acknowledged; :func:`verify` compares
the database with it (nothing lost, nothing duplicated) and checks condition and unit balance.
"""
from __future__ import annotations

import contextlib
import html
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from survey_app.db import scratch_postgres  # noqa: F401  (used by benchmarks.survey_load)

# Survey settings of the load runs: exclusions that only a too-fast robot would fail are relaxed
# (min_instruction_s, min_total_s), since excluded participants stop holding balance slots, and the
# server-clock check is off, since the simulated participants claim their reaction times.
LOAD_SURVEY = {"practice_trials": 5, "main_trials": 40, "catch_trials": 5, "min_response_ms": 1500,
               "completion_code": "LOAD", "min_instruction_s": 0.0, "min_total_s": 0.0,
               "min_answers_per_position": 1, "check_server_time": False, "require_external_id": "no"}
CLAIMED_RT_MS = 1600.0

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
REFRESH_RE = re.compile(r'http-equiv="refresh" content="\d+;url=([^"]+)"')
SESSION_RE = re.compile(r'session:\s*"([^"]+)"')
STATIC_RE = re.compile(r'(?:href|src)="(/static/[^"]+)"')
ROUTES = ("state", "response", "response_retry", "response_conflict", "image", "page", "static", "events")


class LoadError(RuntimeError):
    """A simulated participant got an answer it should not have."""


# ---- HTTP ------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


class Latencies:
    """Per route label, ``(started, seconds)`` of every request (``perf_counter`` start, to separate the
    arrival burst from the steady state); appended from many threads (list.append is atomic)."""

    def __init__(self):
        self.samples: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def add(self, route: str, seconds: float, started: float) -> None:
        self.samples[route].append((started, seconds))

    @property
    def by_route(self) -> dict[str, list[float]]:
        return {route: [sec for _, sec in v] for route, v in self.samples.items()}

    def summary(self, since: float | None = None) -> dict[str, dict]:
        out = {}
        for route in sorted(self.samples):
            v = [sec for t, sec in self.samples[route] if since is None or t >= since]
            if v:
                out[route] = percentiles(v)
        return out


def percentiles(values: list[float]) -> dict:
    """n, mean, p50, p90, p99 and max in milliseconds (nearest-rank percentiles)."""
    v = sorted(values)
    n = len(v)

    def rank(q):
        return v[min(n - 1, max(0, int(-(-q * n // 1)) - 1))]
    return {"n": n, "mean_ms": 1000 * sum(v) / n, "p50_ms": 1000 * rank(0.50), "p90_ms": 1000 * rank(0.90),
            "p99_ms": 1000 * rank(0.99), "max_ms": 1000 * v[-1]}


class Browser:
    """One keep-alive connection with a cookie jar; a connection the server closed is reopened once."""

    def __init__(self, host: str, port: int, latencies: Latencies, *, timeout: float = 120.0,
                 cookies: dict | None = None):
        self.host, self.port, self.timeout, self.latencies = host, port, timeout, latencies
        self.cookies = cookies if cookies is not None else {}
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, route: str, *, body: bytes | None = None,
                headers: dict | None = None) -> Reply:
        hdrs = {"User-Agent": "sparsight-loadsim/1", "Accept-Encoding": "identity", **(headers or {})}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest, http.client.BadStatusLine):
                # The server closed an idle keep-alive connection: nothing was processed, send again
                # (responses carry an idempotency key, so even a processed POST would be safe).
                self.close()
                if attempt:
                    raise
                self.reconnects += 1
                continue
            seconds = time.perf_counter() - t0
            self.latencies.add(route, seconds, t0)
            for header in resp.headers.get_all("Set-Cookie") or []:
                name, _, value = header.split(";", 1)[0].partition("=")
                if value and "expires=thu, 01 jan 1970" not in header.lower():
                    self.cookies[name.strip()] = value.strip()
                else:
                    self.cookies.pop(name.strip(), None)
            if resp.will_close:
                self.close()
            return Reply(resp.status, resp.headers, data, seconds)
        raise AssertionError("unreachable")

    def get(self, path: str, route: str) -> Reply:
        return self.request("GET", path, route)

    def post_form(self, path: str, fields: dict, route: str = "page") -> Reply:
        return self.request("POST", path, route, body=urllib.parse.urlencode(fields).encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})

    def post_json(self, path: str, payload, route: str, csrf: str) -> Reply:
        return self.request("POST", path, route, body=json.dumps(payload).encode(),
                            headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})


def expect(reply: Reply, status: int, what: str) -> Reply:
    if reply.status != status:
        raise LoadError(f"{what}: HTTP {reply.status} (expected {status}): {reply.text[:300]}")
    return reply


def brightness(png: bytes) -> float:
    from PIL import Image
    with Image.open(io.BytesIO(png)) as im:
        data = im.convert("L").tobytes()
    return sum(data) / max(1, len(data))


# ---- one participant -------------------------------------------------------------------------
@dataclass
class SimConfig:
    think_ms: float = 0.0             # real delay before each answer (the claimed rt_ms is separate)
    think_jitter: float = 0.5         # each delay is think_ms × uniform(1 - jitter, 1 + jitter)
    rt_ms: float = CLAIMED_RT_MS      # the reaction time the participant claims
    retry_rate: float = 0.1           # share of responses re-sent with the same key (at least one per session)
    practice_fail_rate: float = 0.0   # share of participants answering their first practice trial wrong
    fetch_images: bool = True         # fetch every trial image (as a browser does); False: the two queries only
    completion_code: str = "LOAD"
    timeout_s: float = 120.0


@dataclass
class ParticipantLog:
    index: int
    external_id: str
    session: str | None = None
    ledger: dict = field(default_factory=dict)     # trial id -> {"key", "choice", "confidence", "correct"}
    retries: int = 0
    retries_ok: int = 0
    conflicts: int = 0
    conflicts_ok: int = 0
    practice_attempts: int = 0
    final_stage: str | None = None
    completion_location: str | None = None
    reconnects: int = 0
    error: str | None = None
    seconds: float = 0.0
    first_trial_at: float | None = None             # perf_counter when the first trial state arrived


class SimParticipant:
    def __init__(self, index: int, host: str, port: int, latencies: Latencies, cfg: SimConfig, seed: int):
        self.cfg, self.latencies = cfg, latencies
        self.rng = random.Random(f"{seed}:{index}")
        self.log = ParticipantLog(index, external_id=f"load-{seed}-{index}-{uuid.uuid4().hex[:8]}")
        self.browser = Browser(host, port, latencies, timeout=cfg.timeout_s)
        self.host, self.port = host, port
        self.images: dict[str, bytes] = {}
        self.fail_practice = self.rng.random() < cfg.practice_fail_rate
        self.csrf = ""
        self.api = ""
        self.n_keys = 0

    # -- pieces ----------------------------------------------------------------------------
    def image(self, url: str) -> bytes:
        if url not in self.images:
            self.images[url] = expect(self.browser.get(url, "image"), 200, f"GET {url}").body
        return self.images[url]

    def state(self) -> dict:
        return expect(self.browser.get(self.api, "state"), 200, f"GET {self.api}").json()

    def new_key(self) -> str:
        self.n_keys += 1
        return f"{self.log.session[:8]}-{self.n_keys}-{self.rng.getrandbits(32):08x}"

    def post_response(self, body: dict, route: str, browser: Browser | None = None) -> Reply:
        return (browser or self.browser).post_json(self.api + "/responses", body, route, self.csrf)

    def start(self) -> None:
        b, log = self.browser, self.log
        query = urllib.parse.urlencode({"PROLIFIC_PID": log.external_id, "STUDY_ID": "load-study",
                                        "SESSION_ID": f"s-{log.external_id}"})
        html = expect(b.get(f"/?{query}", "page"), 200, "GET /").text
        csrf = CSRF_RE.search(html)
        if not csrf:
            raise LoadError("no CSRF token in the consent page")
        self.csrf = csrf.group(1)
        r = expect(b.post_form("/consent", {"csrf_token": self.csrf, "consent": "yes", "PROLIFIC_PID": log.external_id,
                                            "STUDY_ID": "load-study", "SESSION_ID": f"s-{log.external_id}",
                                            "window": "1280x900"}), 302, "POST /consent")
        if not r.location.endswith("/instructions"):
            raise LoadError(f"consent redirected to {r.location!r}, expected /instructions")
        expect(b.get("/instructions", "page"), 200, "GET /instructions")
        r = expect(b.post_form("/instructions", {"csrf_token": self.csrf}), 302, "POST /instructions")
        if not r.location.endswith("/trials"):
            raise LoadError(f"instructions redirected to {r.location!r}, expected /trials")
        html = expect(b.get("/trials", "page"), 200, "GET /trials").text
        sid = SESSION_RE.search(html)
        if not sid:
            raise LoadError("no session id in the trial page")
        log.session = sid.group(1)
        self.api = f"/api/sessions/{urllib.parse.quote(log.session)}"
        for asset in sorted(set(STATIC_RE.findall(html))):
            expect(b.get(asset, "static"), 200, f"GET {asset}")
        expect(b.post_json(self.api + "/events", {"events": [{"kind": "page", "detail": "trials", "t": 0.0},
                                                             {"kind": "fullscreen_enter", "t": 5.0}]},
                           "events", self.csrf), 200, "POST events")

    def answer(self, state: dict) -> tuple[str, int]:
        t = state["trial"]
        if self.cfg.fetch_images:
            for url in t["left"] + t["right"]:
                self.image(url)
        upper, lower = brightness(self.image(t["upper"])), brightness(self.image(t["lower"]))
        if self.cfg.fetch_images:
            for url in state.get("prefetch", []):
                self.image(url)
        choice = "upper" if upper > lower else "lower"
        if self.fail_practice and t["block"] == "practice" and t["attempt"] == 1 and t["number"] == 1:
            choice = "lower" if choice == "upper" else "upper"
        return choice, self.rng.randint(1, 3)

    def retry(self, body: dict, first: dict | None) -> dict:
        """Send ``body`` again with the same key; when ``first`` is None, send the original and the retry
        at the same moment on two connections. Returns the (non-replayed) feedback."""
        log = self.log
        log.retries += 1
        if first is not None:
            r = expect(self.post_response(body, "response_retry"), 200, "retry with the same key").json()
            replies = [first, r]
        else:
            other = Browser(self.host, self.port, self.latencies, timeout=self.cfg.timeout_s,
                            cookies=self.browser.cookies)
            out: dict = {}

            def send_twin():
                try:
                    out["twin"] = self.post_response(body, "response_retry", browser=other)
                except Exception as err:  # noqa: BLE001 - re-raised below
                    out["twin_error"] = err
            th = threading.Thread(target=send_twin)
            th.start()
            main = self.post_response(body, "response")
            th.join()
            other.close()
            if "twin_error" in out:
                raise LoadError(f"concurrent retry failed: {out['twin_error']!r}")
            replies = [expect(main, 200, "POST response (concurrent pair)").json(),
                       expect(out["twin"], 200, "concurrent retry with the same key").json()]
        fresh = [x for x in replies if not x["replayed"]]
        if len(fresh) != 1 or len({(x["correct"], x["correct_position"], x["trial"]) for x in replies}) != 1:
            raise LoadError(f"a retry with the same key was not replayed identically: {replies}")
        log.retries_ok += 1
        return fresh[0]

    def conflicts(self, body: dict) -> None:
        """An answered trial under a new key, and the used key for a different answer: both 409."""
        log = self.log
        for variant in ({**body, "key": self.new_key()},
                        {**body, "choice": "lower" if body["choice"] == "upper" else "upper"}):
            log.conflicts += 1
            r = self.post_response(variant, "response_conflict")
            if r.status != 409:
                raise LoadError(f"a duplicate answer got HTTP {r.status}, expected 409: {r.text[:200]}")
            log.conflicts_ok += 1

    # -- the session -----------------------------------------------------------------------
    def run(self) -> ParticipantLog:
        log, t0 = self.log, time.perf_counter()
        try:
            self.start()
            state = self.state()
            log.first_trial_at = time.perf_counter()
            concurrent_next, conflicted = True, False
            while state["stage"] in ("practice", "main"):
                if "trial" not in state:
                    raise LoadError(f"stage {state['stage']!r} but no trial in the state: {state}")
                trial = state["trial"]
                log.practice_attempts = max(log.practice_attempts, state.get("practice_attempt") or 0)
                choice, confidence = self.answer(state)
                if self.cfg.think_ms:
                    j = self.cfg.think_jitter
                    time.sleep(self.cfg.think_ms / 1000 * self.rng.uniform(1 - j, 1 + j))
                body = {"trial": trial["id"], "choice": choice, "confidence": confidence,
                        "rt_ms": self.cfg.rt_ms, "key": self.new_key()}
                retry = self.rng.random() < self.cfg.retry_rate
                if retry and concurrent_next:
                    feedback = self.retry(body, None)
                else:
                    feedback = expect(self.post_response(body, "response"), 200, "POST response").json()
                    if feedback["replayed"]:
                        raise LoadError(f"a first response came back replayed: {feedback}")
                    if retry or (feedback["stage"] not in ("practice", "main") and not log.retries):
                        feedback = self.retry(body, feedback)
                        retry = True
                if retry:
                    concurrent_next = not concurrent_next
                if feedback["trial"] != trial["id"]:
                    raise LoadError(f"feedback for {feedback['trial']!r}, expected {trial['id']!r}")
                log.ledger[trial["id"]] = {"key": body["key"], "choice": choice, "confidence": confidence,
                                           "correct": feedback["correct"], "block": trial["block"]}
                if trial["block"] == "main" and not conflicted:
                    self.conflicts(body)
                    conflicted = True
                state = self.state()
            log.final_stage = state["stage"]
            if state["stage"] == "complete":
                r = expect(self.browser.get("/complete", "page"), 200, "GET /complete")
                found = REFRESH_RE.search(r.text)     # the page shows the code, then goes on to the completion URL
                log.completion_location = html.unescape(found.group(1)) if found else None
        except Exception as err:  # noqa: BLE001 - reported by verify()
            log.error = f"{type(err).__name__}: {err}"
        finally:
            log.reconnects = self.browser.reconnects
            self.browser.close()
            log.seconds = time.perf_counter() - t0
        return log


@dataclass
class LoadRun:
    logs: list[ParticipantLog]
    latencies: Latencies
    wall_s: float
    t0: float = 0.0

    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.samples.values())

    def steady_since(self) -> float | None:
        """When the last participant reached its first trial: later requests are the steady state
        (no consent/assignment burst); None if some never did."""
        marks = [log.first_trial_at for log in self.logs]
        return None if not marks or None in marks else max(marks)

    def summary(self) -> dict:
        accepted = sum(len(log.ledger) for log in self.logs)
        since = self.steady_since()
        return {"participants": len(self.logs), "wall_s": self.wall_s, "requests": self.requests(),
                "requests_per_s": self.requests() / self.wall_s, "responses_saved": accepted,
                "responses_per_s": accepted / self.wall_s,
                "sessions_per_min": 60 * sum(log.final_stage == "complete" for log in self.logs) / self.wall_s,
                "reconnects": sum(log.reconnects for log in self.logs), "routes": self.latencies.summary(),
                "arrival_s": None if since is None else since - self.t0,
                "steady_routes": self.latencies.summary(since) if since is not None else {}}


def run_participants(base_url: str, n: int, cfg: SimConfig | None = None, *, seed: int = 0,
                     ramp_s: float = 0.0) -> LoadRun:
    """``n`` simulated participants at once (one thread each; ``ramp_s`` spreads their arrival)."""
    cfg = cfg or SimConfig()
    parsed = urllib.parse.urlsplit(base_url)
    latencies = Latencies()
    sims = [SimParticipant(i, parsed.hostname, parsed.port, latencies, cfg, seed) for i in range(n)]
    barrier = threading.Barrier(n + 1)

    def go(sim: SimParticipant):
        barrier.wait()
        if ramp_s:
            time.sleep(ramp_s * sim.log.index / max(1, n - 1))
        sim.run()
    threads = [threading.Thread(target=go, args=(s,), name=f"participant-{s.log.index}", daemon=True) for s in sims]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        while th.is_alive():       # a timed join keeps Ctrl-C working
            th.join(0.5)
    return LoadRun([s.log for s in sims], latencies, time.perf_counter() - t0, t0)


# ---- other load on the machine ---------------------------------------------------------------
class CpuMonitor:
    """CPU seconds used during a run by this process tree (client and server) and by every other
    process (another test run on the same cores distorts latencies).  Processes whose command line
    contains one of ``mine`` (e.g. the PostgreSQL backends serving a scratch database) count as ours.
    Samples ``/proc`` every ``interval_s`` in a thread; Linux only (elsewhere it reports nothing)."""

    def __init__(self, mine: tuple[str, ...] = (), interval_s: float = 1.0):
        self.mine, self.interval_s = tuple(m for m in mine if m), interval_s
        self.last: dict[int, tuple[bool, float]] = {}
        self.ours = self.others = 0.0
        self.wall = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _sample(self) -> None:
        procs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick)
            except (OSError, ValueError, IndexError):
                continue
        root = os.getpid()
        ours = {root}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in procs.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        for pid, (_, cpu) in procs.items():
            mine = pid in ours
            if not mine and self.mine:
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
                    mine = any(m in cmd for m in self.mine)
            prev = self.last.get(pid)
            if prev is not None:
                delta = max(0.0, cpu - prev[1])
                if mine or prev[0]:
                    self.ours += delta
                else:
                    self.others += delta
            self.last[pid] = (mine or (prev[0] if prev else False), cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self):
        if os.path.isdir("/proc"):
            self._sample()
            self._t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-monitor")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self.wall = time.perf_counter() - self._t0
        return False

    def report(self) -> dict:
        if not self.wall:
            return {}
        return {"wall_s": self.wall, "ours_cores": self.ours / self.wall, "others_cores": self.others / self.wall,
                "cpus": os.cpu_count()}


# ---- the server ------------------------------------------------------------------------------
GUNICORN_HOOKS = '''\
import os
from pathlib import Path


def post_worker_init(worker):
    # called once the worker has imported the app: the load starts when every worker answers
    Path(os.environ["SPARSIGHT_LOADSIM_READY"], str(worker.pid)).touch()
'''


ACCESS_FORMAT = "%(m)s %(U)s %(s)s %(D)s"


def server_times(access_log: str | Path) -> dict[str, dict]:
    """Percentiles of the time gunicorn's worker spent per request (``%(D)s``, from parsing the request
    to the last byte written: no accept queue, no client), by route as the client labels them
    (retries and conflicts count as ``response``)."""
    lat = Latencies()
    for line in Path(access_log).read_text().splitlines():
        parts = line.split()
        if len(parts) != 4 or not parts[3].isdigit():
            continue
        method, path, _, micros = parts
        if path.startswith("/api/sessions/"):
            route = "response" if path.endswith("/responses") else "events" if path.endswith("/events") else "state"
        elif path.startswith("/stimuli/"):
            route = "image"
        elif path.startswith("/static/"):
            route = "static"
        else:
            route = "page"
        lat.add(route, int(micros) / 1e6, 0.0)
    return lat.summary()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gunicorn_server(run_dir: str | Path, *, database_url: str | None = None, workers: int = 4, threads: int = 4,
                    port: int | None = None, boot_timeout_s: float = 180.0, extra_args: tuple = (),
                    log_path: str | Path | None = None, access_log: str | Path | None = None):
    """``gunicorn -k gthread survey_app.wsgi:app`` on a free loopback port; yields its base URL once
    every worker has loaded the app and the consent page answers; stops it (SIGTERM) afterwards.

    ``access_log``: a file for one line per request with the time the worker spent on it (see
    :func:`server_times`)."""
    port = port or free_port()
    scratch = Path(tempfile.mkdtemp(prefix="sparsight-gunicorn-"))
    ready = scratch / "ready"
    ready.mkdir()
    hooks = scratch / "hooks.py"
    hooks.write_text(GUNICORN_HOOKS)
    log_path = Path(log_path) if log_path else scratch / "gunicorn.log"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "SPARSIGHT_RUN_DIR": str(run_dir), "SPARSIGHT_LOADSIM_READY": str(ready),
           "PYTHONPATH": os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    env.pop("SPARSIGHT_DATABASE_URL", None)
    if database_url:
        env["SPARSIGHT_DATABASE_URL"] = database_url
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(hooks), "-w", str(workers), "-k", "gthread",
           "--threads", str(threads), "-b", f"127.0.0.1:{port}", "--log-level", "warning", *extra_args]
    if access_log:
        cmd += ["--access-logfile", str(access_log), "--access-logformat", ACCESS_FORMAT]
    cmd.append("survey_app.wsgi:app")
    log = open(log_path, "wb")
    # same process group as the caller: Ctrl-C stops the server too, even if the caller dies first
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(repo))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + boot_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{_tail(log_path)}")
            if len(list(ready.iterdir())) >= workers and _answers(port, access_log):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not get {workers} workers ready in {boot_timeout_s:g} s:\n"
                                   f"{_tail(log_path)}")
            time.sleep(0.2)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        server_log = _tail(log_path)
        if server_log.strip():
            print(f"--- gunicorn log ({log_path}) ---\n{server_log}", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)


def _answers(port: int, access_log: str | Path | None = None) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        return False
    if ok and access_log:   # the readiness probe is not part of the load
        with contextlib.suppress(OSError):
            time.sleep(0.2)
            Path(access_log).write_text("")
    return ok


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return Path(path).read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


# ---- checks ----------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        return f"[{mark}] {self.name}: {self.detail}"


def _spread(counter: Counter, keys) -> int:
    values = [counter.get(k, 0) for k in keys]
    return max(values) - min(values) if values else 0


@dataclass
class Stored:
    """What the database holds after a load run."""
    participants: dict          # public_id → participant row
    trials: list
    responses: list
    multi_response_trials: list  # (trial_id, count) for trials with more than one response


def read_database(database_url: str) -> Stored:
    """The participants, trials and responses of the survey database at ``database_url``."""
    from sqlalchemy import create_engine, func, select

    from survey_app.models import Participant, Response, Trial
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            participants = {r.public_id: r for r in conn.execute(select(
                Participant.id, Participant.public_id, Participant.stage, Participant.excluded,
                Participant.condition, Participant.practice_attempt, Participant.is_machine))}
            trials = conn.execute(select(Trial.id, Trial.public_id, Trial.participant_id, Trial.block, Trial.attempt,
                                         Trial.trial_type, Trial.model_id, Trial.kind, Trial.layer, Trial.unit,
                                         Trial.task)).all()
            responses = conn.execute(select(Response.trial_id, Response.participant_id, Response.idempotency_key,
                                            Response.choice, Response.confidence)).all()
            per_trial = conn.execute(select(Response.trial_id, func.count()).group_by(Response.trial_id)
                                     .having(func.count() > 1)).all()
    finally:
        engine.dispose()
    return Stored(participants, trials, responses, per_trial)


def material_conditions(survey: dict, run_dir: str | Path) -> dict[str, set[tuple]]:
    """Condition → the (model_id, kind, layer, unit) items the study's material assigns to it."""
    from survey_app.material import Material
    material = Material(Path(run_dir) / "stimuli", models=list(survey.get("models", [])) or None,
                        kinds=list(survey.get("kinds", ["natural", "synthetic"])))
    return {cond: {(i.model_id, i.kind, i.layer, i.unit) for i in items} for cond, items in
            material.conditions(survey.get("condition_by", "model-kind")).items()}


def check_client(logs: list[ParticipantLog]) -> Check:
    errors = [f"#{log.index}: {log.error}" for log in logs if log.error]
    return Check("client", not errors, f"{len(logs) - len(errors)}/{len(logs)} participants finished without "
                 f"an unexpected reply" + (f"; first: {errors[:3]}" if errors else ""))


def check_participants(logs: list[ParticipantLog], stored: Stored) -> Check:
    participants = stored.participants
    client_ids = {log.session for log in logs if log.session}
    missing, extra = client_ids - set(participants), set(participants) - client_ids
    complete = [p for p in participants.values() if p.stage == "complete"]
    return Check("participants", not missing and not extra and len(complete) == len(logs) == len(participants),
                 f"{len(participants)} in the database for {len(logs)} simulated, {len(complete)} complete"
                 + (f", {len(missing)} missing" if missing else "")
                 + (f", {len(extra)} unexpected" if extra else ""))


def check_not_excluded(stored: Stored) -> Check:
    excluded = [p for p in stored.participants.values() if p.excluded]
    return Check("not excluded", not excluded, f"{len(excluded)} excluded (excluded sessions stop holding "
                 "balance slots)")


@dataclass
class LedgerAudit:
    """The database compared with every participant's ledger of acknowledged responses."""
    lost: list = field(default_factory=list)            # (participant, trial) served but unanswered
    wrong_count: list = field(default_factory=list)     # (participant, stored, expected)
    mismatched: list = field(default_factory=list)      # (participant, trial) acknowledged but not stored as sent
    unacked: list = field(default_factory=list)         # (participant, trial) stored but never acknowledged
    expected_total: int = 0


def audit_ledgers(logs: list[ParticipantLog], stored: Stored, practice_n: int, main_n: int) -> LedgerAudit:
    trials_of: dict[int, list] = defaultdict(list)
    for t in stored.trials:
        trials_of[t.participant_id].append(t)
    resp_by_trial = {r.trial_id: r for r in stored.responses}
    resp_count = Counter(r.participant_id for r in stored.responses)
    audit = LedgerAudit()
    for log in logs:
        p = stored.participants.get(log.session)
        if p is None:
            continue
        mine = trials_of[p.id]
        # every trial of every practice attempt that was served, and of the main block, is answered
        should = [t for t in mine if t.block == "main" or t.attempt <= p.practice_attempt]
        audit.lost += [(log.index, t.public_id) for t in should if t.id not in resp_by_trial]
        expect_n = practice_n * p.practice_attempt + main_n
        audit.expected_total += expect_n
        if resp_count[p.id] != expect_n:
            audit.wrong_count.append((log.index, resp_count[p.id], expect_n))
        by_public = {t.public_id: t for t in mine}
        for trial_id, entry in log.ledger.items():
            t = by_public.get(trial_id)
            r = resp_by_trial.get(t.id) if t is not None else None
            if r is None or (r.idempotency_key, r.choice, r.confidence) != (entry["key"], entry["choice"],
                                                                           entry["confidence"]):
                audit.mismatched.append((log.index, trial_id))
        acked = set(log.ledger)
        audit.unacked += [(log.index, t.public_id) for t in mine
                          if t.id in resp_by_trial and t.public_id not in acked]
    return audit


def check_no_lost(audit: LedgerAudit, practice_n: int, main_n: int) -> Check:
    lost, wrong_count, mismatched = audit.lost, audit.wrong_count, audit.mismatched
    return Check("no lost responses", not lost and not wrong_count and not mismatched,
                 f"every served trial answered ({len(lost)} without a response), per-participant counts "
                 f"= {practice_n} × practice attempts + {main_n} ({len(wrong_count)} off), every "
                 f"acknowledged response stored as sent ({len(mismatched)} missing or different)"
                 + (f"; e.g. {(lost + wrong_count + mismatched)[:3]}"
                    if lost or wrong_count or mismatched else ""))


def check_no_duplicates(audit: LedgerAudit, logs: list[ParticipantLog], stored: Stored) -> Check:
    per_trial, responses = stored.multi_response_trials, stored.responses
    acked_total = sum(len(log.ledger) for log in logs)
    return Check("no duplicated responses", not per_trial and not audit.unacked
                 and len(responses) == audit.expected_total == acked_total,
                 f"{len(responses)} stored = {audit.expected_total} expected = {acked_total} "
                 f"acknowledged; {len(per_trial)} trials with >1 response, {len(audit.unacked)} stored responses "
                 "never acknowledged")


def check_idempotency(logs: list[ParticipantLog]) -> Check:
    retries = sum(log.retries for log in logs)
    retries_ok = sum(log.retries_ok for log in logs)
    conflicts = sum(log.conflicts for log in logs)
    conflicts_ok = sum(log.conflicts_ok for log in logs)
    no_retry = [log.index for log in logs if not log.error and not log.retries]
    return Check("idempotency", retries == retries_ok and conflicts == conflicts_ok and not no_retry
                 and retries > 0, f"{retries_ok}/{retries} same-key retries replayed (half of them sent "
                 f"concurrently with the original), {conflicts_ok}/{conflicts} conflicting duplicates "
                 "refused with 409")


def check_completion_redirect(logs: list[ParticipantLog], code: str) -> Check:
    bad = [log.index for log in logs if f"cc={code}" not in (log.completion_location or "")]
    return Check("completion redirect", not bad, f"{len(logs) - len(bad)}/{len(logs)} redirected to the "
                 f"completion URL with code {code!r}")


def completed_humans(stored: Stored) -> list:
    """Participants who count for balance: people (not machines), complete, not excluded."""
    return [p for p in stored.participants.values() if not p.is_machine and p.stage == "complete" and not p.excluded]


def check_condition_balance(humans: list, conditions_material: dict[str, set[tuple]]) -> Check:
    conditions = Counter(p.condition for p in humans)
    spread_c = _spread(conditions, list(conditions_material))
    return Check("condition balance", spread_c <= 1, f"participants per condition "
                 f"{dict(sorted(conditions.items()))} (spread {spread_c}, allowed 1)")


@dataclass
class MainTrialCounts:
    """Main trials of the balance-counting participants, counted three ways."""
    by_cond_item: dict = field(default_factory=lambda: defaultdict(Counter))   # condition → item → trials
    by_item_task: dict = field(default_factory=lambda: defaultdict(Counter))   # item → task → trials
    per_participant_pair: Counter = field(default_factory=Counter)             # (participant, item, task) → trials


def count_main_trials(stored: Stored, humans: list) -> MainTrialCounts:
    cond_of = {p.id: p.condition for p in humans}
    counts = MainTrialCounts()
    for t in stored.trials:
        if t.participant_id in cond_of and t.trial_type == "main":
            item = (t.model_id, t.kind, t.layer, t.unit)
            counts.by_cond_item[cond_of[t.participant_id]][item] += 1
            counts.by_item_task[item][t.task] += 1
            counts.per_participant_pair[(t.participant_id, item, t.task)] += 1
    return counts


def check_unit_balance(counts: MainTrialCounts, humans: list, conditions_material: dict[str, set[tuple]]) -> Check:
    by_cond_item = counts.by_cond_item
    conditions = Counter(p.condition for p in humans)
    foreign = sum(1 for cond, c in by_cond_item.items() for item in c if item not in conditions_material.get(cond, ()))
    worst_item = max((_spread(by_cond_item[cond], items) for cond, items in conditions_material.items()
                      if conditions.get(cond)), default=0)
    return Check("unit balance", worst_item <= 1 and not foreign,
                 f"per condition, main trials per unit differ by at most {worst_item} (allowed 1); "
                 f"{sum(sum(c.values()) for c in by_cond_item.values())} main trials, {foreign} units outside "
                 "their participant's condition")


def check_task_balance(counts: MainTrialCounts) -> Check:
    by_item_task = counts.by_item_task
    worst_task = max((max(c.values()) - min(c.values()) for c in by_item_task.values() if c), default=0)
    n_tasks = {item: len(c) for item, c in by_item_task.items()}
    repeats = max(counts.per_participant_pair.values(), default=0)
    return Check("task balance", worst_task <= 1,
                 f"per unit, main trials per task differ by up to {worst_task}; the same (unit, task) "
                 f"is shown up to {repeats}× to one participant; tasks used per unit "
                 f"{sorted(set(n_tasks.values()))} (informational: assignment balances units, see "
                 "assignment.choose_main)", required=False)


def verify(database_url: str, logs: list[ParticipantLog], survey: dict, run_dir: str | Path) -> list[Check]:
    """Compare the database with what the simulated participants were told (see the module docstring).

    Balance: the condition with the fewest participants is chosen for each new one, so participants
    per condition differ by at most 1; within a condition the least-assigned units come first, so
    main trials per unit (over every participant of the condition) differ by at most 1.
    """
    conditions_material = material_conditions(survey, run_dir)
    practice_n, main_n = survey["practice_trials"], survey["main_trials"] + survey["catch_trials"]
    code = survey.get("completion_code", "")
    checks = [check_client(logs)]
    stored = read_database(database_url)
    audit = audit_ledgers(logs, stored, practice_n, main_n)
    checks += [check_participants(logs, stored), check_not_excluded(stored), check_no_lost(audit, practice_n, main_n),
               check_no_duplicates(audit, logs, stored), check_idempotency(logs)]
    if code:
        checks.append(check_completion_redirect(logs, code))
    humans = completed_humans(stored)
    counts = count_main_trials(stored, humans)
    checks += [check_condition_balance(humans, conditions_material),
               check_unit_balance(counts, humans, conditions_material), check_task_balance(counts)]
    return checks


def print_summary(run: LoadRun, *, title: str = "", file=None) -> None:
    file = file or sys.stdout
    s = run.summary()
    if title:
        print(title, file=file)
    print(f"  {s['participants']} participants in {s['wall_s']:.1f} s: {s['requests']} requests "
          f"({s['requests_per_s']:.0f}/s), {s['responses_saved']} responses saved ({s['responses_per_s']:.1f}/s), "
          f"{s['sessions_per_min']:.1f} sessions/min, {s['reconnects']} reconnects", file=file)
    print(f"  {'route':<18}{'n':>7}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}  (ms, whole run)", file=file)
    for route in ROUTES:
        if route in s["routes"]:
            r = s["routes"][route]
            print(f"  {route:<18}{r['n']:>7}{r['mean_ms']:>9.1f}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}", file=file)
    if s["steady_routes"]:
        print(f"  steady state (after every participant reached its first trial, {s['arrival_s']:.1f} s in):",
              file=file)
        for route in ("state", "response"):
            if route in s["steady_routes"]:
                r = s["steady_routes"][route]
                print(f"  {route:<18}{r['n']:>7}{r['mean_ms']:>9.1f}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}"
                      f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}", file=file)
