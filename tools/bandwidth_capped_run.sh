#!/usr/bin/env bash
# Two emulated sites on one machine, joined by a bandwidth-capped link (issue: Streaming DiLoCo, item 5).
#
# Each site is a Linux network namespace holding 2 ranks (one local-SGD worker); the namespaces are joined
# by a veth pair whose both ends are shaped with the tbf qdisc (netem is not available on these machines).
# Traffic inside a site stays on that namespace's own addresses; only what crosses workers uses the link.
# For every method and rate it reports wall time per iteration (median of the logged intervals) and the
# bytes that crossed the link (tx counters of both veth ends).
#
# Needs root (ip netns, tc). Not part of CI. Addresses are private ones on our own namespaces only.
# Usage: sudo bash tools/bandwidth_capped_run.sh [--rates "100mbit 1gbit none"] [--iters 40] [--python PY]
#            [--methods "sync-dp diloco edit streaming-fp4"] [--output-dir runs/bandwidth]
set -euo pipefail
cd "$(dirname "$0")/.."
RATES="100mbit 1gbit none"
METHODS="sync-dp diloco edit streaming-fp4"
ITERS=40
PY=${PYTHON:-python}
OUT=runs/bandwidth
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) RATES="$2"; shift 2 ;;
        --methods) METHODS="$2"; shift 2 ;;
        --iters) ITERS="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --output-dir) OUT="$2"; shift 2 ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "error: needs root (network namespaces and tc)" >&2; exit 2; }
mkdir -p "$OUT"
NS0=medit-site0; NS1=medit-site1; V0=medit-v0; V1=medit-v1; IP0=10.77.0.1; IP1=10.77.0.2

cleanup() {
    ip netns del "$NS0" 2>/dev/null || true
    ip netns del "$NS1" 2>/dev/null || true
}
trap cleanup EXIT

setup_link() {  # $1 = rate or "none"
    cleanup
    ip netns add "$NS0"; ip netns add "$NS1"
    ip link add "$V0" type veth peer name "$V1"
    ip link set "$V0" netns "$NS0"; ip link set "$V1" netns "$NS1"
    ip -n "$NS0" addr add "$IP0/24" dev "$V0"; ip -n "$NS1" addr add "$IP1/24" dev "$V1"
    for ns in "$NS0" "$NS1"; do ip -n "$ns" link set lo up; done
    ip -n "$NS0" link set "$V0" up; ip -n "$NS1" link set "$V1" up
    if [ "$1" != none ]; then
        ip netns exec "$NS0" tc qdisc add dev "$V0" root tbf rate "$1" burst 256kb latency 100ms
        ip netns exec "$NS1" tc qdisc add dev "$V1" root tbf rate "$1" burst 256kb latency 100ms
    fi
}

link_bytes() {
    echo $(( $(ip netns exec "$NS0" cat /sys/class/net/$V0/statistics/tx_bytes) + \
             $(ip netns exec "$NS1" cat /sys/class/net/$V1/statistics/tx_bytes) ))
}

MODEL=(--mock-data --tokenizer-type NullTokenizer --vocab-size 1024 --num-layers 6 --hidden-size 256
       --num-attention-heads 8 --seq-length 128 --micro-batch-size 2 --global-batch-size 16
       --train-iters "$ITERS" --lr 1e-3 --log-interval 5 --eval-interval 100000 --eval-iters 0
       --disable-bias-linear --hidden-dropout 0 --attention-dropout 0
       --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --ddp-bucket-size 400000)
declare -A METHOD
METHOD[sync-dp]=""
METHOD[diloco]="--local-sgd diloco --local-sgd-workers 2 --local-sgd-sync-interval 8"
METHOD[edit]="--local-sgd edit --local-sgd-workers 2 --local-sgd-sync-interval 8"
METHOD[streaming-fp4]="--local-sgd streaming --local-sgd-workers 2 --local-sgd-sync-interval 8 --streaming-fragments 3 --streaming-overlap-steps 1 --outer-grad-dtype fp4-e3m0"

run_site() {  # $1 = site index, $2 = log, rest = flags
    local site=$1 log=$2; shift 2
    local ns=$NS0 ifname=$V0
    [ "$site" = 1 ] && { ns=$NS1; ifname=$V1; }
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifname" OMP_NUM_THREADS=1 \
        "$PY" -m torch.distributed.run --nnodes 2 --node-rank "$site" --nproc-per-node 2 \
        --master-addr "$IP0" --master-port 29617 examples/pretrain_gpt.py "${MODEL[@]}" "$@" > "$log" 2>&1
}

TABLE="$OUT/bandwidth.md"
echo "| method | link | median ms / iteration | bytes on the link | link bytes / iteration |" > "$TABLE"
echo "|---|---|---|---|---|" >> "$TABLE"
for method in $METHODS; do
    for rate in $RATES; do
        setup_link "$rate"
        before=$(link_bytes)
        log0="$OUT/$method-$rate-site0.log"; log1="$OUT/$method-$rate-site1.log"
        # shellcheck disable=SC2086
        run_site 0 "$log0" ${METHOD[$method]} & pid0=$!
        # shellcheck disable=SC2086
        run_site 1 "$log1" ${METHOD[$method]} & pid1=$!
        wait "$pid0" "$pid1"
        bytes=$(( $(link_bytes) - before ))
        ms=$(grep -o "elapsed time per iteration (ms): [0-9.]*" "$log1" | awk '{print $NF}' | tail -n +2 | sort -n |
             awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "n/a"}')
        echo "| $method | $rate | $ms | $bytes | $(( bytes / ITERS )) |" | tee -a "$TABLE"
    done
done
echo "table: $TABLE"
