"""Seeded random pathological requests against the real `sidecar serve` of the e2e fixture, for a while,
beside continuous good traffic (pathological.py generates and judges them; see its docstring).

Environment: PATHOLOGICAL_SEED (default: random, printed) replays a run; PATHOLOGICAL_SECONDS (default
20) sets how long cases are sent. One case alone: `python Tests/e2e/pathological.py --seed S --case N`
prints its exact request (add --serve to send it to a fresh server).
"""

from __future__ import annotations

import pathological as P

MIN_CASES = 50  # fewer in a whole run means the driver, not the server, is broken
MIN_GOOD = 20


def test_pathological_requests_leave_the_server_serving(server, capsys):
    seed = P.default_seed()
    seconds = P.default_seconds(20.0)
    banner = f"pathological: seed={seed} seconds={seconds} (replay: PATHOLOGICAL_SEED={seed})"
    print(banner)
    with capsys.disabled():
        print("\n" + banner, flush=True)

    traffic = P.GoodTraffic(server.http_port, server.grpc_port).start()
    try:
        report = P.run(server.http_port, server.grpc_port, seed, seconds, alive=lambda: server.process.poll() is None)
    finally:
        traffic.stop()
    exit_code = server.process.poll()

    good = sum(traffic.counts.values())
    summary = (f"{report.summary_line()} | good traffic: {good} answered ({dict(traffic.counts)}), "
               f"{len(traffic.failures)} failed")
    print(summary)
    with capsys.disabled():
        print(summary, flush=True)

    problems = []
    if not report.ok:
        problems.append(report.failure_text(limit=6))
    if traffic.failures:
        problems.append(f"{len(traffic.failures)} good requests beside the pathological ones failed, first: "
                        + "; ".join(traffic.failures[:5]))
    if report.generator_errors:
        problems.append(f"{len(report.generator_errors)} cases could not be generated (a bug of pathological.py, not "
                        f"of the server): " + "; ".join(report.generator_errors[:3]))
    if exit_code is not None:
        problems.append(f"sidecar serve is no longer running: exit code {exit_code} (a negative code is the signal)")
    elif report.cases < MIN_CASES:
        problems.append(f"only {report.cases} cases ran in {seconds} s")
    if exit_code is None and good < MIN_GOOD:
        problems.append(f"only {good} good requests were answered beside the pathological ones")
    assert not problems, (f"{banner}\n{summary}\n" + "\n".join(problems)
                          + "\n--- server log tail ---\n" + server.log()[-6000:])
