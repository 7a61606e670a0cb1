#!/usr/bin/env python3
"""Resident memory per idle keep-alive client connection: switchyard, nginx and HAProxy, each with
one worker in front of the same backend, each holding the same N idle client connections.

    benches/idle_memory.py [--connections 10000] [--settle 5] [--binary PATH]

Each proxy is started on 127.0.0.1, N connections are opened to it, each sends one GET and reads the
answer (at most 100 requests in flight, so every proxy keeps a similar small upstream pool), and the
connections are then left open and idle. The figure is (RSS with N idle connections - RSS with one)
/ N, summed over the proxy's processes (nginx master + worker). Loopback only; every process this
script starts is stopped by its PID; the whole run takes about a minute.
"""

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    """VmRSS of pid and its children, in KiB."""
    total = 0
    pids = [pid]
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


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


def get_once(sock, port):
    sock.sendall(f"GET /status/200 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("closed before the answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        body += sock.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(head.split(b"\r\n")[0].decode())


def still_open(sock):
    """Whether the proxy has kept the connection (a read would block rather than see EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def hold(port, n):
    """Opens n connections, one request each, and returns them open."""
    def one(_):
        s = socket.create_connection(("127.0.0.1", port))
        get_once(s, port)
        return s
    with ThreadPoolExecutor(max_workers=100) as pool:
        return list(pool.map(one, range(n)))


def measure(name, argv, port, n, tmp, settle):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{name}.log"), "w"),
                            start_new_session=True)
    try:
        wait_port(port, proc, name)
        warm = hold(port, 1)
        time.sleep(1)
        base = rss_kib(proc.pid)
        conns = hold(port, n)
        time.sleep(settle)
        full = rss_kib(proc.pid)
        alive = sum(1 for s in conns if still_open(s))
        for s in conns + warm:
            s.close()
        return base, full, alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--base-port", type=int, default=18300)
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between the last connection's answer and the measurement: switchyard "
                         "parks idle upstream connections after 1 s and mimalloc returns freed pages "
                         "1 s after that, nginx and HAProxy need none")
    ap.add_argument("--binary", default=os.path.join(REPO, "target/release/switchyard"),
                    help="the switchyard binary to measure")
    args = ap.parse_args()
    n = args.connections
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 4096
    if hard != resource.RLIM_INFINITY and hard < want:
        sys.exit(f"needs {want} open files; the hard limit is {hard} (raise it: ulimit -Hn {want})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    for tool in ("nginx", "haproxy"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool}: apt-get install -y nginx haproxy")
    binary = args.binary
    app = os.path.join(REPO, "target/release/examples/app_server")
    if not (os.path.exists(binary) and os.path.exists(app)):
        sys.exit("build first: cargo build --release --bins --examples")

    tmp = tempfile.mkdtemp(prefix="idle-memory-")
    backend_port, sy_port, nginx_port, haproxy_port = (args.base_port + i for i in range(4))
    backend = subprocess.Popen([app, "--listen", f"127.0.0.1:{backend_port}", "--name", "b"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(backend_port, backend, "backend")
        sy_conf = os.path.join(tmp, "proxy.toml")
        with open(sy_conf, "w") as f:
            f.write(f"""[runtime]
workers = 1
[[listeners]]
listen = "127.0.0.1:{sy_port}"
[[routes]]
pool = "app"
[pools.app]
strategy = "round_robin"
backends = [{{ address = "127.0.0.1:{backend_port}" }}]
[timeouts]
client_header = "300s"
idle = "300s"
[limits]
max_connections = {n + 1024}
""")
        nginx_conf = os.path.join(tmp, "nginx.conf")
        with open(nginx_conf, "w") as f:
            f.write(f"""worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
worker_rlimit_nofile {n + 4096};
events {{ worker_connections {2 * n + 1024}; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream b {{ server 127.0.0.1:{backend_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{nginx_port};
    keepalive_timeout 300s; keepalive_requests 1000000;
    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
        haproxy_conf = os.path.join(tmp, "haproxy.cfg")
        with open(haproxy_conf, "w") as f:
            f.write(f"""global
  maxconn {n + 256}
  nbthread 1
  # Idle client connections need no server side, so half the 2 x maxconn descriptors HAProxy
  # reserves is plenty; without this it refuses to start under a 20,000 descriptor limit.
  no strict-limits
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
frontend f
  bind 127.0.0.1:{haproxy_port}
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:{backend_port}
""")
        contenders = [
            ("switchyard", [binary, "--config", sy_conf], sy_port),
            ("nginx", ["nginx", "-c", nginx_conf, "-p", tmp, "-g", "daemon off;"], nginx_port),
            ("haproxy", ["haproxy", "-f", haproxy_conf, "-db"], haproxy_port),
        ]
        print(f"{n} idle keep-alive client connections, one worker each, 127.0.0.1\n")
        print("| proxy | RSS with 1 conn (MiB) | RSS with N (MiB) | KiB per idle connection | still open |")
        print("|---|---:|---:|---:|---:|")
        for name, argv, port in contenders:
            base, full, alive = measure(name, argv, port, n, tmp, args.settle)
            print(f"| {name} | {base / 1024:.1f} | {full / 1024:.1f} | {(full - base) / n:.2f} | {alive} |",
                  flush=True)
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
