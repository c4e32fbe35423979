#!/bin/sh
# Appends "N TIMESTAMP" to /shared/stamps.log every 2 s. N lives only in this shell's memory:
# after a migration the next line must be N+1, never 1.
n=0
while :; do
    n=$((n + 1))
    echo "$n $(date -u +%Y-%m-%dT%H:%M:%S.%NZ)" >> /shared/stamps.log
    sleep 2
done
