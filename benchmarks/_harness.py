"""Pieces shared by the benchmarks: measuring a child process, machine facts, formatting.

The measuring follows ``bn_fold_large.py`` (which keeps its own copy, unchanged): each contender
runs in its own process group, started by GNU ``/usr/bin/time`` so that its peak RSS
(``ru_maxrss``, GNU time's ``%M``) is its own and not the harness's inherited high-water mark;
``os.wait4`` is the fallback when GNU time is missing. Added here: an optional RSS ceiling, so
that a peer whose memory grows with the calibration set is stopped and reported instead of
taking the machine down.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

GB = 10**9
MB = 10**6
GNU_TIME = Path("/usr/bin/time")
TIME_FORMAT = "%M %U %S"  # peak RSS KiB, user s, sys s
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Measurement:
    returncode: int
    timed_out: bool
    wall_s: float
    peak_rss_bytes: int
    user_s: float
    sys_s: float
    rss_source: str  # "gnu-time" or "wait4"
    rss_limited: bool = False  # killed by the RSS ceiling

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.rss_limited

    def status(self) -> str:
        if self.rss_limited:
            return "killed (RSS ceiling)"
        if self.timed_out:
            return "timeout"
        return "ok" if self.returncode == 0 else f"failed (rc={self.returncode})"


def _direct_children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (from /proc/*/stat)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... rss is field 24
            total += int(fields[21]) * PAGE
    return total


def _kill(pid: int, via_time: bool, flag: threading.Event) -> None:
    """Kill the contender; under GNU time kill only time's child first, so time still reports."""
    flag.set()
    for child in _direct_children(pid) if via_time else []:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _parse_time_file(path: Path) -> tuple[int, float, float] | None:
    try:
        rss_kib, user, sys_ = path.read_text().strip().splitlines()[-1].split()
        return int(rss_kib) * 1024, float(user), float(sys_)
    except (OSError, ValueError, IndexError):
        return None


def _watch_rss(pid: int, via_time: bool, limit: int, done: threading.Event, hit: threading.Event) -> None:
    while not done.wait(0.25):
        if _group_rss(pid) > limit:
            _kill(pid, via_time, hit)
            return


def run_measured(
    argv: Sequence[str],
    cwd: Path,
    log_path: Path,
    timeout_s: float,
    rss_limit_bytes: int | None = None,
    env: dict[str, str] | None = None,
) -> Measurement:
    """Run argv in its own process group; measure wall time and its own peak RSS.

    Past ``timeout_s`` seconds, or (when ``rss_limit_bytes`` is set) once the process group's
    resident memory exceeds it, the child is killed and the measurement says so.
    """
    via_time = GNU_TIME.exists()
    time_file = log_path.with_suffix(".time")
    cmd = [str(GNU_TIME), "-f", TIME_FORMAT, "-o", str(time_file), *argv] if via_time else list(argv)
    timed_out, rss_hit, done = threading.Event(), threading.Event(), threading.Event()
    with log_path.open("wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        timer = threading.Timer(timeout_s, _kill, (proc.pid, via_time, timed_out))
        timer.start()
        watcher = None
        if rss_limit_bytes:
            watcher = threading.Thread(target=_watch_rss, args=(proc.pid, via_time, rss_limit_bytes, done, rss_hit),
                                       daemon=True)
            watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
        wall = time.perf_counter() - start
    if watcher is not None:
        watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    timed = _parse_time_file(time_file) if via_time else None
    rss, user, sys_ = timed or (usage.ru_maxrss * 1024, usage.ru_utime, usage.ru_stime)  # KiB on Linux
    return Measurement(proc.returncode, timed_out.is_set(), wall, rss, user, sys_,
                       "gnu-time" if timed else "wait4", rss_hit.is_set())


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info(packages: Iterable[str]) -> dict[str, object]:
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "int8_dot_product": sorted(flags & {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}),
        "ram_gb": round(mem_kib * 1024 / GB, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(packages),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
