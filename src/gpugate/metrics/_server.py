"""The Prometheus endpoint: inside a worker, or standalone (``gpugate metrics``).

A worker calls :func:`start_metrics_server` once; it serves its own
instruments (decisions, latencies, lease outcomes; prometheus_client's default
registry) on a daemon thread. Pool state (GPU memory, leases, waiters,
tokens, overrides) is the same for every worker of a pool, so it is exported
by one process only: ``gpugate metrics``, or the one worker started with
``pool_of=gate``.
"""

from __future__ import annotations

import socket
import threading
import weakref
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector

from .._exceptions import UsageError
from ._collector import PoolCollector

if TYPE_CHECKING:
    from ..admission import Gate

__all__ = ["MetricsServer", "start_metrics_server"]

DEFAULT_PORT = 9470


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


# The pools each registry exports (start_metrics_server's pool_of), until closed.
_exported: weakref.WeakKeyDictionary[CollectorRegistry, set[str]] = weakref.WeakKeyDictionary()
_exported_lock = threading.Lock()

# Wildcard bind addresses and the loopback address that reaches each.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class MetricsServer:
    """A running endpoint: ``url``, ``port``; :meth:`close` stops it (and takes
    the pool collector it was started with off its registry)."""

    _collector: Collector | None = None
    _pool: str = ""

    def __init__(self, registry: CollectorRegistry, addr: str, port: int) -> None:
        server_class = _Server6 if ":" in addr else _Server
        self._httpd = make_server(
            addr, port, make_wsgi_app(registry), server_class, handler_class=_Quiet
        )
        self.addr = addr
        self.port: int = self._httpd.server_port
        self.registry = registry
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="gpugate-metrics", daemon=True
        )
        self._thread.start()

    @property
    def every_interface(self) -> bool:
        """Whether it listens on every interface (``0.0.0.0``, ``::`` or ``""``)."""
        return self.addr in _WILDCARDS

    @property
    def url(self) -> str:
        """A URL that reaches it from this host: on the address it listens on,
        or on the loopback address when it listens on every interface (a
        wildcard address is not one a client can connect to)."""
        addr = _WILDCARDS.get(self.addr, self.addr)
        host = f"[{addr}]" if ":" in addr else addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        collector, self._collector = self._collector, None
        if collector is not None:
            self.registry.unregister(collector)
            with _exported_lock:
                _exported.get(self.registry, set()).discard(self._pool)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int = DEFAULT_PORT,
    *,
    addr: str = "0.0.0.0",
    registry: CollectorRegistry | None = None,
    pool_of: Gate | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; port 0 picks a free one.

    ``registry`` defaults to prometheus_client's default one, which holds
    every gate's instruments (unless a gate was given its own ``metrics``).
    With ``pool_of=gate`` the pool's state in Redis is exported too, read
    at each scrape through that gate's client: do that in one process per
    pool, not in every worker (a second exporter of the same pool on the same
    registry is a :class:`~gpugate.UsageError` while the first runs). Raises
    :class:`OSError` when the port is taken.
    """
    registry = REGISTRY if registry is None else registry
    if pool_of is None:
        return MetricsServer(registry, addr, port)
    with _exported_lock:
        pools = _exported.setdefault(registry, set())
        if pool_of.pool in pools:
            # prometheus_client would take it, and serve every series twice.
            raise UsageError(
                f"pool {pool_of.pool!r} is exported on this registry already; "
                "close that MetricsServer first"
            )
        server = MetricsServer(registry, addr, port)
        collector = PoolCollector(pool_of.client, pool_of.pool, redis_url=pool_of.redis_url)
        registry.register(collector)
        server._collector, server._pool = collector, pool_of.pool
        pools.add(pool_of.pool)
    return server
