"""A real round-robin load balancer (Debian's ``nginx``) on loopback: the plain-vLLM baseline's
front in ``p2pkv bench serve`` (what a user without a cache-aware router would put in front
of several ``vllm serve`` instances).

nginx's default upstream policy is round robin; responses are relayed unbuffered (streamed
tokens reach the client as vLLM sends them). Like Prometheus, nginx cannot bind port 0: the
port comes from :func:`~p2pkv.harness.cluster.free_port`.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx

from p2pkv.harness.cluster import Instance, LocalCluster, free_port


def find_nginx() -> str | None:
    """The ``nginx`` binary (Debian: ``apt-get install nginx-light``), or None."""
    # /usr/sbin is not on every user's PATH
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                     else None)


def nginx_config(upstreams: list[str], port: int, prefix: str) -> str:
    servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in upstreams)
    # as root, nginx's worker would switch to nobody, who cannot write into our prefix
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 64m;
    upstream backends {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def start_round_robin(cluster: LocalCluster, upstreams: list[Instance], *,
                      binary: str | None = None, timeout_s: float = 30.0) -> Instance:
    """nginx balancing round robin over ``upstreams``; returns it as an Instance (its URL)."""
    binary = binary or find_nginx()
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    prefix = cluster.workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config([u.url for u in upstreams], port, str(prefix)))
    proc = cluster.start_process("nginx", [binary, "-p", str(prefix), "-c", str(conf)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"nginx exited:\n{proc.tail()}")
        try:
            httpx.get(url + "/health", timeout=2.0)
            return Instance("nginx", url, proc)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nginx not answering after {timeout_s:.0f} s:\n{proc.tail()}")
        time.sleep(0.1)
