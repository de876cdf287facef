#!/bin/sh
# Forms, joins or repairs Herald's Redis Cluster (compose.cluster.yaml runs it
# as redis-cluster-init on every `up`, once every node answers). Idempotent, and
# it never deletes data:
#
# - every node empty (no other node known, no slot, no key): a new cluster,
#   `redis-cli --cluster create ... --cluster-replicas 1`;
# - otherwise it repairs: every node that holds cluster state meets every other
#   one at the address its name resolves to now (CLUSTER MEET: a node already
#   known under an old address gets its address updated, nothing else changes);
#   a node that comes back empty (a new volume, its data lost) joins as a
#   replica of the master with the fewest replicas; if it was a master, its
#   replica first takes over its slots (CLUSTER FAILOVER TAKEOVER: that replica
#   holds the only copy left); the lost node's old entry is forgotten;
# - then it waits until every node says cluster_state:ok and sees every other
#   node connected at its current address, or fails after INIT_TIMEOUT_SECONDS.
#
# CLUSTER MEET takes addresses, not names, so names are resolved here; clients
# get the names (the nodes announce them, hostname endpoints).
#   NODES                 the nodes' names (default: redis redis-2 ... redis-6)
#   REDIS_PORT            their port (default 6379; the bus is port + 10000)
#   CLUSTER_REPLICAS      replicas per master for a new cluster (default 1)
#   INIT_TIMEOUT_SECONDS  (default 60)
set -eu

NODES=${NODES:-redis redis-2 redis-3 redis-4 redis-5 redis-6}
REDIS_PORT=${REDIS_PORT:-6379}
CLUSTER_REPLICAS=${CLUSTER_REPLICAS:-1}
INIT_TIMEOUT_SECONDS=${INIT_TIMEOUT_SECONDS:-60}
START=$(date +%s)

