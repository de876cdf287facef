#!/bin/sh
# Starts one node of Herald's Redis Cluster (compose.cluster.yaml):
#
#   sh cluster-node.sh redis-server [options...]
#
# The node announces NODE_NAME (its service name) as its hostname, so
# nodes.conf records every node as `ip:port@cport,hostname`. Before starting
# redis-server, this rewrites the IP of every node in nodes.conf from the
# current address of its hostname: after `down`/`up` (a new network), a restart
# of every node, or one node recreated, the addresses in nodes.conf are stale,
# and a node only finds its peers at the addresses it knows. Once started with
# the right addresses, a node's PINGs also tell each peer its own new address.
# redis-cluster-init (cluster-init.sh) repairs whatever is left with CLUSTER MEET.
#
# A replica whose master's name now answers with another node id (that node's
# volume was lost) does not follow it, which would empty the replica too: it
# marks its old master `noaddr`, and redis-cluster-init has it take over.
#
# Waits up to PEER_WAIT_SECONDS (default 15) for every name to resolve (Docker's
# DNS knows only running containers); a peer still unknown then keeps its old
# address. A replica then waits as long again, at most, for its master to answer. Never touches the data: only nodes.conf's addresses (and that flag), by
# writing a new file and renaming it over the old one. POSIX sh, as the node's
# user, with a read-only root: it writes only in the data directory.
set -eu
set -f  # no globbing: nodes.conf has [slot-<-id] fields

: "${NODE_NAME:?NODE_NAME must be the name this node announces (its service name)}"
DATA_DIR=${DATA_DIR:-/data}
CONFIG=$DATA_DIR/nodes.conf
PEER_WAIT_SECONDS=${PEER_WAIT_SECONDS:-15}

log() { echo "cluster-node: $*" >&2; }

resolve() {  # $1 = name; prints its IPv4 address, nothing if it has none now
  getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'
}

hostnames() {  # the hostnames nodes.conf records (field 2: ip:port@cport,hostname[,aux=...])
  awk '$1 != "vars" { n = split($2, part, ","); if (n >= 2 && part[2] != "" && index(part[2], "=") == 0) print part[2] }' "$CONFIG"
}

rewrite() {
  names=$(hostnames)
  deadline=$(($(date +%s) + PEER_WAIT_SECONDS))
  while :; do
    missing=""
    for name in $names; do
      [ -n "$(resolve "$name")" ] || missing="$missing $name"
    done
    [ -z "$missing" ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "no address yet for$missing: keeping their old ones (redis-cluster-init or their own start fixes them)"
      break
    fi
    sleep 1
  done

  # A replica follows its master's address. If the node under its master's name
  # answers with another id, that node lost its data (an empty volume): syncing
  # from it would empty this replica, the only copy left. Mark the old master
  # `noaddr` instead: this replica does not follow it, and redis-cluster-init
  # makes it take over. (Other nodes start without waiting for their peers, so
  # the master answers within seconds, or is not there.)
  master=$(awk '$3 ~ /myself/ && $3 ~ /slave/ { print $4 }' "$CONFIG")
  lost=""
  if [ -n "$master" ]; then
    master_name=$(awk -v id="$master" '$1 == id { split($2, part, ","); print part[2] }' "$CONFIG")
    master_port=$(awk -v id="$master" '$1 == id { split($2, part, "@"); n = split(part[1], ip, ":"); print ip[n] }' "$CONFIG")
    deadline=$(($(date +%s) + PEER_WAIT_SECONDS))
    while [ -n "$master_name" ] && [ "$(date +%s)" -lt "$deadline" ]; do
      answer=$(timeout 2 redis-cli -h "$master_name" -p "$master_port" cluster myid 2>/dev/null | tr -d '\r') || answer=""
      case $answer in
        "$master") break ;;
        [0-9a-f]*)
          if [ "${#answer}" = 40 ]; then
            log "$master_name answers as $answer, not as $master, the master this replica follows: it lost its data; not following it"
            lost=$master
            break
          fi ;;
      esac
      sleep 1
    done
  fi

  tmp=$CONFIG.herald-tmp
  changed=0
  : >"$tmp"
  while IFS= read -r line || [ -n "$line" ]; do
    set -- $line
    if [ "$#" -ge 2 ] && [ "$1" != vars ]; then
      addr=$2
      endpoint=${addr%%,*}            # ip:port@cport
      extra=${addr#"$endpoint"}       # ,hostname[,aux...] or nothing
      name=${extra#,}
      name=${name%%,*}
      ipport=${endpoint%%@*}
      port=${ipport##*:}
      old=${ipport%:*}
      case $name in *=*) name="" ;; esac
      new=""
      [ -n "$name" ] && new=$(resolve "$name")
      if [ "$1" = "$lost" ]; then
        changed=1
        case $3 in *noaddr*) ;; *) line=$(printf '%s\n' "$line" | awk '{ $3 = $3 ",noaddr"; print }') ;; esac
      elif [ -n "$new" ] && [ "$new" != "$old" ]; then
        log "$name: $old -> $new"
        changed=1
        line=$(printf '%s\n' "$line" | awk -v addr="$new:$port@${endpoint#*@}$extra" '{ $2 = addr; print }')
      fi
    fi
    printf '%s\n' "$line" >>"$tmp"
  done <"$CONFIG"
  if [ "$changed" = 1 ]; then
    mv -f "$tmp" "$CONFIG"
  else
    rm -f "$tmp"
  fi
}

if [ -s "$CONFIG" ]; then
  rewrite
else
  log "no $CONFIG yet: a new node"
fi

exec "$@" --cluster-enabled yes --cluster-config-file nodes.conf \
  --cluster-announce-hostname "$NODE_NAME" --cluster-preferred-endpoint-type hostname
