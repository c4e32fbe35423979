#!/usr/bin/env python3
"""Benchmark app: holds N MiB of random (incompressible: the worst case for the archive's
compression) data in memory, says `ready`, then sleeps without further output."""
import os
import sys
import time

blocks = [os.urandom(1 << 20) for _ in range(int(sys.argv[1]))]
print("ready", flush=True)
while True:
    time.sleep(1)
