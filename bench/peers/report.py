"""bench/peers/run.py's report: ours/peer ratios and the printed table."""

from __future__ import annotations

from typing import Any

SCENARIOS = ("enqueue", "e2e")

RATIO_FIGURES = (
    ("enqueue", "enqueue_per_s", None, "durable enqueues/s"),
    ("enqueue", "enqueue_latency_ms", "p50", "Enqueue latency p50"),
    ("enqueue", "enqueue_latency_ms", "p99", "Enqueue latency p99"),
    ("enqueue", "server_cpu_us_per_enqueue", None, "server CPU per Enqueue"),
    ("e2e", "jobs_per_s", None, "completed jobs/s"),
    ("e2e", "e2e_latency_ms", "p50", "enqueue→complete p50"),
    ("e2e", "e2e_latency_ms", "p99", "enqueue→complete p99"),
    ("e2e", "server_cpu_us_per_job", None, "server CPU per job"),
)


def pick(d: dict[str, Any] | None, key: str, sub: str | None) -> float | None:
    if not d:
        return None
    v = d.get(key)
    if sub is not None:
        v = (v or {}).get(sub)
    return v


def ratios(ours: dict[str, Any], peers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for peer, res in peers.items():
        r = {}
        for scen, key, sub, _ in RATIO_FIGURES:
            a = pick(ours.get(scen), key, sub)
            b = pick(res.get(scen), key, sub)
            r[f"{scen}.{key}{'.' + sub if sub else ''}"] = (
                round(a / b, 3) if (a is not None and b) else None)
        out[peer] = r
    return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def lat(d: dict[str, Any] | None, keys: tuple[str, ...] = ("p50", "p99")) -> str:
    if not d:
        return "n/a"
    return " / ".join(fmt(d.get(k)) for k in keys) + " ms"


def print_table(report: dict[str, Any]) -> None:
    peers = report["peers"]
    ours = report.get("ours")
    cols = list(peers)
    head = ["figure"] + cols + (["ours"] if ours else [])
    rows: list[list[str]] = []

    def row(name: str, fn, ours_val: str | None = None) -> None:
        rows.append([name] + [fn(peers[p]) for p in cols] + ([ours_val or ""] if ours else []))

    row("ack is durable", lambda r: r.get("durability", "").split(":")[0],
        "yes" if ours else None)
    if any("enqueue" in r for r in peers.values()):
        o = (ours or {}).get("enqueue") or {}
        row("enqueues/s (enqueue)",
            lambda r: fmt(pick(r.get("enqueue"), "enqueue_per_s", None)), fmt(o.get("enqueue_per_s")))
        row("enqueue latency p50 / p99", lambda r: lat((r.get("enqueue") or {}).get(
            "enqueue_latency_ms")), lat(o.get("enqueue_latency_ms")))
        row("server CPU per enqueue", lambda r: fmt(pick(r.get("enqueue"),
            "server_cpu_us_per_enqueue", None), " µs"), fmt(o.get("server_cpu_us_per_enqueue"), " µs"))
        row("server / loadgen CPU (cores)", lambda r: (
            f"{fmt(pick(r.get('enqueue'), 'server_cpu_cores', None))} / "
            f"{fmt(pick(r.get('enqueue'), 'loadgen_cpu_cores', None))}"),
            f"{fmt(o.get('server_cpu_cores'))} / {fmt(o.get('loadgen_cpu_cores'))}")
        row("other busy CPU (cores)", lambda r: fmt(pick(r.get("enqueue"), "other_cpu_cores", None)),
            fmt(o.get("other_cpu_cores")))
    if any("e2e" in r for r in peers.values()):
        o = (ours or {}).get("e2e") or {}
        row("completed jobs/s (e2e)", lambda r: fmt(pick(r.get("e2e"), "jobs_per_s", None)),
            fmt(o.get("jobs_per_s")))
        row("enqueue→complete p50 / p99", lambda r: lat((r.get("e2e") or {}).get(
            "e2e_latency_ms")), lat(o.get("e2e_latency_ms")))
        row("e2e enqueues/s; backlog at end", lambda r: (
            f"{fmt(pick(r.get('e2e'), 'enqueue_per_s', None))}; "
            f"{fmt(pick(r.get('e2e'), 'backlog_at_end', None))}"),
            f"{fmt(o.get('enqueue_per_s'))}; {fmt(o.get('backlog_at_end'))}")
        row("e2e enqueue latency p50 / p99", lambda r: lat((r.get("e2e") or {}).get(
            "enqueue_latency_ms")), lat(o.get("enqueue_latency_ms")))
        row("server CPU per job", lambda r: fmt(pick(r.get("e2e"), "server_cpu_us_per_job", None),
                                                " µs"), fmt(o.get("server_cpu_us_per_job"), " µs"))
        row("server / loadgen CPU (cores)", lambda r: (
            f"{fmt(pick(r.get('e2e'), 'server_cpu_cores', None))} / "
            f"{fmt(pick(r.get('e2e'), 'loadgen_cpu_cores', None))}"),
            f"{fmt(o.get('server_cpu_cores'))} / {fmt(o.get('loadgen_cpu_cores'))}")
        row("other busy CPU (cores)", lambda r: fmt(pick(r.get("e2e"), "other_cpu_cores", None)),
            fmt(o.get("other_cpu_cores")))
    row("failed calls", lambda r: fmt(sum((r.get(s) or {}).get("error_total", 0) for s in SCENARIOS)),
        fmt(sum((ours.get(s) or {}).get("error_total") or 0 for s in SCENARIOS)) if ours else None)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if ours and report.get("ratios"):
        print("\nours / peer (rates: > 1 = ours faster; latency and CPU: < 1 = ours lower)")
        rh = ["figure"] + cols
        rrows = []
        for scen, key, sub, name in RATIO_FIGURES:
            k = f"{scen}.{key}{'.' + sub if sub else ''}"
            rrows.append([name] + [("n/a" if (v := report["ratios"][p].get(k)) is None else f"{v:.2f}")
                                   for p in cols])
        rw = [max(len(r[i]) for r in rrows + [rh]) for i in range(len(rh))]
        print("  ".join(h.ljust(w) for h, w in zip(rh, rw, strict=True)))
        print("  ".join("-" * w for w in rw))
        for r in rrows:
            print("  ".join(c.ljust(w) for c, w in zip(r, rw, strict=True)))
    for p in cols:
        for s in SCENARIOS:
            r = peers[p].get(s) or {}
            for prob in r.get("problems", []):
                print(f"  {p}/{s}: {prob}")
            for m, n in list(r.get("error_messages", {}).items())[:5]:
                print(f"  {p}/{s}: {n} x {m}")
        if peers[p].get("error"):
            print(f"  {p}: {peers[p]['error']}")


# ---------------------------------------------------------------------------
# main
