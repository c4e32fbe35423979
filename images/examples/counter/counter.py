#!/usr/bin/env python3
"""Analytics counter: the example app for live migration.

Keeps its state only in memory -- an event count and a revenue total -- and prints both every
tick. If a migration lost its memory, the numbers would start again from zero; if it worked,
they carry on. SIGTERM is left at its default action, so a stopped counter exits 143 through
the launcher.

Environment: COUNTER_INTERVAL (seconds between ticks, default 1); COUNTER_BALLAST_MB (default
0): that many MiB of random bytes held in memory, for big checkpoints. With ballast, each tick
also prints a checksum sampled across it, which must not change across a migration.
COUNTER_HTTP_PORT (default: none): also serve HTTP on that port, as most apps do for their
liveness probe: `GET /healthz` answers 200 with the count; `GET /stop-serving` closes the
server (the count goes on), so that the probe fails from then on.
"""

import binascii
import os
import socket
import sys
import threading
import time

PRICES_CENTS = (199, 1250, 75, 499, 2999)  # a fixed cycle, so every run is reproducible


class State:
    events = 0


def serve(port: int) -> None:
    """Answers the liveness probe from a thread beside the counting loop (plain sockets: the
    image's python3-minimal has no http package)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", port))
    listener.listen(16)

    def run() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(2)
                try:
                    request = conn.recv(1024).decode(errors="replace")
                    body = f"events={State.events}\n".encode()
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                    )
                except OSError:
                    continue
            if request.startswith("GET /stop-serving"):
                listener.close()
                return

    threading.Thread(target=run, daemon=True).start()


def main() -> None:
    interval = float(os.environ.get("COUNTER_INTERVAL", "1"))
    if os.environ.get("COUNTER_HTTP_PORT"):
        serve(int(os.environ["COUNTER_HTTP_PORT"]))
    ballast = os.urandom(int(os.environ.get("COUNTER_BALLAST_MB", "0")) * 1024 * 1024)
    events = 0
    revenue_cents = 0
    started = time.time()
    while True:
        events += 1
        State.events = events
        revenue_cents += PRICES_CENTS[events % len(PRICES_CENTS)]
        print(
            f"events={events} revenue={revenue_cents // 100}.{revenue_cents % 100:02d} "
            f"pid={os.getpid()} uptime={time.time() - started:.1f}s"
            + (f" ballast={binascii.crc32(ballast[::4096]):08x}" if ballast else ""),
            flush=True,
        )
        time.sleep(interval)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        sys.exit(1)
