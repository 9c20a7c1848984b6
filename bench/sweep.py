#!/usr/bin/env python
"""Rate sweep: throughput achieved and post -> start latency against offered rate, Baton beside Celery.

For each offered rate (`--rates`, default 250,500,1000,1500,2000 per second) it runs, one after the
other, a steady stream of `rate x --duration` (10 s) no-ops through
- Baton: `bench/throughput.py --rate R --n R*duration` (2 workers x 50, every state durable), each
  request its own message as any AMQP client posts it, and again with `--client` (through
  `BatonClient.submit`, a call per request: those made at once go out as one message), and
- Celery with RabbitMQ and RPC results (prefork -c 2, acks late; `bench.compare.celery_run`),
  posting what is due every 20 ms, each post's time recorded, each task returning when it started;
and records the throughput achieved (first post -> last finish for Baton, -> last start for
Celery), the rate the client actually posted at, and post -> start p50/p99. A rate beyond what a
system sustains shows as throughput below the offered rate and latency growing with the backlog.

Writes the figures as JSON (`--out`, default `bench/sweep.json`) and draws them (`--plot`, default
`docs/performance.png`): throughput achieved against offered rate, and p99 post -> start latency
against offered rate. `--from-json` redraws the plot from an existing JSON without running.

    .venv/bin/python bench/sweep.py                          # or: make bench-sweep
    .venv/bin/python bench/sweep.py --from-json bench/sweep.json --plot docs/performance.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare import baton_run, celery_run, machine  # noqa: E402

SYSTEMS = {
    "baton": "Baton (durable, PostgreSQL)",
    "baton_client": "Baton, through BatonClient.submit",
    "celery": "Celery (RabbitMQ, RPC results)",
}


def sweep(rates: list[float], duration_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "duration_s": duration_s, "rates": rates,
                               "baton": [], "baton_client": [], "celery": []}
    for rate in rates:
        n = int(rate * duration_s)
        print(f"== {rate:g}/s for {duration_s:g} s ({n} no-ops): Baton", flush=True)
        results["baton"].append({"rate": rate, **baton_run(n, rate, database="baton_bench_sweep")})
        print(f"== {rate:g}/s: Baton, through BatonClient.submit", flush=True)
        results["baton_client"].append({"rate": rate, **baton_run(n, rate, database="baton_bench_sweep", client=True)})
        print(f"== {rate:g}/s: Celery", flush=True)
        results["celery"].append({"rate": rate, **celery_run(n, "rpc://", rate)})
    return results


def report(results: dict[str, Any]) -> None:
    print(f"\nrate sweep on this machine ({results['machine']}), {results['duration_s']:g} s per rate; "
          "latency from post to start")
    print(f"{'offered/s':>9}  {'system':34} {'posted/s':>9} {'achieved/s':>10} {'p50':>10} {'p99':>10}")
    for i, rate in enumerate(results["rates"]):
        for key, label in SYSTEMS.items():
            if key not in results:  # a sweep from before this system was in it
                continue
            r = results[key][i]
            if "note" in r:
                print(f"{rate:>9g}  {label:34} {r['note']}")
                continue
            print(f"{rate:>9g}  {label:34} {r['posted_per_s']:>9} {r['per_s']:>10} {r['start_p50_ms']:>7.1f} ms "
                  f"{r['start_p99_ms']:>7.1f} ms")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    rates = results["rates"]
    left.plot(rates, rates, linestyle=":", color="grey", label="offered")
    for key, label in SYSTEMS.items():
        done = [r for r in results.get(key, []) if "note" not in r]
        left.plot([r["rate"] for r in done], [r["per_s"] for r in done], marker="o", label=label)
        right.plot([r["rate"] for r in done], [r["start_p99_ms"] for r in done], marker="o", label=label)
    left.set(xlabel="offered rate (tasks/s)", ylabel="achieved throughput (tasks/s)", title="Throughput")
    right.set(xlabel="offered rate (tasks/s)", ylabel="p99 post -> start (ms, log scale)", yscale="log",
              title="p99 latency, post to start")
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks crowd each other
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"No-op tasks at a steady rate, {results['duration_s']:g} s each, on {results['machine']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="250,500,1000,1500,2000", help="offered rates per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of posting per rate (default 10)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "sweep.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "performance.png")
    parser.add_argument("--from-json", type=Path, default=None, help="redraw the plot from this JSON; run nothing")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = sweep([float(r) for r in args.rates.split(",")], args.duration)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"written to {args.out}")
    report(results)
    plot(results, args.plot)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
