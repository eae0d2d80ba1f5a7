"""Reads h2load --log-file output (start µs since epoch, HTTP status, µs to the response's end) for
scripts/bench-overload.sh.

  overload_stats.py load LOG...      offered, goodput, refusals, errors per second (over the log's span:
                                     first start to last end); p50/p99 of the accepted
  overload_stats.py recovery LOG --since T_US --limit-ms L
        seconds from T_US (when the overload stopped) to the first accepted request after which every
        request of the probe was accepted within L ms
"""

import sys


def rows(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    yield int(parts[0]), int(parts[1]), int(parts[2])


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def load(paths):
    accepted, refused, failed = [], 0, 0
    first, last = None, None
    for start, status, micros in rows(paths):
        first = start if first is None else min(first, start)
        last = start + micros if last is None else max(last, start + micros)
        if status == 200:
            accepted.append(micros / 1000.0)
        elif status == 429:
            refused += 1
        else:
            failed += 1
    accepted.sort()
    seconds = max(1e-6, ((last or 0) - (first or 0)) / 1e6)
    total = len(accepted) + refused + failed
    print(
        f"offered={total / seconds:.0f} goodput={len(accepted) / seconds:.0f} refused={refused / seconds:.0f} failed={failed / seconds:.0f} "
        f"p50_ms={percentile(accepted, 0.5):.2f} p99_ms={percentile(accepted, 0.99):.2f}"
    )


def recovery(path, since, limit_ms):
    # In end order: the recovery point is the end of the first accepted-in-time response after
    # which nothing was refused, failed or slow.
    events = sorted((start + micros, status == 200 and micros <= limit_ms * 1000) for start, status, micros in rows([path]))
    point = None
    for end, good in events:
        if not good:
            point = None
        elif point is None:
            point = end
    if point is None:
        print("recovery_s=never")
    else:
        print(f"recovery_s={max(0, point - since) / 1e6:.3f}")


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "load":
        load(args)
    elif mode == "recovery":
        path = args[0]
        since = int(args[args.index("--since") + 1])
        limit = float(args[args.index("--limit-ms") + 1])
        recovery(path, since, limit)
    else:
        sys.exit(f"unknown mode {mode}")
