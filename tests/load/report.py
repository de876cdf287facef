"""The bench's verdicts and tables: the issue's targets (PASS/MISS) and the figures, for each mode.

Direct mode judges the stream worker and the publisher's workers alone (the
issue's first targets); compose mode judges the whole Compose stack, summed
over its containers, on each path clients take to nginx (via docker-proxy, and
inside nginx's network namespace), with docker-proxy's own cost shown apart.

The nchan reference (tests.load.nchan), when it ran, has its own row in either
table and a table of Herald's fan-out figures as multiples of nchan's; compose
mode judges those on the netns path (targets REF_*): clients and nginx on one
loopback each side, the fairest comparison with nchan on the host's loopback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Direct mode: the targets for this machine (2 cores, load tool on the same host,
# one stream worker), judging the stream worker or the publisher's workers alone.
TARGET_RSS_KB = 20.0
TARGET_IDLE_HELD = 10000
TARGET_FANOUT_CPU_US = 15.0
TARGET_FLAT_RATIO = 1.2  # 2k and 4k within +20% of the 1k figure
TARGET_P99_MS = 30.0
TARGET_PUBLISHES_PER_S = 5000.0
TARGET_PUBLISH_CPU_US = 150.0
TARGET_BATCH_EVENTS_PER_S = 50000.0
# Above this many events per client read the stream worker was behind and batched its
# writes: its CPU per delivery is then lower than that of a worker that keeps up.
BATCHED_EVENTS_PER_READ = 1.1


# Compose mode: the whole stack, summed over its containers (docker-proxy apart).
STACK_RSS_KB = 20.0  # per idle stream: nginx + stream + publisher + redis
STACK_FANOUT_CPU_US = 20.0  # per delivery, over all four containers
STACK_PUBLISHES_PER_S = 3000.0
STACK_PUBLISH_CPU_US = 400.0  # per single-event publish: publisher + nginx + redis
STACK_BATCH_EVENTS_PER_S = 50000.0
# The components of a compose stack in the table's order, with their short names.
CONTAINERS = {"nginx": "nginx", "stream": "stream", "publisher": "pub", "redis": "redis"}
PROXY = "docker-proxy"

# Compose mode, netns path, against the nchan reference run in the same window: Herald's
# whole stack per delivery within 2x nchan's nginx, p99 within 5x nchan's, and
# deliveries/s equal to what was offered (subscribers x rate), within REF_OFFERED_SLACK
# (the figure's window also holds the last event's latency and the first publish's start).
REF_CPU_RATIO = 2.0
REF_P99_RATIO = 5.0
REF_OFFERED_SLACK = 0.05
# What Herald's CPU per delivery sums when set against nchan's (everything but Redis in
# direct mode, where nginx and the publisher are apart from the judged stream worker).
DIRECT_HERALD = ("stream", "nginx", "publisher")


# -- direct mode: targets and the table -------------------------------------------------------


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    status: str  # PASS, MISS or n/a


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def evaluate(results: dict[str, Any]) -> list[Target]:
    targets: list[Target] = []
    delivery = [(name, bool(r.get("complete"))) for name, r in delivery_items(results)]
    if delivery:
        bad = [n for n, ok in delivery if not ok]
        targets.append(
            Target(
                "delivery",
                "100% in order, every scenario",
                "all complete" if not bad else "incomplete: " + ", ".join(bad),
                verdict(not bad),
            )
        )
    idle = results.get("idle", {}).get("direct")
    if idle:
        rss = idle["rss_kb_per_connection"]
        targets.append(
            Target(
                "idle RSS",
                f"<= {TARGET_RSS_KB:g} KB per connection",
                f"{rss:.1f} KB ({idle['connections']:,} conns)",
                verdict(rss <= TARGET_RSS_KB),
            )
        )
        held = idle["held_by_worker"]
        ran = idle["connections"] >= TARGET_IDLE_HELD
        targets.append(
            Target(
                "idle connections",
                f"one worker holds {TARGET_IDLE_HELD:,}",
                f"held {held:,} of {idle['connections']:,}"
                + ("" if ran else f" (run --idle-connections {TARGET_IDLE_HELD})"),
                verdict(held >= TARGET_IDLE_HELD if ran else None),
            )
        )
    for path, r in results.get("fanout", {}).items():
        cpu = r["stream_cpu_us_per_delivery"]
        targets.append(
            Target(
                f"fan-out CPU ({path})",
                f"<= {TARGET_FANOUT_CPU_US:g} us/delivery",
                f"{cpu:.1f} us{_batched(r)}",
                verdict(cpu <= TARGET_FANOUT_CPU_US),
            )
        )
        p99 = r["latency_ms"]["p99"]
        targets.append(
            Target(
                f"fan-out p99 ({path})",
                f"<= {TARGET_P99_MS:g} ms at {r['streams']:,} x {r['rate_events_per_s']:g}/s",
                f"{p99:.1f} ms",
                verdict(p99 <= TARGET_P99_MS),
            )
        )
    scaling = results.get("scaling")
    if scaling:
        sizes = sorted(scaling, key=int)
        figures = [scaling[k]["stream_cpu_us_per_delivery"] for k in sizes]
        base = figures[0]
        targets.append(
            Target(
                "fan-out CPU flat",
                f"{' / '.join(sizes)} subs: <= {TARGET_FANOUT_CPU_US:g} us, "
                f"each <= {TARGET_FLAT_RATIO:g}x the first",
                " / ".join(f"{f:.1f}" for f in figures)
                + " us"
                + "".join(_batched(scaling[k]) for k in sizes[-1:]),
                verdict(
                    all(f <= TARGET_FANOUT_CPU_US for f in figures)
                    and all(f <= base * TARGET_FLAT_RATIO for f in figures)
                ),
            )
        )
    for path, r in results.get("publish", {}).items():
        single, batched = r["single"], r["batched"]
        if path == "nginx":
            rate = single["requests_per_s"]
            targets.append(
                Target(
                    "publishes/s (nginx)",
                    f">= {TARGET_PUBLISHES_PER_S:,.0f} single-event",
                    f"{rate:,.0f}/s",
                    verdict(rate >= TARGET_PUBLISHES_PER_S),
                )
            )
        cpu = single["publisher_cpu_us_per_request"]
        targets.append(
            Target(
                f"publisher CPU ({path})",
                f"<= {TARGET_PUBLISH_CPU_US:g} us/publish",
                f"{cpu:.0f} us",
                verdict(cpu <= TARGET_PUBLISH_CPU_US),
            )
        )
        events = batched["events_per_s"]
        targets.append(
            Target(
                f"batched events/s ({path})",
                f">= {TARGET_BATCH_EVENTS_PER_S:,.0f}",
                f"{events:,.0f}/s",
                verdict(events >= TARGET_BATCH_EVENTS_PER_S),
            )
        )
    return targets


def _batched(r: dict[str, Any]) -> str:
    """A warning when the figure comes from a worker that fell behind and wrote several events at once."""
    per_read = float(r.get("events_per_read", 1.0))
    if per_read <= BATCHED_EVENTS_PER_READ:
        return ""
    return f" (behind: {per_read:.1f} ev/read)"


def delivery_items(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    items: list[tuple[str, dict[str, Any]]] = []
    for path, r in results.get("idle", {}).items():
        items.append((f"idle/{path}", r))
    for path, r in results.get("fanout", {}).items():
        items.append((f"fanout/{path}", r))
    for path, r in results.get("publish", {}).items():
        items.append((f"publish/{path}", r))
    if "many-channels" in results:
        items.append(("many-channels", results["many-channels"]))
    for size, r in results.get("scaling", {}).items():
        items.append((f"scaling/{size}", r))
    for name, r in results.get("reference", {}).items():
        items.append((f"fanout/{name} (reference)", r))
    return items


def _lat(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f}"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """The figures table: one row per scenario and path."""
    table = [
        [
            "scenario",
            "path",
            "load",
            "delivered",
            "latency ms p50/p95/p99/max",
            "server CPU",
            "rate",
            "ev/read",
            "others",
        ]
    ]
    idle = results.get("idle", {}).get("direct")
    if idle:
        table.append(
            [
                "idle",
                "direct",
                f"{idle['connections']:,} conns",
                f"{idle['held_by_worker']:,} held",
                "-",
                f"{idle['rss_kb_per_connection']:.1f} KB/conn; {idle['idle_cpu_percent']:.2f}% "
                f"of a core over {idle['idle_seconds']:.0f} s",
                "-",
                "-",
                "-",
            ]
        )

    def delivery_row(name: str, path: str, r: dict[str, Any], cpu: str = "") -> list[str]:
        cpu = cpu or (
            f"{r['stream_cpu_us_per_delivery']:.1f} us/delivery ({100 * r['stream_cpu_share']:.0f}% core)"
        )
        return [
            name,
            path,
            f"{r['streams']:,} x {r['events_each']} ev @ {r['rate_events_per_s']:g}/s",
            f"{r['received']:,}/{r['expected_deliveries']:,}" + ("" if r["complete"] else " INCOMPLETE"),
            _lat(r),
            cpu,
            f"{r['deliveries_per_s']:,.0f} deliveries/s",
            f"{r['events_per_read']:.2f}",
            f"{100 * r['others_cpu_share']:.0f}%",
        ]

    for path, r in results.get("fanout", {}).items():
        table.append(delivery_row("fan-out", path, r))
    nchan = results.get("reference", {}).get("nchan")
    if nchan:
        cpu = (
            f"{nchan['server_cpu_us_per_delivery']:.1f} us/delivery, nchan's nginx "
            f"({100 * nchan['server_cpu_share']:.0f}% core)"
        )
        table.append(delivery_row("fan-out", "nchan (reference)", nchan, cpu))
    if "many-channels" in results:
        table.append(delivery_row("many-channels", "direct", results["many-channels"]))
    for size, r in sorted(results.get("scaling", {}).items(), key=lambda kv: int(kv[0])):
        table.append(
            delivery_row(
                f"scaling {int(size) // 1000 or size}k" if int(size) >= 1000 else "scaling", "direct", r
            )
        )
    for path, r in results.get("publish", {}).items():
        single, batched = r["single"], r["batched"]
        table.append(
            [
                "publish",
                path,
                f"{single['requests']:,} single, {single['concurrency']} in flight",
                f"{single['statuses'].get('202', 0):,} x 202",
                _lat(single),
                f"{single['publisher_cpu_us_per_request']:.0f} us/publish",
                f"{single['requests_per_s']:,.0f} publishes/s",
                "-",
                f"{100 * single['others_cpu_share']:.0f}%",
            ]
        )
        table.append(
            [
                "publish batch",
                path,
                f"{batched['requests']:,} x {batched['batch']} ev, {batched['concurrency']} in flight",
                f"{batched['statuses'].get('202', 0):,} x 202",
                _lat(batched),
                f"{batched['publisher_cpu_us_per_event']:.1f} us/event",
                f"{batched['events_per_s']:,.0f} events/s",
                "-",
                f"{100 * batched['others_cpu_share']:.0f}%",
            ]
        )
    return table


def format_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- compose mode: targets and the table ----------------------------------------------------


def _proxy_note(r: dict[str, Any], key: str, unit: str, fmt: str = ".1f") -> str:
    """docker-proxy's share, shown apart from the containers' sum (on the proxy path only)."""
    value = r.get(key, {}).get(PROXY)
    if not value:
        return ""
    return f" (+ docker-proxy {value:{fmt}} {unit})"


def _compose_idle_targets(path: str, r: dict[str, Any]) -> list[Target]:
    rss = r["rss_kb_per_connection"]
    by = r["rss_kb_per_connection_by"]
    parts = ", ".join(f"{short} {by[name]:.1f}" for name, short in CONTAINERS.items())
    return [
        Target(
            f"idle RSS ({path})",
            f"<= {STACK_RSS_KB:g} KB per idle stream, whole stack",
            f"{rss:.1f} KB ({parts}; {r['connections']:,} streams)"
            + (f" [capped: {r['capped_by']}]" if r.get("capped_by") else "")
            + _proxy_note(r, "rss_kb_per_connection_by", "KB"),
            verdict(rss <= STACK_RSS_KB),
        )
    ]


def _compose_fanout_targets(path: str, r: dict[str, Any]) -> list[Target]:
    cpu = r["server_cpu_us_per_delivery"]
    p99 = r["latency_ms"]["p99"]
    return [
        Target(
            f"fan-out CPU ({path})",
            f"<= {STACK_FANOUT_CPU_US:g} us/delivery, all containers",
            f"{cpu:.1f} us{_proxy_note(r, 'cpu_us_per_delivery', 'us')}{_batched(r)}",
            verdict(cpu <= STACK_FANOUT_CPU_US),
        ),
        Target(
            f"fan-out p99 ({path})",
            f"<= {TARGET_P99_MS:g} ms at {r['streams']:,} x {r['rate_events_per_s']:g}/s",
            f"{p99:.1f} ms",
            verdict(p99 <= TARGET_P99_MS),
        ),
    ]


def _compose_publish_targets(path: str, r: dict[str, Any]) -> list[Target]:
    single, batched = r["single"], r["batched"]
    rate, cpu, events = single["requests_per_s"], single["server_cpu_us_per_request"], batched["events_per_s"]
    return [
        Target(
            f"publishes/s ({path})",
            f">= {STACK_PUBLISHES_PER_S:,.0f} single-event",
            f"{rate:,.0f}/s",
            verdict(rate >= STACK_PUBLISHES_PER_S),
        ),
        Target(
            f"publish CPU ({path})",
            f"<= {STACK_PUBLISH_CPU_US:g} us/publish, publisher + nginx + redis",
            f"{cpu:.0f} us{_proxy_note(single, 'cpu_us_per_request', 'us', '.0f')}",
            verdict(cpu <= STACK_PUBLISH_CPU_US),
        ),
        Target(
            f"batched events/s ({path})",
            f">= {STACK_BATCH_EVENTS_PER_S:,.0f}",
            f"{events:,.0f}/s",
            verdict(events >= STACK_BATCH_EVENTS_PER_S),
        ),
    ]


def evaluate_compose(results: dict[str, Any]) -> list[Target]:
    """The targets for the whole Compose stack, on each path measured."""
    bad = [name for name, r in delivery_items(results) if not r.get("complete")]
    targets = []
    if delivery_items(results):
        measured = "all complete" if not bad else "incomplete: " + ", ".join(bad)
        targets.append(Target("delivery", "100% in order, every scenario", measured, verdict(not bad)))
    judges = {
        "idle": _compose_idle_targets,
        "fanout": _compose_fanout_targets,
        "publish": _compose_publish_targets,
    }
    for scenario, judge in judges.items():
        for path, r in results.get(scenario, {}).items():
            targets.extend(judge(path, r))
    netns = results.get("fanout", {}).get("netns")
    if netns:
        targets.extend(_reference_targets("netns", netns, results.get("reference", {}).get("nchan")))
    return targets


def _by_container(figures: dict[str, float], fmt: str) -> str:
    return " / ".join(f"{short} {figures.get(name, 0.0):{fmt}}" for name, short in CONTAINERS.items())


def _proxy_cell(figures: dict[str, float], unit: str, fmt: str = ".1f") -> str:
    value = figures.get(PROXY)
    return f"{value:{fmt}} {unit}" if value else "-"


COMPOSE_HEADER = [
    "scenario",
    "path",
    "load",
    "delivered",
    "latency ms p50/p95/p99/max",
    "per container",
    "stack (sum)",
    "docker-proxy",
    "rate",
    "ev/read",
    "others",
]


def _compose_idle_row(path: str, r: dict[str, Any]) -> list[str]:
    by = r["rss_kb_per_connection_by"]
    return [
        "idle",
        path,
        f"{r['connections']:,} streams"
        + (" (capped: docker-proxy's file limit)" if r.get("capped_by") else ""),
        f"{r['held_by_worker']:,} held",
        "-",
        _by_container(by, ".1f") + " KB/stream",
        f"{r['rss_kb_per_connection']:.1f} KB/stream; CPU {r['idle_cpu_percent']:.2f}% core "
        f"(stream worker {r.get('stream_worker_cpu_percent', 0.0):.2f}%)",
        _proxy_cell(by, "KB/stream"),
        "-",
        "-",
        "-",
    ]


def _compose_fanout_row(path: str, r: dict[str, Any]) -> list[str]:
    per = r["cpu_us_per_delivery"]
    return [
        "fan-out",
        path,
        f"{r['streams']:,} x {r['events_each']} ev @ {r['rate_events_per_s']:g}/s",
        f"{r['received']:,}/{r['expected_deliveries']:,}" + ("" if r["complete"] else " INCOMPLETE"),
        _lat(r),
        _by_container(per, ".1f") + " us",
        f"{r['server_cpu_us_per_delivery']:.1f} us/delivery",
        _proxy_cell(per, "us"),
        f"{r['deliveries_per_s']:,.0f} deliveries/s",
        f"{r['events_per_read']:.2f}",
        f"{100 * r['others_cpu_share']:.0f}%",
    ]


def _compose_publish_rows(path: str, r: dict[str, Any]) -> list[list[str]]:
    single, batched = r["single"], r["batched"]
    per_event = {k: v / batched["batch"] for k, v in batched["cpu_us_per_request"].items()}
    return [
        [
            "publish",
            path,
            f"{single['requests']:,} single, {single['concurrency']} in flight",
            f"{single['statuses'].get('202', 0):,} x 202",
            _lat(single),
            _by_container(single["cpu_us_per_request"], ".0f") + " us",
            f"{single['server_cpu_us_per_request']:.0f} us/publish",
            _proxy_cell(single["cpu_us_per_request"], "us", ".0f"),
            f"{single['requests_per_s']:,.0f} publishes/s",
            "-",
            f"{100 * single['others_cpu_share']:.0f}%",
        ],
        [
            "publish batch",
            path,
            f"{batched['requests']:,} x {batched['batch']} ev, {batched['concurrency']} in flight",
            f"{batched['statuses'].get('202', 0):,} x 202",
            _lat(batched),
            _by_container(per_event, ".1f") + " us",
            f"{batched['server_cpu_us_per_event']:.1f} us/event",
            _proxy_cell(per_event, "us"),
            f"{batched['events_per_s']:,.0f} events/s",
            "-",
            f"{100 * batched['others_cpu_share']:.0f}%",
        ],
    ]


def compose_rows(results: dict[str, Any]) -> list[list[str]]:
    """The figures table of compose mode: one row per scenario and path, CPU per container."""
    table = [COMPOSE_HEADER]
    for path, r in results.get("idle", {}).items():
        table.append(_compose_idle_row(path, r))
    for path, r in results.get("fanout", {}).items():
        table.append(_compose_fanout_row(path, r))
    nchan = results.get("reference", {}).get("nchan")
    if nchan:
        table.append(_reference_compose_row(nchan))
    for path, r in results.get("publish", {}).items():
        table.extend(_compose_publish_rows(path, r))
    return table


def _reference_compose_row(r: dict[str, Any]) -> list[str]:
    """The nchan reference in compose mode's table: its nginx (counted) and its Redis (apart)."""
    per = r["cpu_us_per_delivery"]
    redis = f" / redis {per['redis']:.1f}" if "redis" in per else ""
    return [
        "fan-out",
        "nchan (reference)",
        f"{r['streams']:,} x {r['events_each']} ev @ {r['rate_events_per_s']:g}/s",
        f"{r['received']:,}/{r['expected_deliveries']:,}" + ("" if r["complete"] else " INCOMPLETE"),
        _lat(r),
        f"nginx {per['nginx']:.1f}{redis} us",
        f"{r['server_cpu_us_per_delivery']:.1f} us/delivery (nginx)",
        "-",
        f"{r['deliveries_per_s']:,.0f} deliveries/s",
        f"{r['events_per_read']:.2f}",
        f"{100 * r['others_cpu_share']:.0f}%",
    ]


