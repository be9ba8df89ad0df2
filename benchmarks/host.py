"""What the host was doing while a benchmark ran: load average and CPU steal time, recorded in the result.

Why steal: on a virtual machine the hypervisor can take the cores away without raising the guest's load average.
That once slowed every engine here about 2.5× and moved the teacher/student ratios by tens of percent while the
load average looked idle; a figure taken under steal now says so.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

PROC_STAT = Path("/proc/stat")
STEAL_WARNING = 0.05  # fraction of CPU time taken by the hypervisor above which a result carries a caveat


def cpu_jiffies(proc_stat: Path | None = None) -> list[int] | None:
    """[steal, total] CPU time since boot from /proc/stat's aggregate line; None where there is no /proc/stat."""
    try:
        fields = (proc_stat or PROC_STAT).read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal; guest time is already counted in user.
    values = [int(value) for value in fields[1:9]]
    return [values[7] if len(values) > 7 else 0, sum(values)]


def start(**extra) -> dict:
    """The host's description at the start of a run; pass it to `finish` when the run ends."""
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "cpu_jiffies_start": cpu_jiffies(), **extra}


def finish(host: dict) -> dict:
    """Adds the load average at the end and the fraction of CPU time stolen during the run (None if unknown)."""
    host["loadavg_end"] = list(os.getloadavg())
    before, after = host.pop("cpu_jiffies_start", None), cpu_jiffies()
    elapsed = after[1] - before[1] if before and after else 0
    host["cpu_steal"] = (after[0] - before[0]) / elapsed if elapsed > 0 else None
    return host


def describe(host: dict) -> str:
    """'load average 0.4 at start, 2.1 at end; CPU steal 0.0 %' plus a caveat when other work or the hypervisor
    took CPU time. The end load is not judged: the benchmark's own threads raise it."""
    text = f"load average {host['loadavg_start'][0]:.1f} at start, {host['loadavg_end'][0]:.1f} at end"
    steal = host.get("cpu_steal")
    if steal is not None:
        text += f"; CPU steal {100 * steal:.1f} % of the run"
    busy = host["loadavg_start"][0] > host["cpus"]
    stolen = steal is not None and steal > STEAL_WARNING
    if busy or stolen:
        who = " and ".join(name for name, took in (("other jobs", busy), ("the hypervisor", stolen)) if took)
        text += (f" ({who} took CPU time: absolute numbers are pessimistic, and ratios, though measured back to "
                 "back, can move by tens of percent)")
    return text