log() { echo "cluster-init: $*" >&2; }
fail() { log "$*"; exit 1; }
left() { echo $((INIT_TIMEOUT_SECONDS - ($(date +%s) - START))); }
cli() { host=$1; shift; redis-cli -h "$host" -p "$REDIS_PORT" "$@"; }
info_field() {  # $1 = node, $2 = field of CLUSTER INFO
  cli "$1" cluster info 2>/dev/null | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'
}
resolve() { getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'; }

# Every node's current address (they are all up: compose waits for them to be healthy).
ADDRESSES=""
for node in $NODES; do
  while ! ip=$(resolve "$node") || [ -z "$ip" ] || ! cli "$node" ping 2>/dev/null | grep -q PONG; do
    [ "$(left)" -gt 0 ] || fail "$node does not answer"
    sleep 0.5
  done
  ADDRESSES="$ADDRESSES $node=$ip"
done
address_of() { for pair in $ADDRESSES; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done; }

is_empty() {  # knows no other node, serves no slot, holds no key
  [ "$(info_field "$1" cluster_known_nodes)" = 1 ] &&
    [ "$(info_field "$1" cluster_slots_assigned)" = 0 ] &&
    [ "$(cli "$1" dbsize 2>/dev/null | tr -d '\r')" = 0 ]
}

healthy() {  # every node: state ok, and every other node's current address connected
  for node in $NODES; do
    [ "$(info_field "$node" cluster_state)" = ok ] || return 1
    view=$(cli "$node" cluster nodes 2>/dev/null) || return 1
    for peer in $NODES; do
      [ "$peer" = "$node" ] && continue
      echo "$view" | awk -v a="$(address_of "$peer"):$REDIS_PORT@" \
        'index($2, a) == 1 && $3 !~ /fail|handshake|noaddr/ && $8 == "connected" { found = 1 } END { exit !found }' ||
        return 1
    done
  done
}

wait_healthy() {
  while ! healthy; do
    [ "$(left)" -gt 0 ] || {
      for node in $NODES; do log "$node: $(info_field "$node" cluster_state)"; cli "$node" cluster nodes >&2 || true; done
      fail "the cluster did not become ok in ${INIT_TIMEOUT_SECONDS} s"
    }
    sleep 0.5
  done
}

empty=""
formed=""
for node in $NODES; do
  if is_empty "$node"; then empty="$empty $node"; else formed="$formed $node"; fi
done

if [ -z "$formed" ]; then
  log "every node is empty: creating the cluster"
  set --
  for node in $NODES; do set -- "$@" "$(address_of "$node"):$REDIS_PORT"; done
  redis-cli --cluster create "$@" --cluster-replicas "$CLUSTER_REPLICAS" --cluster-yes
  wait_healthy
  log "the cluster is formed"
  exit 0
fi

if [ -z "$empty" ] && healthy; then
  log "the cluster is formed and every node sees every other one"
  exit 0
fi

# Repair: every node meets every other one at its current address. A node it
# knows under an old address gets its address updated; nothing else changes.
for node in $formed; do
  for peer in $formed; do
    [ "$peer" = "$node" ] && continue
    cli "$node" cluster meet "$(address_of "$peer")" "$REDIS_PORT" "$((REDIS_PORT + 10000))" >/dev/null ||
      log "$node could not meet $peer"
  done
done
log "told every node the current addresses of$formed"

seed=${formed# }
seed=${seed%% *}
# The master (id) with the fewest live replicas, as $seed sees the cluster.
fewest_replicas() {
  cli "$seed" cluster nodes | awk '
    $3 ~ /master/ && $3 !~ /fail|noaddr|handshake/ && $9 != "" { count[$1] = 0 }
    $3 ~ /slave/ && $3 !~ /fail|noaddr|handshake/ { replicas[$4]++ }
    END {
      best = ""
      for (id in count) if (best == "" || replicas[id] + 0 < replicas[best] + 0) best = id
      print best
    }'
}

# A node whose volume was lost comes back empty, under a new id; if it was a
# master, its slots are still assigned to its old id, which no live node has.
# Its replica, the only copy of that data left, takes over (a replica that has
# not heard from its master for long refuses to fail over by itself).
take_over_from_lost() {  # $1 = name of an empty node
  current=$(cli "$1" cluster myid | tr -d '\r')
  cli "$seed" cluster nodes | awk -v name="$1" -v current="$current" '
    { split($2, part, ",") } part[2] == name && $1 != current && $9 != "" { print $1 }' |
    while read -r lost; do
      replica=$(cli "$seed" cluster nodes | awk -v lost="$lost" '$3 ~ /slave/ && $3 !~ /fail|noaddr/ && $4 == lost { split($2, part, ","); print part[2]; exit }')
      if [ -z "$replica" ]; then
        log "the slots of $lost (formerly $1) have no replica left: they stay unserved"
        continue
      fi
      log "$1 lost its data: its replica $replica takes over its slots"
      cli "$replica" cluster failover takeover >/dev/null
      until cli "$replica" role | head -n1 | grep -q master; do
        [ "$(left)" -gt 0 ] || fail "$replica did not take over"
        sleep 0.5
      done
    done
}

# Empty nodes (new, or their volume lost) join as replicas of the masters with
# the fewest replicas.
for node in $empty; do
  take_over_from_lost "$node"
  master=$(fewest_replicas)
  [ -n "$master" ] || fail "no master to give $node to"
  log "$node is empty: joining it as a replica of $master"
  cli "$node" cluster meet "$(address_of "$seed")" "$REDIS_PORT" "$((REDIS_PORT + 10000))" >/dev/null
  until cli "$node" cluster replicate "$master" 2>/dev/null | grep -q OK; do
    [ "$(left)" -gt 0 ] || fail "$node could not become a replica of $master"
    sleep 0.5
  done
done

wait_healthy

# Entries left by nodes whose volume was lost: another id under the name of a
# live node, serving no slot. Every node forgets them (a slot still on one is
# only reported: forgetting it would lose those slots).
for name in $NODES; do
  current=$(cli "$name" cluster myid | tr -d '\r')
  cli "$seed" cluster nodes | awk -v name="$name" -v current="$current" '
    { split($2, part, ",") } part[2] == name && $1 != current { print $1, ($9 == "" ? "free" : "slots") }' |
    while read -r ghost has; do
      if [ "$has" = slots ]; then
        log "$ghost (formerly $name) still serves slots: left as it is"
        continue
      fi
      log "forgetting $ghost, formerly $name"
      for node in $NODES; do cli "$node" cluster forget "$ghost" >/dev/null 2>&1 || true; done
    done
done
log "the cluster is ok"
