#!/bin/sh
# The demo workload: says hello, then a heartbeat every second until it is stopped.
echo "hello from the workload (pid $$, token granted: ${EE_TOKEN:+yes})"
trap 'echo "got SIGTERM, bye"; exit 0' TERM
n=0
while :; do
    n=$((n + 1))
    echo "heartbeat $n"
    sleep 1 &
    wait $!
done
