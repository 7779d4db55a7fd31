"""Survey load over loopback: latency of the trial and response routes, throughput, and what the
database holds afterwards, with many participants at once against a multi-worker gunicorn server.

Creates a temporary study directory (synthetic stimulus bank; 5 practice, 40 main and 5 catch trials,
``min_response_ms`` 1500, completion code ``LOAD``), starts ``gunicorn -k gthread survey_app.wsgi:app``
on a free loopback port, waits until every worker has loaded the app, and lets ``--participants``
simulated participants (one thread and one keep-alive connection with its own cookie jar each; see
``benchmarks/loadsim.py``) take the whole study at once: consent, instructions, every trial with its
images (answered by brightness, ``rt_ms`` claimed as 1600 — no real waiting unless ``--think-ms``),
the completion redirect.  About 10 % of responses are re-sent with the same idempotency key (half
concurrently with the original), and every session once re-sends an answered trial under a new key
and reuses a key for another answer (both must get 409).

Measured: per-request latency (client side, loopback, including queueing in the server) of
``GET /api/sessions/<id>`` (the trial route: state + current trial) and ``POST
/api/sessions/<id>/responses`` (the response route), p50/p90/p99/max, plus requests/s, saved
responses/s and sessions/min.  Then verified from the database: no lost responses, none
duplicated, every session complete, participants per condition and main trials per unit within 1.
Exits non-zero when a check fails (the latency target, p99 < ``--target-ms``, is reported only).

With zero think time every participant sends its next request as soon as the last one returns, so
the server runs saturated and latency is mostly queueing (≈ participants / throughput); use
``--think-ms`` (e.g. 3000: a person's answer plus feedback) for latency at a realistic request rate.

    python -m benchmarks.survey_load                                  # SQLite, 100 participants, 4 workers
    python -m benchmarks.survey_load --baseline                       # + the same run on one worker
    python -m benchmarks.survey_load --think-ms 3000                  # realistic pacing
    python -m benchmarks.survey_load --database "$SPARSIGHT_TEST_DATABASE_URL"   # PostgreSQL scratch database
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks import loadsim
from survey_app.testing import make_study_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=100, help="simulated participants, all at once")
    p.add_argument("--workers", type=int, default=4, help="gunicorn worker processes (2 × cores)")
    p.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker (gthread)")
    p.add_argument("--think-ms", type=float, default=0.0, help="real delay before each answer (default: none)")
    p.add_argument("--think-jitter", type=float, default=0.5,
                   help="each delay is think-ms × uniform(1 - jitter, 1 + jitter), so participants drift apart")
    p.add_argument("--rt-ms", type=float, default=loadsim.CLAIMED_RT_MS, help="reaction time each response claims")
    p.add_argument("--retry-rate", type=float, default=0.1, help="share of responses re-sent with the same key")
    p.add_argument("--practice-fail-rate", type=float, default=0.0,
                   help="share of participants who get one practice answer wrong (the practice repeats)")
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread participant arrivals over this many seconds")
    p.add_argument("--no-images", action="store_true", help="fetch only the two query images of each trial")
    p.add_argument("--practice-trials", type=int, default=loadsim.LOAD_SURVEY["practice_trials"])
    p.add_argument("--main-trials", type=int, default=loadsim.LOAD_SURVEY["main_trials"])
    p.add_argument("--catch-trials", type=int, default=loadsim.LOAD_SURVEY["catch_trials"])
    p.add_argument("--database", default=None, help="SQLAlchemy URL; a postgresql URL names a server on which a "
                   "scratch database is created and dropped (default: SQLite in the study directory)")
    p.add_argument("--keep-database", action="store_true", help="do not drop the PostgreSQL scratch database")
    p.add_argument("--baseline", action="store_true",
                   help="also run the same load against one worker (--baseline-workers) and print the ratios")
    p.add_argument("--baseline-workers", type=int, default=1)
    p.add_argument("--target-ms", type=float, default=50.0, help="p99 target for the trial and response routes")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not write gunicorn's access log (it gives the time spent inside the worker)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summaries and checks to this file")
    return p


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import gunicorn
        gv = gunicorn.__version__
    except ImportError:
        gv = "missing"
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, gunicorn {gv}, "
            f"{platform.system()} {platform.release()}")


@contextlib.contextmanager
def database(url: str | None, run_dir: Path, keep: bool):
    if url is None:
        yield f"sqlite:///{run_dir.resolve()}/survey.db"
    elif url.startswith("postgresql"):
        if keep:
            from sqlalchemy import create_engine, text
            from sqlalchemy.engine import make_url
            name = f"sparsight_load_{run_dir.parent.name[-8:].lower()}"
            admin = create_engine(make_url(url), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            print(f"kept PostgreSQL database {name!r} (drop it with: DROP DATABASE \"{name}\")")
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        else:
            with loadsim.scratch_postgres(url) as scratch:
                yield scratch
    else:
        yield url


def one_run(args, survey: dict, workers: int, label: str) -> dict:
    cfg = loadsim.SimConfig(think_ms=args.think_ms, think_jitter=args.think_jitter, rt_ms=args.rt_ms,
                            retry_rate=args.retry_rate, practice_fail_rate=args.practice_fail_rate,
                            fetch_images=not args.no_images,
                            completion_code=survey["completion_code"])
    with tempfile.TemporaryDirectory(prefix="sparsight-load-") as tmp:
        run_dir = make_study_dir(Path(tmp) / "study", survey, name="survey-load")
        with database(args.database, run_dir, args.keep_database) as url:
            backend = url.split(":", 1)[0].split("+", 1)[0]
            print(f"\n== {label}: {workers} worker(s) × {args.threads} threads (gthread), {backend}, "
                  f"{args.participants} participants, think {args.think_ms:g} ms ==", flush=True)
            access = Path(tmp) / "access.log" if not args.no_access_log else None
            scratch_db = url.rsplit("/", 1)[-1] if backend == "postgresql" else ""
            with loadsim.gunicorn_server(run_dir, database_url=url, workers=workers, threads=args.threads,
                                         access_log=access) as base:
                with loadsim.CpuMonitor(mine=(scratch_db,)) as monitor:
                    run = loadsim.run_participants(base, args.participants, cfg, seed=args.seed,
                                                   ramp_s=args.ramp_s)
            loadsim.print_summary(run)
            cpu = monitor.report()
            if cpu:
                busy = cpu["others_cores"] > 0.1
                what = "client + server" + (" + its PostgreSQL backends" if scratch_db else "")
                print(f"  CPU during the run: this benchmark ({what}) {cpu['ours_cores']:.2f} of {cpu['cpus']} cores, "
                      f"other processes {cpu['others_cores']:.2f} cores"
                      + (" — the machine was not quiet; latencies are inflated" if busy else ""))
            server = loadsim.server_times(access) if access else {}
            if server:
                print("  time in the gunicorn worker (access log %(D)s; whole run):")
                for route in ("state", "response", "image"):
                    r = server.get(route)
                    if r:
                        print(f"  {route:<18}{r['n']:>7}{r['mean_ms']:>9.1f}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}"
                              f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}")
            checks = loadsim.verify(url, run.logs, survey, run_dir)
    for c in checks:
        print("  " + c.line())
    summary = run.summary()
    met = {}
    for part, routes in (("whole run", summary["routes"]), ("steady state", summary["steady_routes"])):
        p99 = {r: routes.get(r, {}).get("p99_ms", float("inf")) for r in ("state", "response")}
        met[part] = all(v < args.target_ms for v in p99.values())
        print(f"  p99 < {args.target_ms:g} ms {'met' if met[part] else 'NOT met'} ({part}): "
              + ", ".join(f"{r} {v:.1f} ms" for r, v in p99.items()))
    return {"label": label, "workers": workers, "threads": args.threads, "backend": backend, "summary": summary,
            "server_times": server, "cpu": cpu,
            "target_met": met, "checks": [c.__dict__ for c in checks],
            "failed": [c.name for c in checks if c.required and not c.ok]}


def main(args) -> int:
    survey = {**loadsim.LOAD_SURVEY, "practice_trials": args.practice_trials, "main_trials": args.main_trials,
              "catch_trials": args.catch_trials}
    print(f"machine: {machine()}")
    print(f"survey: {survey}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    results = [one_run(args, survey, args.workers, "load")]
    if args.baseline:
        results.append(one_run(args, survey, args.baseline_workers, "baseline"))
        a, b = results[0]["summary"], results[1]["summary"]
        print(f"\n== {args.workers} workers vs {args.baseline_workers} (same run) ==")
        print(f"  throughput: {a['requests_per_s']:.0f} vs {b['requests_per_s']:.0f} requests/s "
              f"(× {a['requests_per_s'] / b['requests_per_s']:.2f})")
        for route in ("state", "response"):
            ra, rb = a["routes"][route], b["routes"][route]
            print(f"  {route:<9} p50 {ra['p50_ms']:.1f} vs {rb['p50_ms']:.1f} ms, p99 {ra['p99_ms']:.1f} vs "
                  f"{rb['p99_ms']:.1f} ms (p99 × {ra['p99_ms'] / rb['p99_ms']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "argv": sys.argv, "survey": survey,
                                               "runs": results}, indent=2, default=str))
    failed = [f"{r['label']}: {name}" for r in results for name in r["failed"]]
    if failed:
        print(f"\nFAILED checks: {failed}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