# -- Herald against the nchan reference ---------------------------------------------------------


def herald_cpu_us(r: dict[str, Any], mode: str) -> float:
    """Herald's CPU per delivery as set against nchan's: compose, the stack's sum (the figure its
    targets judge); direct, the stream worker, nginx and the publisher (DIRECT_HERALD)."""
    if mode == "compose":
        return float(r["server_cpu_us_per_delivery"])
    per = r["cpu_us_per_delivery"]
    return sum(float(per.get(name, 0.0)) for name in DIRECT_HERALD)


def offered_per_s(r: dict[str, Any]) -> float:
    """Deliveries per second the fan-out offered: subscribers x publish rate."""
    return float(r["streams"]) * float(r["rate_events_per_s"])


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("inf")


def reference_rows(results: dict[str, Any], mode: str) -> list[list[str]]:
    """Herald's fan-out rows as multiples of the nchan reference's (empty without the reference)."""
    nchan = results.get("reference", {}).get("nchan")
    fanout = results.get("fanout", {})
    if not nchan or not fanout:
        return []
    counted = "whole stack" if mode == "compose" else "stream + nginx + publisher"
    table = [
        [
            "fan-out vs nchan",
            f"CPU/delivery ({counted})",
            "x nchan",
            "p99",
            "x nchan",
            "deliveries/s",
            "of offered",
        ]
    ]
    base_cpu, base_p99 = nchan["server_cpu_us_per_delivery"], nchan["latency_ms"]["p99"]
    for path, r in fanout.items():
        cpu, p99 = herald_cpu_us(r, mode), r["latency_ms"]["p99"]
        table.append(
            [
                path,
                f"{cpu:.1f} us",
                f"{_ratio(cpu, base_cpu):.2f}x",
                f"{p99:.1f} ms",
                f"{_ratio(p99, base_p99):.2f}x",
                f"{r['deliveries_per_s']:,.0f}/s",
                f"{100 * r['deliveries_per_s'] / offered_per_s(r):.1f}%",
            ]
        )
    table.append(
        [
            "nchan (reference)",
            f"{base_cpu:.1f} us",
            "1x",
            f"{base_p99:.1f} ms",
            "1x",
            f"{nchan['deliveries_per_s']:,.0f}/s",
            f"{100 * nchan['deliveries_per_s'] / offered_per_s(nchan):.1f}%",
        ]
    )
    return table


