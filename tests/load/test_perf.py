"""tests.load.perf: samples become µs per delivery, by component and kind of kernel work."""

from __future__ import annotations

import pytest

from tests.load.perf import breakdown, format_breakdown, kernel_kind


@pytest.mark.parametrize(
    ("symbol", "kind"),
    [
        ("br_handle_frame", "bridge/veth"),
        ("veth_xmit", "bridge/veth"),
        ("nf_hook_slow", "netfilter"),
        ("ipt_do_table", "netfilter"),
        ("unix_stream_sendmsg", "unix socket"),
        ("tcp_sendmsg_locked", "tcp/ip"),
        ("__dev_queue_xmit", "tcp/ip"),
        ("__do_softirq", "softirq"),
        ("ep_poll_callback", "epoll"),
        ("_copy_to_iter", "copy"),
        ("__schedule", "scheduling"),
        ("entry_SYSCALL_64_after_hwframe", "syscall entry/exit"),
        ("kmem_cache_alloc", "other kernel"),
    ],
)
def test_kernel_symbols_fall_into_kinds(symbol: str, kind: str) -> None:
    assert kernel_kind(symbol) == kind


def test_periods_become_microseconds_per_delivery() -> None:
    ms = 1_000_000  # a cpu-clock sample's period is in nanoseconds
    samples = [
        (10, "PyEval_EvalFrameDefault", False, 3 * ms),
        (10, "unix_stream_sendmsg", True, 1 * ms),
        (20, "tcp_recvmsg", True, 2 * ms),
        (20, "ngx_http_upstream_process_non_buffered_request", False, 4 * ms),
        (0, "default_idle", True, 50 * ms),  # idle: not counted
    ]
    table = breakdown(samples, {"stream": [10], "nginx": [20]}, deliveries=1000)
    assert table == {
        "stream": {"user": 3.0, "unix socket": 1.0},
        "nginx": {"user": 4.0, "tcp/ip": 2.0},
    }
    text = format_breakdown(table)
    assert text.splitlines()[0].split() == ["nginx", "6.0", "µs/delivery:", "user", "4.0,", "tcp/ip", "2.0"]
