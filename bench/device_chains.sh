#!/usr/bin/env bash
# Run one chain of benchmark commands per GPU at once, on the device machine, and pack the results.
#
#   bash bench/device_chains.sh CHAIN_FILE [CHAIN_FILE ...]
#
# Chain file N (0-based) runs on GPU N, pinned to its share of the cores, one command per line
# (blank lines and lines starting with # are skipped), each under `timeout` if it starts with
# one. Commands see $R, the results folder ($OUT/r, or ./device_results off the device): write
# --out files there. Each chain logs to $R/chainN.log with the time before every command; a
# command's own output goes to $R/chainN_K.log. At the end everything under $R is packed into
# $OUT/results.tgz, because at most 8 files come back from a device call (docs/gpu.md): that
# archive is the one that counts.
#
# A chain can wait for another with `until [ -e /tmp/marker ]; do sleep 2; done` on a line of
# its own, after the other chain's `touch /tmp/marker`.
#
# CHAIN_DEADLINE (seconds, default 560) stops every chain still running at that time, so the
# archive is packed before the device call itself is cut at 600 s.
#
# SKIP (an extended regular expression) leaves out the commands it matches, logged as skipped.
# Ratios are taken within one hold, so a hold's later inference chains can skip the baseline
# they all begin with: SKIP='--modes b ' bash bench/device_chains.sh CHAIN_FILE.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/device_chains.sh CHAIN_FILE [CHAIN_FILE ...]" >&2; exit 2; }
OUT=${OUT:-$PWD/device_results}
export R=$OUT/r
mkdir -p "$R"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD} HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
cores=$(nproc)
per=$(( cores / $# ))
[ "$per" -ge 1 ] || per=1

run_chain() {  # index, file
  local n=$1 file=$2 k=0 line
  export CUDA_VISIBLE_DEVICES=$n RAY_TMPDIR=/tmp/ray_gpu$n
  while IFS= read -r line || [ -n "$line" ]; do
    [[ -z "${line// }" || "$line" =~ ^[[:space:]]*# ]] && continue
    k=$((k + 1))
    if [ -n "${SKIP:-}" ] && printf '%s\n' "$line" | grep -qE -- "$SKIP"; then
      echo "$(date -u +%T) [$k] skipped (SKIP): $line"
      continue
    fi
    echo "$(date -u +%T) [$k] $line"
    bash -c "$line" > "$R/chain${n}_$k.log" 2>&1
    local rc=$?
    echo "$(date -u +%T) [$k] exit $rc"
  done < "$file"
  echo "$(date -u +%T) chain $n done"
}

export -f run_chain
deadline=${CHAIN_DEADLINE:-560}
n=0
for file in "$@"; do
  first=$(( n * per )); last=$(( first + per - 1 ))
  (
    taskset -cp "$first-$last" $BASHPID > /dev/null 2>&1
    # timeout signals the chain's whole process group: the running command goes too
    timeout -k 5 "$deadline" bash -c 'run_chain "$0" "$1"' "$n" "$file" > "$R/chain$n.log" 2>&1
    [ $? -eq 124 ] && echo "$(date -u +%T) chain $n stopped at CHAIN_DEADLINE=${deadline}s" >> "$R/chain$n.log"
  ) &
  n=$((n + 1))
done
wait
tar czf "$OUT/results.tgz" -C "$OUT" r
cat "$R"/chain[0-9].log
grep -h '^RESULT\|samples_per_s' "$R"/chain*_*.log 2>/dev/null | cut -c1-400 || true