def _reference_targets(path: str, r: dict[str, Any], nchan: dict[str, Any] | None) -> list[Target]:
    """Compose mode, netns: Herald's fan-out against nchan's (when it ran) and against the offer."""
    offered, rate = offered_per_s(r), r["deliveries_per_s"]
    targets = [
        Target(
            f"fan-out deliveries/s ({path})",
            f"= offered ({offered:,.0f}/s, within {100 * REF_OFFERED_SLACK:g}%)",
            f"{rate:,.0f}/s ({100 * rate / offered:.1f}%)",
            verdict(rate >= offered * (1 - REF_OFFERED_SLACK)),
        )
    ]
    if not nchan:
        return targets
    cpu, base_cpu = r["server_cpu_us_per_delivery"], nchan["server_cpu_us_per_delivery"]
    p99, base_p99 = r["latency_ms"]["p99"], nchan["latency_ms"]["p99"]
    cpu_ratio, p99_ratio = _ratio(cpu, base_cpu), _ratio(p99, base_p99)
    return [
        *targets,
        Target(
            f"fan-out CPU vs nchan ({path})",
            f"<= {REF_CPU_RATIO:g}x nchan's nginx per delivery",
            f"{cpu_ratio:.2f}x ({cpu:.1f} vs {base_cpu:.1f} us)",
            verdict(cpu_ratio <= REF_CPU_RATIO),
        ),
        Target(
            f"fan-out p99 vs nchan ({path})",
            f"<= {REF_P99_RATIO:g}x nchan's p99",
            f"{p99_ratio:.2f}x ({p99:.1f} vs {base_p99:.1f} ms)",
            verdict(p99_ratio <= REF_P99_RATIO),
        ),
    ]


