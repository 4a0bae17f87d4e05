"""How long ``compress --help`` (and friends) take, and their peak memory: each a fresh interpreter.

usage: python benchmarks/cli_startup.py [--repeats 5] [-- ARGS ...]   (default: --help, bench --help, --version)

Runs ``python -m compress ARGS`` ``--repeats`` times in subprocesses with the same interpreter and prints the
fastest wall time (least disturbed by other load) and the largest peak RSS of the child (``os.wait4``'s
ru_maxrss, KiB on Linux). Target (issue 20): --help well under 1 s; it took 3-4 s and ~950 MB
while it imported torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _one(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one ``python -m compress ARGS``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = status  # reaped here: keep Popen from waiting again
    if status != 0:
        raise SystemExit(f"python -m compress {' '.join(args)}: exit status {status}")
    return seconds, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (the fastest is reported)")
    parser.add_argument("args", nargs="*", help="one command's arguments, e.g. 'bench --help' (default: three)")
    ns = parser.parse_args()
    commands = [ns.args] if ns.args else [["--help"], ["bench", "--help"], ["--version"]]
    print(f"{'command':<30} {'best s':>7} {'peak RSS MiB':>13}")
    for args in commands:
        runs = [_one(args) for _ in range(ns.repeats)]
        best = min(s for s, _ in runs)
        peak = max(kib for _, kib in runs) / 1024
        print(f"{'compress ' + ' '.join(args):<30} {best:>7.3f} {peak:>13.1f}")


if __name__ == "__main__":
    main()
