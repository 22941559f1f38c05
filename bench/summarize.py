"""Results of one `bench/run.sh` run -> a Markdown table of medians and ratios (bench/README.md).

    python bench/summarize.py --runs bench/results/runs.jsonl [--run RUN_ID] --out RESULTS.md

Every figure is the median over the reps of that run. A ratio column is fieldsync's figure over
the peer's **measured in the same rep** (then the median of those per-rep ratios), so < 1 means
fieldsync costs less or is faster. Targets (the issue): S2 server CPU per update <= 0.5 x
Hocuspocus; S1 fan-out p99 <= 1/3 x Hocuspocus; S3 cold sync of 5,000 work orders over v1
<= 0.3 x Hocuspocus' time and <= 0.3 x plain y-websocket's bytes (issue 13; 0.6 and 0.4 of
200 documents before); S4 <= 16 KiB per idle connection.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

HOCUS, YWSS = "hocus-sqlite", "ywss-mem"
Row = dict[str, Any]


def load(path: str, run: str | None) -> tuple[str, list[Row]]:
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if "run" in r]
    if run is None:
        run = max(r["run"] for r in rows)
    return run, [r for r in rows if r["run"] == run]


class Table:
    def __init__(self, rows: list[Row]) -> None:
        self.by: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for r in rows:
            self.by[(r["label"], r["scenario"])].append(r)

    def labels(self, scenario: str) -> list[str]:
        order = ["fieldsync", "fieldsync-v1", "fieldsync-v1-batch64", "fieldsync-v1-plain"]
        found = {label for (label, sc) in self.by if sc == scenario}
        return [x for x in order if x in found] + sorted(found - set(order))

    def ok(self, label: str, scenario: str) -> str:
        runs = self.by.get((label, scenario), [])
        return f"{sum(r['converged'] for r in runs)}/{len(runs)}"

    def median(self, label: str, scenario: str, key: Callable[[Row], Any]) -> float | None:
        values = [v for r in self.by.get((label, scenario), []) if r["converged"] and (v := key(r))]
        return statistics.median(values) if values else None

    def ratio(
        self,
        label: str,
        peer: str,
        scenario: str,
        key: Callable[[Row], Any],
        peer_scenario: str | None = None,
    ) -> float | None:
        """Median over reps of label/peer, each pair measured in the same rep."""
        ours = {r["rep"]: key(r) for r in self.by.get((label, scenario), []) if r["converged"]}
        theirs = {
            r["rep"]: key(r)
            for r in self.by.get((peer, peer_scenario or scenario), [])
            if r["converged"]
        }
        ratios = [ours[k] / theirs[k] for k in ours if ours[k] and theirs.get(k)]
        return statistics.median(ratios) if ratios else None

    def ratio_range(self, label: str, peer: str, scenario: str, key: Callable[[Row], Any]) -> str:
        ours = {r["rep"]: key(r) for r in self.by.get((label, scenario), []) if r["converged"]}
        theirs = {r["rep"]: key(r) for r in self.by.get((peer, scenario), []) if r["converged"]}
        ratios = sorted(ours[k] / theirs[k] for k in ours if ours[k] and theirs.get(k))
        return f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if len(ratios) > 1 else ""


def f(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:,.{digits}f}"


def cpu_per_update(r: Row) -> float | None:
    cpu, n = r.get("server_cpu_s"), (r.get("updates") or r.get("sizes", {}).get("n"))
    return 1e6 * cpu / n if cpu is not None and n else None


def render(run: str, rows: list[Row]) -> str:
    t = Table(rows)
    out = [f"# fieldsync beside the peer servers — run {run}", ""]
    out.append(
        "Medians over the reps of one run; `x peer` = fieldsync's figure / the peer's in the same "
        "rep (median of per-rep ratios): < 1 is better for fieldsync. ok = converged/total."
    )
    sizes: dict[str, Any] = {
        r["scenario"]: r.get("sizes") for r in rows if r.get("protocol") != "fieldsync.v1"
    }
    for sc in ("s1", "s2", "s3", "s4"):
        if sc in sizes:
            keep = {
                "s1": ("docs", "clients", "updates", "pace_ms"),
                "s2": ("n",),
                "s3": ("docs", "history", "cold_concurrency"),
                "s4": ("docs", "n", "hold"),
            }[sc]
            out.append(f"- {sc}: " + ", ".join(f"{k}={sizes[sc].get(k)}" for k in keep))
    out.append("")

    sc = "s1"
    if any(k[1] == sc for k in t.by):
        out += [
            "## S1 fleet (y-websocket protocol)",
            "| server | ok | wall s | fan-out p50 ms | p99 ms | p99 x hocus | p99 x ywss-mem "
            "| srv CPU s | x hocus | srv peak RSS MB | WS B/update | loopback B/update |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label in t.labels(sc):

            def m(key: Callable[[Row], Any], lb: str = label) -> float | None:
                return t.median(lb, sc, key)

            out.append(
                f"| {label} | {t.ok(label, sc)} | {f(m(lambda r: r.get('wall_s')))} "
                f"| {f(m(lambda r: r.get('lat_p50_ms')))} | {f(m(lambda r: r.get('lat_p99_ms')))} "
                f"| {f(t.ratio(label, HOCUS, sc, lambda r: r.get('lat_p99_ms')), 2)} "
                f"| {f(t.ratio(label, YWSS, sc, lambda r: r.get('lat_p99_ms')), 2)} "
                f"| {f(m(lambda r: r.get('server_cpu_s')))} "
                f"| {f(t.ratio(label, HOCUS, sc, lambda r: r.get('server_cpu_s')), 2)} "
                f"| {f(m(lambda r: r.get('server_peak_rss')), 0, 1e-6)} "
                f"| {f(m(lambda r: r['wire_payload_bytes'] / r['updates']), 0)} "
                f"| {f(m(lambda r: (r.get('loopback_bytes') or 0) / r['updates']), 0)} |"
            )
        out.append("")

    sc = "s2"
    if any(k[1] == sc for k in t.by):
        out += [
            "## S2 burst (one document)",
            "| server | protocol | ok | time to receiver s | updates/s | time to last ack s "
            "| srv CPU s | srv CPU µs/update | x hocus | x ywss-mem | srv peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label in t.labels(sc):

            def m(key: Callable[[Row], Any], lb: str = label) -> float | None:
                return t.median(lb, sc, key)

            proto = next(r.get("protocol") for r in t.by[(label, sc)])
            out.append(
                f"| {label} | {proto} | {t.ok(label, sc)} | {f(m(lambda r: r.get('wall_s')), 2)} "
                f"| {f(m(lambda r: r.get('updates_per_s')), 0)} "
                f"| {f(m(lambda r: r.get('ack_s')), 2)} "
                f"| {f(m(lambda r: r.get('server_cpu_s')), 2)} | {f(m(cpu_per_update), 0)} "
                f"| {f(t.ratio(label, HOCUS, sc, cpu_per_update), 2)} "
                f"| {f(t.ratio(label, YWSS, sc, cpu_per_update), 2)} "
                f"| {f(m(lambda r: r.get('server_peak_rss')), 0, 1e-6)} |"
            )
        out.append("")

    sc = "s3"
    if any(k[1] == sc for k in t.by):
        out += [
            "## S3 cold sync of a fresh device (durable servers restarted: served from disk)",
            "| server | protocol | ok | cold from | cold s | x hocus | KB received | x ywss-mem "
            "| x hocus | frames | per-doc p50 / p99 ms | srv CPU s (cold phase) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label in t.labels(sc):

            def m(key: Callable[[Row], Any], lb: str = label) -> float | None:
                return t.median(lb, sc, key)

            first = t.by[(label, sc)][0]
            proto = str(first.get("protocol"))
            if proto == "fieldsync.v1":
                proto += " (" + (",".join(first.get("caps") or []) or "no zstd, no batch") + ")"
            restarted = first.get("restarted") or proto.startswith("fieldsync.v1")
            frames = m(lambda r: r.get("frames_received") or r.get("msgs_recv"))
            p50, p99 = m(lambda r: r.get("per_doc_p50_ms")), m(lambda r: r.get("per_doc_p99_ms"))
            out.append(
                f"| {label} | {proto} | {t.ok(label, sc)} "
                f"| {'disk (restart)' if restarted else 'memory'} "
                f"| {f(m(lambda r: r.get('wall_s')), 2)} "
                f"| {f(t.ratio(label, HOCUS, sc, lambda r: r.get('wall_s')), 2)} "
                f"| {f(m(lambda r: r.get('bytes_received')), 0, 1e-3)} "
                f"| {f(t.ratio(label, YWSS, sc, lambda r: r.get('bytes_received')), 2)} "
                f"| {f(t.ratio(label, HOCUS, sc, lambda r: r.get('bytes_received')), 2)} "
                f"| {f(frames, 0)} | {f(p50)} / {f(p99)} "
                f"| {f(m(lambda r: r.get('server_cpu_s')), 2)} |"
            )
        out.append(
            "\nyws rows: a connection per document, 10 at a time (ysync_load.py). v1 rows: one "
            "connection, "
            "hello -> changes -> one BATCH of step 1s; time from connect to the last step 2. "
            "Server CPU of durable peers' yws rows covers the cold phase only; "
            "`*-mem` peers' covers preload + cold."
        )
        out.append("")

    sc = "s4"
    if any(k[1] == sc for k in t.by):
        out += [
            "## S4 idle connections",
            "| server | ok | opened | alive after hold | connect s | RSS base MB | RSS open MB "
            "| KiB/conn | x hocus | x ywss-mem |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label in t.labels(sc):

            def m(key: Callable[[Row], Any], lb: str = label) -> float | None:
                return t.median(lb, sc, key)

            out.append(
                f"| {label} | {t.ok(label, sc)} | {f(m(lambda r: r.get('opened')), 0)} "
                f"| {f(m(lambda r: r.get('alive_after_hold')), 0)} "
                f"| {f(m(lambda r: r.get('connect_s')), 2)} "
                f"| {f(m(lambda r: r.get('server_rss_base')), 0, 1e-6)} "
                f"| {f(m(lambda r: r.get('server_rss_open')), 0, 1e-6)} "
                f"| {f(m(lambda r: r.get('rss_per_conn_bytes')), 1, 1 / 1024)} "
                f"| {f(t.ratio(label, HOCUS, sc, lambda r: r.get('rss_per_conn_bytes')), 2)} "
                f"| {f(t.ratio(label, YWSS, sc, lambda r: r.get('rss_per_conn_bytes')), 2)} |"
            )
        out.append("")

    out += targets(t)
    return "\n".join(out) + "\n"


def targets(t: Table) -> list[str]:
    lines = [
        "## Targets",
        "| target | fieldsync figure | peer figure (same run) | ratio (per-rep range) | met |",
        "|---|---|---|---|---|",
    ]

    def verdict(value: float | None, limit: float) -> str:
        return "—" if value is None else ("**yes**" if value <= limit else "**no**")

    def add(
        name: str,
        label: str,
        peer: str,
        sc: str,
        key: Callable[[Row], Any],
        limit: float,
        unit: str,
        fmt: int = 1,
        scale: float = 1.0,
    ) -> None:
        ours, theirs = t.median(label, sc, key), t.median(peer, sc, key)
        ratio = t.ratio(label, peer, sc, key)
        rng = t.ratio_range(label, peer, sc, key)
        lines.append(
            f"| {name} | {label}: {f(ours, fmt, scale)} {unit} | {peer}: {f(theirs, fmt, scale)} "
            f"{unit} | {f(ratio, 2)}{f' ({rng})' if rng else ''} | {verdict(ratio, limit)} |"
        )

    add(
        "S2 server CPU/update ≤ 0.5x Hocuspocus",
        "fieldsync",
        HOCUS,
        "s2",
        cpu_per_update,
        0.5,
        "µs",
        0,
    )
    add("  same, over v1 (acks)", "fieldsync-v1", HOCUS, "s2", cpu_per_update, 0.5, "µs", 0)
    add(
        "  same, over v1, BATCH of 64",
        "fieldsync-v1-batch64",
        HOCUS,
        "s2",
        cpu_per_update,
        0.5,
        "µs",
        0,
    )
    add(
        "S1 fan-out p99 ≤ 1/3 x Hocuspocus",
        "fieldsync",
        HOCUS,
        "s1",
        lambda r: r.get("lat_p99_ms"),
        1 / 3,
        "ms",
    )
    add(
        "S3 cold sync time over v1 ≤ 0.3x Hocuspocus",
        "fieldsync-v1",
        HOCUS,
        "s3",
        lambda r: r.get("wall_s"),
        0.3,
        "s",
        2,
    )
    add(
        "S3 cold sync bytes over v1 ≤ 0.3x y-websocket",
        "fieldsync-v1",
        YWSS,
        "s3",
        lambda r: r.get("bytes_received"),
        0.3,
        "KB",
        0,
        1e-3,
    )
    add(
        "  (for reference) S3 time over /v1/yws vs Hocuspocus",
        "fieldsync",
        HOCUS,
        "s3",
        lambda r: r.get("wall_s"),
        0.6,
        "s",
        2,
    )
    per_conn = t.median("fieldsync", "s4", lambda r: r.get("rss_per_conn_bytes"))
    hocus_conn = t.median(HOCUS, "s4", lambda r: r.get("rss_per_conn_bytes"))
    lines.append(
        f"| S4 ≤ 16 KiB server memory per idle connection | fieldsync: {f(per_conn, 1, 1 / 1024)}"
        f" KiB | {HOCUS}: {f(hocus_conn, 1, 1 / 1024)} KiB | — | {verdict(per_conn, 16 * 1024)} |"
    )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", required=True)
    p.add_argument("--run", default=None, help="run id (default: the latest in the file)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    run, rows = load(args.runs, args.run)
    text = render(run, rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