# -- several runs side by side (bench --compare) ---------------------------------------------------


def comparison_rows(reports: list[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """The fan-out rows of several reports (name, report), each labelled with its run and transport.

    Herald's rows are set against the nchan reference of their own run, measured in
    the same minutes; a report without a transport predates the setting ("-").
    """
    table = [
        [
            "run",
            "transport",
            "path",
            "load",
            "latency ms p50/p95/p99/max",
            "CPU/delivery",
            "x nchan",
            "p99 x nchan",
            "deliveries/s",
            "ev/read",
        ]
    ]
    for name, report in reports:
        mode, results = report["mode"], report["results"]
        transport = str(report.get("transport") or "-")
        nchan = results.get("reference", {}).get("nchan")
        for path, r in results.get("fanout", {}).items():
            cpu, p99 = herald_cpu_us(r, mode), r["latency_ms"]["p99"]
            versus = nchan is not None
            table.append(
                [
                    name,
                    transport,
                    f"{mode} {path}",
                    f"{r['streams']:,} x {r['events_each']} @ {r['rate_events_per_s']:g}/s",
                    _lat(r) + ("" if r["complete"] else " INCOMPLETE"),
                    f"{cpu:.1f} us",
                    f"{_ratio(cpu, nchan['server_cpu_us_per_delivery']):.2f}x" if versus else "-",
                    f"{_ratio(p99, nchan['latency_ms']['p99']):.2f}x" if versus else "-",
                    f"{r['deliveries_per_s']:,.0f}/s",
                    f"{r['events_per_read']:.2f}",
                ]
            )
        if nchan:
            table.append(
                [
                    name,
                    "-",
                    "nchan (reference)",
                    f"{nchan['streams']:,} x {nchan['events_each']} @ {nchan['rate_events_per_s']:g}/s",
                    _lat(nchan) + ("" if nchan["complete"] else " INCOMPLETE"),
                    f"{nchan['server_cpu_us_per_delivery']:.1f} us",
                    "1x",
                    "1x",
                    f"{nchan['deliveries_per_s']:,.0f}/s",
                    f"{nchan['events_per_read']:.2f}",
                ]
            )
    return table
