"""Where a delivery's CPU goes, per process and in the kernel: `perf record -a -g` during a run.

`make bench BENCH_ARGS="--perf DIR"` records every CPU with call chains
(`perf record -a -g -e cpu-clock`) while a fan-out scenario publishes, then
splits the samples by component (the stack's processes, the bench's clients,
docker-proxy, kernel threads such as ksoftirqd) and, within each, into user
space and kernel work by what the kernel was doing: which system call (send,
receive, epoll_wait, ...), or the network receive path run as a softirq (on
loopback and Docker's veth pairs that runs in the *sender's* context), or
anything else. Across those it also reports how much ran in Docker's bridge and
veth code and in netfilter (iptables, conntrack). cpu-clock samples carry their
period in nanoseconds, so shares become µs per delivery. Needs Linux `perf`
(Debian's linux-perf) and root (or kernel.perf_event_paranoid <= -1).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.load.profile import stop_recorder

SOFTIRQ = re.compile(r"^(__do_softirq|handle_softirqs|net_rx_action|do_softirq|run_ksoftirqd)$")
# The kernel's system call dispatcher; the frame just inside it is the call's own function.
DISPATCH = re.compile(r"^(do_syscall_64|x64_sys_call|do_int80_syscall_32)$")
# That function's name without its prefixes: __x64_sys_writev, __sys_sendto, do_writev, ksys_read...
CALL_PREFIX = re.compile(r"^(?:__x64_sys_|__ia32_sys_|__se_sys_|__do_sys_|___sys_|__sys_|ksys_|do_)")
SYSCALL_KINDS = {
    "send": {"sendto", "sendmsg", "sendmmsg", "write", "writev", "pwritev", "sendfile64", "splice"},
    "receive": {"recvfrom", "recvmsg", "recvmmsg", "read", "readv", "pread64"},
    "epoll_wait": {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"},
    # Rescheduling on the way back to user space: the process gave the CPU up.
    "scheduling": {"exit_to_user_mode_loop", "syscall_exit_to_user_mode", "exit_to_user_mode_prepare"},
}
BRIDGE = re.compile(r"^(br_|__br_|veth_|__veth)")
NETFILTER = re.compile(r"^(nf_|__nf_|ipt_|ip6t_|nft_|ipv4_conntrack|ipv4_confirm|xt_|iptable_|conntrack_)")


@dataclass(frozen=True)
class Sample:
    """One sample: whose, how long (ns), and its call chain, innermost first."""

    pid: int
    period: int
    frames: tuple[tuple[str, bool], ...]  # (symbol, in the kernel)


def find_perf() -> str | None:
    return shutil.which("perf")


def kind_of(sample: Sample) -> str:
    """What the sample's CPU time was spent on: "user", or the kernel path it ran in."""
    if not sample.frames or not sample.frames[0][1]:
        return "user"
    symbols = [symbol for symbol, kernel in sample.frames if kernel]
    # A softirq runs inside whatever it interrupted (often a send's bh enable): it wins.
    if any(SOFTIRQ.match(symbol) for symbol in symbols):
        return "softirq (receive path)"
    for inner, outer in itertools.pairwise(symbols):
        if DISPATCH.match(outer) and not DISPATCH.match(inner):
            name = CALL_PREFIX.sub("", inner)
            for kind, names in SYSCALL_KINDS.items():
                if name in names or inner in names:
                    return kind
            return f"{name}()"
    return "other kernel"


def layer_of(sample: Sample) -> str | None:
    """Docker's network layers the sample passed through, if any: "bridge/veth", "netfilter"."""
    for symbol, kernel in sample.frames:
        if kernel and NETFILTER.match(symbol):
            return "netfilter"
        if kernel and BRIDGE.match(symbol):
            return "bridge/veth"
    return None


def parse_script(text: str) -> list[Sample]:
    """Samples from `perf script -F pid,period,ip,sym,dso` of a recording with call chains."""
    samples: list[Sample] = []
    header: tuple[int, int] | None = None
    frames: list[tuple[str, bool]] = []
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if header is not None:
                samples.append(Sample(header[0], header[1], tuple(frames)))
            header, frames = None, []
        elif line[0] in " 0123456789" and not line.startswith("\t"):
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                header = (int(parts[0]), int(parts[1]))
        else:
            # "\tffffffff81e7260e sock_poll ([kernel.kallsyms])"
            _, _, rest = line.strip().partition(" ")
            symbol, _, dso = rest.rpartition(" (")
            frames.append((symbol.strip() or "[unknown]", "kernel" in dso))
    return samples


class PerfRecording:
    """`perf record -a -g` of every CPU for a bounded time."""

    def __init__(self, binary: str, seconds: float, out: Path, frequency: int = 997) -> None:
        self.binary = binary
        self.out = out
        command = [binary, "record", "-a", "-g", "-e", "cpu-clock", "-F", str(frequency), "-o", str(out)]
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

    def samples(self) -> list[Sample]:
        script = subprocess.run(
            [self.binary, "script", "-i", str(self.out), "-F", "pid,period,ip,sym,dso"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        return parse_script(script.stdout)


def breakdown(
    samples: list[Sample], components: dict[str, list[int]], deliveries: int
) -> dict[str, dict[str, float]]:
    """µs per delivery by component, then by kind (kind_of) and Docker network layer (layer_of)."""
    owner = {pid: name for name, pids in components.items() for pid in pids}
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for sample in samples:
        if sample.pid == 0:
            continue  # the idle task
        name = owner.get(sample.pid) or owner.setdefault(sample.pid, other(sample.pid))
        us = sample.period / 1000 / max(deliveries, 1)
        table[name][kind_of(sample)] += us
        layer = layer_of(sample)
        if layer:
            table[name][f"of which {layer}"] += us
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
    """One line per component: total µs per delivery, then its parts (layers last)."""
    lines = []
    for name, kinds in sorted(table.items(), key=lambda kv: -total(kv[1])):
        if total(kinds) < 0.05:
            continue
        parts = [
            f"{kind} {value:.1f}" for kind, value in kinds.items() if value >= 0.05 and "of which" not in kind
        ]
        layers = [
            f"{kind} {value:.1f}" for kind, value in kinds.items() if value >= 0.05 and "of which" in kind
        ]
        lines.append(f"  {name:<16} {total(kinds):5.1f} µs/delivery: " + ", ".join(parts + layers))
    return "\n".join(lines)


def total(kinds: dict[str, float]) -> float:
    return sum(value for kind, value in kinds.items() if "of which" not in kind)
