#!/usr/bin/env python3
"""Per-command cost of running commands in the login environment, against the plain one, in one run.

Two SSH connections to the dev cluster as hpcuser: one with ``login_shell`` off (``ssh host cmd`` as
before), one with it on (the login shell ran once at the first command, each command then is
``env -i K=V ... argv``). The same commands alternate between them so both see the same load. Prints
the one-time login-shell cost, the median and mean per command of each, their difference and ratio
(target: within a few ms). Needs the dev cluster (scripts/dev-cluster up). Usage:

    .venv/bin/python bench/login_env.py [--rounds 300] [--command true] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from hpclaunch.transport.ssh import SSHTransport

STATE = Path(os.environ.get("HPCLAUNCH_DEV_DIR", "/var/lib/hpclaunch-dev"))


def timed(transport: SSHTransport, argv: list[str]) -> float:
    started = time.perf_counter()
    transport.run(argv)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="commands on each connection (default: 300)")
    parser.add_argument("--command", default="true", help="the command run each time (default: true)")
    parser.add_argument("--host", default="hpcdev", help="ssh config host (default: hpcdev)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    argv = args.command.split()
    config = str(STATE / "ssh_config")
    with (
        SSHTransport(args.host, ssh_config_path=config, login_shell=False) as plain,
        SSHTransport(args.host, ssh_config_path=config, login_shell=True) as login,
    ):
        plain.connect()
        login.connect()
        timed(plain, argv)
        first = timed(login, argv)  # includes the one login shell
        assert login.login_env.environment is not None, "the login shell gave no environment"
        for transport in (plain, login):  # warm both before measuring
            for _ in range(10):
                timed(transport, argv)
        times: dict[str, list[float]] = {"plain": [], "login": []}
        for _ in range(args.rounds):
            times["plain"].append(timed(plain, argv))
            times["login"].append(timed(login, argv))
        env_bytes = len(" ".join(f"{k}={v}" for k, v in login.login_env.environment.items()))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    mean = {k: statistics.fmean(v) * 1e3 for k, v in times.items()}
    result = {
        "command": args.command,
        "rounds": args.rounds,
        "first_command_with_login_shell_ms": round(first * 1e3, 2),
        "login_env_bytes": env_bytes,
        "plain_median_ms": round(med["plain"], 3),
        "login_median_ms": round(med["login"], 3),
        "plain_mean_ms": round(mean["plain"], 3),
        "login_mean_ms": round(mean["login"], 3),
        "extra_median_ms": round(med["login"] - med["plain"], 3),
        "ratio_median": round(med["login"] / med["plain"], 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"`{args.command}` x {args.rounds} on each connection, alternating")
    print(f"  first command with the login shell: {result['first_command_with_login_shell_ms']:.1f} ms")
    print(f"  login environment passed per command: {env_bytes} bytes")
    print(f"  plain env:  median {med['plain']:.2f} ms, mean {mean['plain']:.2f} ms")
    print(f"  login env:  median {med['login']:.2f} ms, mean {mean['login']:.2f} ms")
    print(f"  extra per command: {med['login'] - med['plain']:+.2f} ms (ratio {result['ratio_median']:.2f}x)")


if __name__ == "__main__":
    main()
