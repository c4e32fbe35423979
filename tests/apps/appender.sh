#!/bin/sh
# Test app: keeps a counter in memory and appends "line N" to /data/log every 0.1 s through a
# file descriptor it holds open (so CRIU must restore an open file in an included path), and
# prints N to stdout.
mkdir -p /data
exec 3>>/data/log
i=0
while :; do
  i=$((i + 1))
  echo "line $i" >&3
  echo "$i"
  sleep 0.1
done
