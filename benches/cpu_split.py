#!/usr/bin/env python3
"""Where a proxy's CPU time per request goes: user space (the proxy's own code) and the kernel (its
syscalls and the loopback TCP work done on its behalf), for switchyard, nginx and HAProxy under the
same load. proxy-compare reports only the sum; this splits it.

    cargo build --release
    benches/cpu_split.py [--rounds 3] [--duration 6] [--close] [--contenders LIST]

`--contenders` picks who runs, in that order each round (default `nginx,haproxy,switchyard`);
`switchyard-ip_hash` and `switchyard-cookie` are switchyard with that strategy instead of
round_robin, so `--contenders switchyard,switchyard-ip_hash` compares two strategies under the
same load (the cookie pool's clients send no cookie: each response sets one).

Three backends in one nginx (1 worker, pinned to CPU 1, answering `200 ok` like proxy-compare's),
each proxy with one worker pinned to CPU 0 and the same upstream keep-alive settings as
proxy-compare, wrk -t1 -c64 pinned to CPU 1 (`--close`: every request on a new connection). Each
round runs every proxy once, in turn; the figures are utime and stime from /proc (proxy and its
children) over wrk's run, divided by wrk's request count. Loopback only, fixed duration, every
process stopped by its PID.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [18181, 18182, 18183]
PORTS = {
    "nginx": 18190,
    "haproxy": 18191,
    "switchyard": 18195,
    "switchyard-ip_hash": 18196,
    "switchyard-cookie": 18197,
}


def cpu_ticks(pid):
    """(utime, stime) clock ticks of pid and its children."""
    pids = [pid]
    try:
        pids += [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        pass
    user = system = 0
    for p in pids:
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def wait_port(port, proc, what):
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port}")


def configs(tmp):
    servers = "\n".join(
        f"server {{ listen 127.0.0.1:{p} backlog=8192; location / {{ add_header X-Backend {i}; "
        f'return 200 "ok"; }} }}'
        for i, p in enumerate(BACKENDS, 1)
    )
    common = (
        f"worker_processes 1; error_log {tmp}/error.log warn; events {{ worker_connections 8000; }}\n"
        f"http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 120s;\n"
        f"client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;\n"
        f"fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;\n"
    )
    upstreams = " ".join(f"server 127.0.0.1:{p};" for p in BACKENDS)
    files = {
        "backend.conf": f"pid {tmp}/backend.pid;\n{common}{servers}\n}}\n",
        "nginx.conf": (
            f"pid {tmp}/nginx.pid;\n{common}upstream be {{ {upstreams} keepalive 192; "
            f"keepalive_requests 10000000; keepalive_timeout 120s; }}\n"
            f"server {{ listen 127.0.0.1:{PORTS['nginx']} backlog=8192; location / {{ "
            f'proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}\n}}\n'
        ),
        "haproxy.cfg": (
            "global\n  nbthread 1\n  maxconn 8000\n  tune.maxaccept 64\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n"
            "  timeout server 120s\n  timeout http-keep-alive 120s\n"
            f"frontend fe\n  bind 127.0.0.1:{PORTS['haproxy']}\n  default_backend be\n"
            "backend be\n  balance roundrobin\n  http-reuse always\n"
            + "".join(f"  server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(BACKENDS, 1))
        ),
    }
    for name, strategy in [
        ("switchyard", "round_robin"),
        ("switchyard-ip_hash", "ip_hash"),
        ("switchyard-cookie", "cookie"),
    ]:
        files[f"{name}.toml"] = (
            f'[runtime]\nworkers = 1\n\n[[listeners]]\nlisten = "127.0.0.1:{PORTS[name]}"\n\n'
            f'[[routes]]\npool = "bench"\n\n[pools.bench]\nstrategy = "{strategy}"\nbackends = ['
            + ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in BACKENDS)
            + ']\n\n[pools.bench.cookie]\nname = "sy"\nsecret = "cpu-split-secret-0123456789"\n'
        )
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)


def start(name, tmp, binary, procs):
    if name == "nginx":
        argv = ["nginx", "-p", tmp, "-c", f"{tmp}/nginx.conf", "-g", "daemon off;"]
    elif name == "haproxy":
        argv = ["haproxy", "-db", "-f", f"{tmp}/haproxy.cfg"]
    else:
        argv = [binary, "--config", f"{tmp}/{name}.toml"]
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen(["taskset", "-c", "0"] + argv, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    wait_port(PORTS[name], proc, name)
    return proc


def wrk(port, seconds, close):
    argv = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk saw errors against port {port}:\n{out}")
    for line in out.splitlines():
        if "requests in" in line:
            return int(line.split()[0])
    sys.exit(f"wrk printed no request count:\n{out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--close", action="store_true", help="a new connection per request")
    parser.add_argument("--binary", default=os.path.join(REPO, "target/release/switchyard"))
    parser.add_argument("--contenders", default="nginx,haproxy,switchyard",
                        help="comma-separated, from: " + ", ".join(PORTS))
    args = parser.parse_args()
    contenders = args.contenders.split(",")
    unknown = [c for c in contenders if c not in PORTS]
    if unknown:
        sys.exit(f"unknown contenders {unknown}: choose from {', '.join(PORTS)}")
    hz = os.sysconf("SC_CLK_TCK")
    procs = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu-split.") as tmp:
        configs(tmp)
        try:
            backend = subprocess.Popen(
                ["taskset", "-c", "1", "nginx", "-p", tmp, "-c", f"{tmp}/backend.conf",
                 "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(backend)
            wait_port(BACKENDS[0], backend, "backend nginx")
            for round_ in range(1, args.rounds + 1):
                for name in contenders:
                    proc = start(name, tmp, args.binary, procs)
                    wrk(PORTS[name], 1, args.close)  # warm-up: upstream connections, caches
                    before = cpu_ticks(proc.pid)
                    requests = wrk(PORTS[name], args.duration, args.close)
                    after = cpu_ticks(proc.pid)
                    user = (after[0] - before[0]) / hz * 1e6 / requests
                    system = (after[1] - before[1]) / hz * 1e6 / requests
                    rows.append((round_, name, requests, user, system))
                    print(f"round {round_} {name:18} {requests:>8} requests  user {user:5.2f}  "
                          f"kernel {system:5.2f}  total {user + system:5.2f} µs/request",
                          file=sys.stderr, flush=True)
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
    mode = "new connection per request" if args.close else "keep-alive"
    print(f"{mode}, 1 worker, wrk -t1 -c64, {args.duration} s per run, medians of {args.rounds}\n")
    print("| proxy | user µs/req | kernel µs/req | total µs/req |")
    print("|---|---:|---:|---:|")

    def median(values):
        return sorted(values)[len(values) // 2]

    for name in contenders:
        mine = [r for r in rows if r[1] == name]
        # Each column's own median: the total is the median of the rounds' totals, not a sum.
        user = median([r[3] for r in mine])
        system = median([r[4] for r in mine])
        total = median([r[3] + r[4] for r in mine])
        print(f"| {name} | {user:.2f} | {system:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
