#!/bin/sh
# One node of Herald's Redis Cluster (components/redis-cluster). Runs
# redis-server as the container's main process and, beside it, a loop that
# meets the other nodes again at their current addresses: nodes.conf keeps the
# IPs of the last run, and pods come back with new ones (after a restart of
# every node, nobody could find anybody). Only a node that belongs to a cluster
# does it, and only towards peers that belong to one too: an empty node is
# joined by the Job redis-cluster-init, never here.
set -eu
: "${POD_NAME:?}" "${POD_NAMESPACE:?}" "${POD_IP:?}"
SERVICE=redis-cluster
NODES=${REDIS_CLUSTER_NODES:-6}

info() { redis-cli -h "$1" cluster info 2>/dev/null | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'; }

repair() {
  sleep 5
  while :; do
    known=$(info 127.0.0.1 cluster_known_nodes)
    if [ "${known:-1}" -gt 1 ]; then
      i=0
      while [ "$i" -lt "$NODES" ]; do
        ip=$(getent hosts "$SERVICE-$i.$SERVICE" | awk '{ print $1; exit }')
        if [ -n "$ip" ] && [ "$ip" != "$POD_IP" ] \
          && ! redis-cli cluster nodes | grep -q " $ip:6379@" \
          && [ "$(info "$ip" cluster_known_nodes)" -gt 1 ] 2>/dev/null; then
          echo "redis-cluster: meeting $SERVICE-$i at $ip" >&2
          redis-cli cluster meet "$ip" 6379 >/dev/null || true
        fi
        i=$((i + 1))
      done
    fi
    sleep 10
  done
}
repair &

exec redis-server --appendonly yes --appendfsync always --dir /data \
  --protected-mode no --maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy noeviction \
  --cluster-enabled yes --cluster-config-file nodes.conf \
  --cluster-node-timeout "$REDIS_CLUSTER_NODE_TIMEOUT_MS" \
  --cluster-preferred-endpoint-type hostname \
  --cluster-announce-hostname "$POD_NAME.$SERVICE.$POD_NAMESPACE.svc"
