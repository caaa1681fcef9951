#!/usr/bin/env bash
# Several hosts on this machine, by hand: network namespaces on a bridge, each with its own
# address, host name and /etc/hosts, and faults on the wire. The tests use the same recipe
# from Rust (tests/common/hosts.rs); ../shared/notes/multi-host-testing.md measured it.
# Needs root, iproute2; nftables for `loss`.
#
#   scripts/hosts.sh up 2                 # host0, host1 on 10.250.0.0/24 (COCA_HOSTS_SUBNET)
#   scripts/hosts.sh exec 1 hostname      # a command on host 1 (its names, its network)
#   scripts/hosts.sh unplug 1 | replug 1  # pull host 1's cable, put it back
#   scripts/hosts.sh loss 1 5             # drop 5 % of host 1's packets each way
#   scripts/hosts.sh limit 1 100          # 100 Mbit/s each way on host 1's link
#   scripts/hosts.sh heal 1               # no loss, no limit on host 1
#   scripts/hosts.sh list | down          # what exists / remove everything
#   scripts/hosts.sh run 2 -- CMD ...     # up, CMD (with HOSTS_N, HOST0_ADDR, ...), then down,
#                                         # also when CMD fails or is interrupted
#
# A coca job across two hosts:
#   export COCA_RDZV_TOKEN=$(openssl rand -hex 32)
#   scripts/hosts.sh exec 0 target/release/coca-launch --nnodes 2 --node-rank 0 \
#       --master-addr host0 --nproc-per-node 2 -- pretrain ... &
#   scripts/hosts.sh exec 1 target/release/coca-launch --nnodes 2 --node-rank 1 \
#       --master-addr host0 --nproc-per-node 2 -- pretrain ...
#
# COCA_HOSTS_ID names a set (default `1`), so several sets can exist at once.
set -euo pipefail

ID=${COCA_HOSTS_ID:-1}
SUBNET=${COCA_HOSTS_SUBNET:-10.250.0}
BRIDGE="cbm$ID"
NFT_TABLE=coca_loss

die() { echo "hosts.sh: $*" >&2; exit 2; }
ns() { echo "cocam-$ID-h$1"; }
veth() { echo "cvm${ID}h$1"; }
addr() { echo "$SUBNET.$((10 + $1))"; }
count() { ip netns list | awk '{print $1}' | grep -c "^cocam-$ID-h" || true; }
need_host() {
  [[ $1 =~ ^[0-9]+$ ]] || die "host index must be a number, got '$1'"
  ip netns list | awk '{print $1}' | grep -qx "$(ns "$1")" || die "no host $1 (run: $0 up N)"
}

up() {
  local n=$1 i
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 200 ]] || die "up N: N must be 1..200, got '$n'"
  [[ $(id -u) == 0 ]] || die "network namespaces need root"
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "set $ID exists (down first, or COCA_HOSTS_ID=...)"
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((i = 0; i < n; i++)); do
    ip netns add "$(ns $i)"
    ip link add "$(veth $i)" type veth peer name eth0 netns "$(ns $i)"
    ip link set "$(veth $i)" master "$BRIDGE" up
    ip -n "$(ns $i)" addr add "$(addr $i)/24" dev eth0
    ip -n "$(ns $i)" link set eth0 up
    ip -n "$(ns $i)" link set lo up
    mkdir -p "/etc/netns/$(ns $i)"
    {
      printf '127.0.0.1\tlocalhost\n127.0.1.1\thost%s\n' "$i"
      for ((j = 0; j < n; j++)); do printf '%s\thost%s\n' "$(addr $j)" "$j"; done
    } >"/etc/netns/$(ns $i)/hosts"
    echo "host$i" >"/etc/netns/$(ns $i)/hostname"
    echo "host$i $(addr $i) (namespace $(ns $i))"
  done
}

down() {
  local name pid
  for name in $(ip netns list | awk '{print $1}' | grep "^cocam-$ID-h" || true); do
    for pid in $(ip netns pids "$name"); do kill -9 "$pid" 2>/dev/null || true; done
    # The veth pair goes at once; a namespace's own cleanup is asynchronous in the kernel.
    ip link del "$(veth "${name##*-h}")" 2>/dev/null || true
    ip netns del "$name"
    rm -rf "/etc/netns/$name"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

in_host() {
  local i=$1
  shift
  ip netns exec "$(ns "$i")" unshare --uts sh -c 'hostname "$0" && exec "$@"' "host$i" "$@"
}

loss() {
  local i=$1 pct=$2 j from
  [[ $pct =~ ^[0-9]+$ && $pct -le 100 ]] || die "loss: percent must be 0..100, got '$pct'"
  command -v nft >/dev/null || die "loss needs nftables (apt-get install nftables)"
  for ((j = 0; j < $(count); j++)); do
    if ((j == i)); then from="$SUBNET.0/24"; else from=$(addr "$i"); fi
    ip netns exec "$(ns $j)" nft add table inet $NFT_TABLE
    ip netns exec "$(ns $j)" nft add chain inet $NFT_TABLE in '{ type filter hook input priority 0; }'
    ip netns exec "$(ns $j)" nft add rule inet $NFT_TABLE in ip saddr "$from" numgen random mod 100 '<' "$pct" drop
  done
}

limit() {
  local i=$1 mbit=$2
  [[ $mbit =~ ^[0-9]+$ && $mbit -ge 1 ]] || die "limit: Mbit/s must be a positive number"
  tc qdisc add dev "$(veth "$i")" root tbf rate "${mbit}mbit" burst 32kbit latency 400ms
  ip netns exec "$(ns "$i")" tc qdisc add dev eth0 root tbf rate "${mbit}mbit" burst 32kbit latency 400ms
}

heal() {
  local i=$1 j
  tc qdisc del dev "$(veth "$i")" root 2>/dev/null || true
  ip netns exec "$(ns "$i")" tc qdisc del dev eth0 root 2>/dev/null || true
  for ((j = 0; j < $(count); j++)); do
    ip netns exec "$(ns $j)" nft delete table inet $NFT_TABLE 2>/dev/null || true
  done
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "${1:?up N}" ;;
  down) down ;;
  list) ip netns list | grep "^cocam-$ID-h" || echo "no hosts in set $ID" ;;
  exec) need_host "${1:?exec I CMD...}"; in_host "$@" ;;
  unplug) need_host "${1:?unplug I}"; ip link set "$(veth "$1")" down ;;
  replug) need_host "${1:?replug I}"; ip link set "$(veth "$1")" up ;;
  loss) need_host "${1:?loss I PERCENT}"; loss "$1" "${2:?loss I PERCENT}" ;;
  limit) need_host "${1:?limit I MBIT}"; limit "$1" "${2:?limit I MBIT}" ;;
  heal) need_host "${1:?heal I}"; heal "$1" ;;
  run)
    n=${1:?run N -- CMD...}
    shift
    [[ ${1:-} == -- ]] && shift
    [[ $# -gt 0 ]] || die "run N -- CMD: no command"
    trap down EXIT INT TERM
    up "$n"
    export HOSTS_N=$n
    for ((i = 0; i < n; i++)); do export "HOST${i}_ADDR=$(addr $i)"; done
    "$@"
    ;;
  *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac
