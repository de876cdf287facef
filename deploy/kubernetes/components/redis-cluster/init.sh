#!/bin/sh
# The Job redis-cluster-init (components/redis-cluster), run on every
# `kubectl apply -k`; idempotent:
# - every node empty (a new install): form the cluster, 3 masters + 3 replicas;
# - otherwise: meet every node that belongs to the cluster at its current
#   address (repairs a cluster whose pods all came back with new IPs), and add
#   every empty node (a node that lost its volume) as a replica;
# then wait until every node says cluster_state:ok.
set -eu
SERVICE=redis-cluster
NODES=${REDIS_CLUSTER_NODES:-6}

info() { redis-cli -h "$1" cluster info 2>/dev/null | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'; }

ips=""
members=""
empty=""
i=0
while [ "$i" -lt "$NODES" ]; do
  host="$SERVICE-$i.$SERVICE"
  n=0
  until redis-cli -h "$host" ping 2>/dev/null | grep -q PONG; do
    n=$((n + 1))
    [ "$n" -lt 150 ] || { echo "redis-cluster-init: $host does not answer" >&2; exit 1; }
    sleep 2
  done
  ip=$(getent hosts "$host" | awk '{ print $1; exit }')
  ips="$ips $ip:6379"
  keys=$(redis-cli -h "$ip" dbsize | tr -d '\r')
  if [ "$(info "$ip" cluster_known_nodes)" -gt 1 ] || [ "$keys" -gt 0 ]; then
    members="$members $ip"
  else
    empty="$empty $ip"
  fi
  i=$((i + 1))
done

if [ -z "$members" ]; then
  echo "redis-cluster-init: every node is empty: forming the cluster" >&2
  # shellcheck disable=SC2086
  redis-cli --cluster create $ips --cluster-replicas 1 --cluster-yes
else
  seed=${members# }; seed=${seed%% *}
  for ip in $members; do
    redis-cli -h "$seed" cluster meet "$ip" 6379 >/dev/null
  done
  for ip in $empty; do
    echo "redis-cluster-init: adding the empty node $ip as a replica" >&2
    redis-cli --cluster add-node "$ip:6379" "$seed:6379" --cluster-slave
  done
fi

n=0
for ip in $ips; do
  until [ "$(info "${ip%:*}" cluster_state)" = ok ]; do
    n=$((n + 1))
    [ "$n" -lt 240 ] || { echo "redis-cluster-init: the cluster did not become ok" >&2; exit 1; }
    sleep 1
  done
done
echo "redis-cluster-init: the cluster is ok" >&2
