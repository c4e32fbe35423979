#!/usr/bin/env python3
"""Test app: a hostile app of a `--user` container. It runs the counter, and a watcher in its
own process tree that, each time a new `criu` process appears, double-forks an orphan (a
process that leaves the app's tree while CRIU freezes it). The orphan tries to replace CRIU's
images with symlinks, through criu's cwd and open descriptors and any `criu` directory it can
find, and logs one line per attempt to /tmp/orphan.log:

    orphan PID ppid PPID criu CRIU_PID
    denied PATH: REASON
    swapped PATH

    gone PID

It exits 2 s after that criu has gone.
"""
import os
import time

LOG = "/tmp/orphan.log"
LOGGED = set()


def log(line):
    if line in LOGGED:
        return
    LOGGED.add(line)
    with open(LOG, "a") as f:
        f.write(line + "\n")


def criu_pids():
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip() == "criu":
                    found.add(int(name))
        except OSError:
            pass
    return found


def try_swap(directory):
    """Replaces the first image in `directory` with a symlink to /etc/passwd."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        log(f"denied {directory}: {e.strerror}")
        return
    for name in names:
        if name.endswith(".img"):
            path = os.path.join(directory, name)
            try:
                os.unlink(path)
                os.symlink("/etc/passwd", path)
                log(f"swapped {path}")
            except OSError as e:
                log(f"denied {path}: {e.strerror}")
            return
    log(f"denied {directory}: no image in it")


def orphan(criu):
    try:
        with open(f"/proc/{criu}/cmdline") as f:
            args = f.read().replace("\0", " ")[:60]
    except OSError as e:
        args = e.strerror
    log(f"orphan {os.getpid()} ppid {os.getppid()} criu {criu} ({args})")
    # It stays 2 s after that criu is gone, as one that means harm stays for good.
    until = None
    while until is None or time.monotonic() < until:
        if until is None and not os.path.exists(f"/proc/{criu}"):
            until = time.monotonic() + 2
        places = [f"/proc/{criu}/cwd"]
        try:
            places += [f"/proc/{criu}/fd/{fd}" for fd in os.listdir(f"/proc/{criu}/fd")]
        except OSError as e:
            log(f"denied /proc/{criu}/fd: {e.strerror}")
        for top in ("/run", "/tmp", "/var"):
            for root, dirs, _ in os.walk(top, onerror=lambda e: log(f"denied {e.filename}: {e.strerror}")):
                places += [os.path.join(root, d) for d in dirs if d == "criu"]
        for place in places:
            try_swap(place)
        time.sleep(0.005)


def watcher():
    seen = set()
    while True:
        for criu in criu_pids() - seen:
            seen.add(criu)
            if os.fork() == 0:
                if os.fork() == 0:
                    try:
                        orphan(criu)
                    finally:
                        log(f"gone {os.getpid()}")
                        os._exit(0)
                os._exit(0)
            os.wait()
        time.sleep(0.001)


if os.fork() == 0:
    try:
        watcher()
    finally:
        os._exit(0)
os.execvp("python3", ["python3", "-u", "/opt/apps/counter.py"])
