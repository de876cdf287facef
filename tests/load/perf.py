"""Where a delivery's CPU goes, per process and in the kernel: `perf record -a` during a run.

`make bench BENCH_ARGS="--perf DIR"` records every CPU (`perf record -a -e cpu-clock`)
while a fan-out scenario publishes, then splits the samples by component (the
stack's processes, the bench's clients, docker-proxy, kernel threads) and, within
each, into user space and kernel work by kind (TCP/IP, Docker's bridge and veth
pairs, netfilter, Unix sockets, epoll, copies, scheduling, softirq). cpu-clock samples carry
their period in nanoseconds, so shares turn into µs per delivery. Needs Linux
`perf` (Debian's linux-perf) and root (or kernel.perf_event_paranoid <= -1).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from tests.load.profile import stop_recorder

# Kernel symbols by kind, first match wins. Self time, so a kind is the work done
# in those functions themselves, not in what they call.
KERNEL_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("bridge/veth", r"^(br_|__br_|veth_|__veth)"),
        ("netfilter", r"^(nf_|__nf_|ipt_|ip6t_|nft_|ipv4_conntrack|ipv4_confirm|xt_|iptable_)"),
        ("unix socket", r"^(unix_|__unix_|maybe_add_creds|scm_)"),
        (
            "tcp/ip",
            r"^(tcp_|__tcp_|ip_|__ip_|ip_finish|inet_|__inet_|sk_|__sk_|skb_|__skb|kfree_skb|consume_skb|"
            r"alloc_skb|__alloc_skb|net_|__net|netif_|__netif|__napi|napi_|process_backlog|dev_|__dev_|"
            r"loopback_|sock_|__sock|release_sock|lock_sock|raw_local_deliver|validate_xmit|eth_|"
            r"__kfree_skb|skb_release|dst_release|__build_skb|ipv4_)",
        ),
        ("softirq", r"^(__do_softirq|do_softirq|handle_softirqs|irq_exit|__irq_exit|run_ksoftirqd)"),
        ("epoll", r"^(ep_|__ep_|do_epoll|epoll_|__x64_sys_epoll|ep_poll)"),
        ("copy", r"^(copy_|_copy_|__copy_|memcpy|memmove|rep_movs|copyin|copyout|csum_)"),
        (
            "scheduling",
            r"^(schedule|__schedule|pick_next|enqueue_|dequeue_|try_to_wake_up|finish_task_switch|"
            r"__wake_up|wake_up|update_curr|select_task_rq|psi_|put_prev|set_next|ttwu_|native_sched)",
        ),
        (
            "syscall entry/exit",
            r"^(entry_SYSCALL|syscall_|do_syscall|__x64_sys|__fdget|fput|__fget|exit_to_user|"
            r"syscall_exit|__audit|entry_SYSRETQ)",
        ),
    )
)


def find_perf() -> str | None:
    return shutil.which("perf")


def kernel_kind(symbol: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(symbol):
            return kind
    return "other kernel"


class PerfRecording:
    """`perf record -a` of every CPU for a bounded time."""

    def __init__(self, binary: str, seconds: float, out: Path, frequency: int = 997) -> None:
        self.binary = binary
        self.out = out
        command = [binary, "record", "-a", "-e", "cpu-clock", "-F", str(frequency), "-o", str(out)]
        self.process = subprocess.Popen(
            [*command, "--", "sleep", str(max(1.0, seconds))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, timeout: float = 60, *, now: bool = False) -> str | None:
        """Wait for the recording (or end it `now`); None when it worked, else why not."""
        err = stop_recorder(self.process, timeout, now=now)
        if self.process.returncode != 0 or not self.out.exists():
            return f"perf record failed ({self.process.returncode}): {err.decode(errors='replace')[-500:]}"
        return None

    def samples(self) -> list[tuple[int, str, bool, int]]:
        """(pid, symbol, in the kernel, period in ns) of every sample."""
        script = subprocess.run(
            [self.binary, "script", "-i", str(self.out), "-F", "pid,period,ip,sym,dso"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        found = []
        for line in script.stdout.splitlines():
            # "  1234   1001001  ffffffff81234567 tcp_sendmsg ([kernel.kallsyms])"
            parts = line.split(None, 3)
            if len(parts) < 4 or not parts[0].isdigit() or not parts[1].isdigit():
                continue
            pid, period, rest = int(parts[0]), int(parts[1]), parts[3]
            symbol, _, dso = rest.rpartition(" (")
            kernel = "kernel" in dso or (dso.startswith("[") and "vdso" not in dso)
            found.append((pid, symbol.strip() or "[unknown]", kernel, period))
        return found


def breakdown(
    samples: list[tuple[int, str, bool, int]], components: dict[str, list[int]], deliveries: int
) -> dict[str, dict[str, float]]:
    """µs per delivery by component, then by "user" and kernel kind."""
    owner = {pid: name for name, pids in components.items() for pid in pids}
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, symbol, kernel, period in samples:
        if pid == 0:
            continue  # the idle task
        name = owner.get(pid) or owner.setdefault(pid, other(pid))
        kind = kernel_kind(symbol) if kernel else "user"
        table[name][kind] += period / 1000 / max(deliveries, 1)
    return {name: dict(sorted(kinds.items(), key=lambda kv: -kv[1])) for name, kinds in table.items()}


def other(pid: int) -> str:
    """A process outside the stack and the bench: kernel threads by name (ksoftirqd does the
    network receive work that softirqs defer), everything else together."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "other processes"
    for thread in ("ksoftirqd", "kworker", "rcu"):
        if comm.startswith(thread):
            return thread
    return "other processes"


def format_breakdown(table: dict[str, dict[str, float]]) -> str:
    """One line per component: total µs per delivery, then its parts."""
    lines = []
    for name, kinds in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(kinds.values())
        if total < 0.05:
            continue
        parts = ", ".join(f"{kind} {value:.1f}" for kind, value in kinds.items() if value >= 0.05)
        lines.append(f"  {name:<16} {total:5.1f} µs/delivery: {parts}")
    return "\n".join(lines)
