#!/usr/bin/env bash
# Builds pgen_engine._C and installs the package in editable mode (what `make build` runs).
#
#   tools/build_extension.sh PYTHON LOG TIMEOUT_S
#
# The compiler's output goes to LOG. A build that fails, or runs past TIMEOUT_S seconds, prints
# the log's tail, the memory and the busiest processes, so a CI log shows which step stalled.
# A build killed by the timeout is tried once more (a normal build takes 1.5-3 min on 2 cores;
# one CI run was once killed silently inside this step and it has not been reproduced since);
# a compile error is not retried.
set -uo pipefail
py=$1 log=$2 limit=$3
diagnose() {
  echo "== last lines of $log:"; tail -n 60 "$log"
  free -m 2>/dev/null
  echo "== busiest processes:"; ps -eo pid,etime,pcpu,rss,args --sort=-pcpu | cut -c1-200 | head -n 12
}
avail=$(free -m 2>/dev/null | awk '/^Mem/{print $7 " MiB memory available"}')
for attempt in 1 2; do
  echo "== building pgen_engine._C at $(date -u +%H:%M:%S) UTC (attempt $attempt; MAX_JOBS=${MAX_JOBS:-unset}; ${avail:-memory unknown}; log: $log)"
  start=$(date +%s)
  timeout -k 30 "$limit" "$py" -m pip install -v --no-build-isolation --no-deps -e . > "$log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "== built pgen_engine._C in $(( $(date +%s) - start )) s"
    exit 0
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== build killed after $limit s (timeout)"; diagnose
    pkill -f "cc1plus.*pgen" 2>/dev/null || true
    continue
  fi
  echo "== build failed: exit $rc"; diagnose
  exit "$rc"
done
echo "== build timed out twice"
exit 124
