#!/usr/bin/env python3
"""fanout_aiohttp.py - the Python asyncio peer of the fanout benchmark (tests/bench/run.sh).

    fanout_aiohttp.py BACKEND_URL PORT [--max-seconds S] [--pool N]

Serves GET /bench/fanout on 127.0.0.1:PORT. Each request calls three
backend endpoints concurrently with asyncio.gather over one shared
aiohttp.ClientSession (a keep-alive connection pool of at most --pool
connections), parses each JSON answer and merges them into
{"user": ..., "orders": ..., "recs": ...}. A backend answer that is not 200
makes the whole request 502. GET /health answers 200 {"ok": true}.

It is what an asyncio developer would write, with no tuning beyond the pool
size: one process, one event loop, the default asyncio loop, no access log.
It stops on SIGTERM / SIGINT, and by itself after --max-seconds (so it
cannot outlive the benchmark). Needs aiohttp (Debian: python3-aiohttp).
"""

import argparse
import asyncio
import os
import signal
import sys

from aiohttp import ClientError, ClientSession, TCPConnector, web

CALLS = (("user", "/users/1"), ("orders", "/orders?user=1"), ("recs", "/recommendations"))


class BackendError(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description="aiohttp fan-out aggregator")
    ap.add_argument("backend", help="http://127.0.0.1:PORT of the backends")
    ap.add_argument("port", type=int)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--pool", type=int, default=1024, help="connections to the backend (aiohttp's limit)")
    a = ap.parse_args()
    if not a.backend.startswith("http://127.") or not 0 < a.max_seconds <= 86400:
        ap.error("backend must be a loopback http:// URL; --max-seconds 0..86400")
    base = a.backend.rstrip("/")

    async def get(session, path):
        async with session.get(base + path) as r:
            if r.status != 200:
                raise BackendError(path)
            return await r.json()

    async def fanout(request):
        session = request.app["session"]
        try:
            results = await asyncio.gather(*(get(session, path) for _, path in CALLS))
        except (BackendError, ClientError, OSError, asyncio.TimeoutError, ValueError):
            return web.json_response({"error": {"code": "backend_failed"}}, status=502)
        return web.json_response({name: res for (name, _), res in zip(CALLS, results)})

    async def health(_request):
        return web.json_response({"ok": True})

    async def on_startup(app):
        app["session"] = ClientSession(connector=TCPConnector(limit=a.pool, keepalive_timeout=60))
        # bounded lifetime: behave as if SIGTERM came
        asyncio.get_running_loop().call_later(a.max_seconds, os.kill, os.getpid(), signal.SIGTERM)

    async def on_cleanup(app):
        await app["session"].close()

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/bench/fanout", fanout)
    app.router.add_get("/health", health)
    print("fanout_aiohttp: 127.0.0.1:%d -> %s" % (a.port, base), flush=True)
    web.run_app(app, host="127.0.0.1", port=a.port, access_log=None, print=None,
                shutdown_timeout=1.0, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
