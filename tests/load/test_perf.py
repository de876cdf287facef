"""tests.load.perf: samples with call chains become µs per delivery, by component and by
what the kernel was doing (which system call, or the receive softirq)."""

from __future__ import annotations

from tests.load.perf import Sample, breakdown, format_breakdown, kind_of, layer_of, parse_script

# What `perf script -F pid,period,ip,sym,dso` prints for a recording with -g.
SCRIPT = """\
  10    2000000
\tffffffff81e7260e veth_xmit ([kernel.kallsyms])
\tffffffff81756eda __dev_queue_xmit ([kernel.kallsyms])
\tffffffff8175706c tcp_sendmsg ([kernel.kallsyms])
\tffffffff8175912c __sys_sendto ([kernel.kallsyms])
\tffffffff8223b5d1 do_syscall_64 ([kernel.kallsyms])
\t          108f36 send (/usr/lib/x86_64-linux-gnu/libc.so.6)

  10    1000000
\tffffffff81e7260e nf_hook_slow ([kernel.kallsyms])
\tffffffff81e72600 ip_rcv ([kernel.kallsyms])
\tffffffff81e72500 net_rx_action ([kernel.kallsyms])
\tffffffff81e72400 handle_softirqs ([kernel.kallsyms])
\tffffffff81e72300 __local_bh_enable_ip ([kernel.kallsyms])
\tffffffff8175912c __sys_sendto ([kernel.kallsyms])
\tffffffff8223b5d1 do_syscall_64 ([kernel.kallsyms])

  20    3000000
\t          14f38 ngx_http_upstream_process_non_buffered_request (/usr/sbin/nginx)

  20    1000000
\tffffffff81e7260e _raw_spin_unlock_irqrestore ([kernel.kallsyms])
\tffffffff8175912c do_epoll_wait ([kernel.kallsyms])
\tffffffff8223b5d1 do_syscall_64 ([kernel.kallsyms])

  0    9000000
\tffffffff81e7260e pv_native_safe_halt ([kernel.kallsyms])
"""


def test_call_chains_are_parsed() -> None:
    samples = parse_script(SCRIPT)
    assert [(s.pid, s.period, len(s.frames)) for s in samples] == [
        (10, 2000000, 6),
        (10, 1000000, 7),
        (20, 3000000, 1),
        (20, 1000000, 3),
        (0, 9000000, 1),
    ]
    assert samples[0].frames[0] == ("veth_xmit", True)
    assert samples[2].frames[0] == ("ngx_http_upstream_process_non_buffered_request", False)


def test_kernel_time_goes_to_its_system_call_or_softirq() -> None:
    samples = parse_script(SCRIPT)
    assert [kind_of(s) for s in samples[:4]] == ["send", "softirq (receive path)", "user", "epoll_wait"]
    assert [layer_of(s) for s in samples[:4]] == ["bridge/veth", "netfilter", None, None]
    accept = (("kmem_cache_alloc", True), ("__sys_accept4", True), ("do_syscall_64", True))
    assert kind_of(Sample(1, 1, accept)) == "accept4()"
    writev = (("vfs_writev", True), ("do_writev", True), ("x64_sys_call", True), ("do_syscall_64", True))
    assert kind_of(Sample(1, 1, writev)) == "send"
    assert kind_of(Sample(1, 1, (("asm_sysvec_apic_timer_interrupt", True),))) == "other kernel"


def test_periods_become_microseconds_per_delivery() -> None:
    table = breakdown(parse_script(SCRIPT), {"stream": [10], "nginx": [20]}, deliveries=1000)
    assert table == {
        "stream": {
            "send": 2.0,
            "of which bridge/veth": 2.0,
            "softirq (receive path)": 1.0,
            "of which netfilter": 1.0,
        },
        "nginx": {"user": 3.0, "epoll_wait": 1.0},
    }
    nginx, stream = format_breakdown(table).splitlines()  # the costlier first
    assert nginx.split()[:2] == ["nginx", "4.0"]
    assert stream.split(": ", 1)[1] == (
        "send 2.0, softirq (receive path) 1.0, of which bridge/veth 2.0, of which netfilter 1.0"
    )
    assert stream.split()[:2] == ["stream", "3.0"]  # layers are not counted twice
