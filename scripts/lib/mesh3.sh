# Sourced by scripts that need a local mesh of several devices on loopback:
# `mesh_up N` makes devices d1..dN under $WORK (d1 inits, the others join
# with invites from d1), mounts them and waits until all are Raft voters
# (up to 5). Needs $BIN and $WORK. `mesh_down` unmounts everything.
# $MESH_CFG ("key=value key=value"), when set, goes into every device's
# config.toml before its first mount.

# JSON field of `meshfs status --json`, by a Python expression on `s`.
status_get() { # DATA_DIR EXPR
  "$BIN" status --data-dir "$1" --json 2>/dev/null |
    python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"
}

wait_until() { # SECONDS CMD...
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@"; do
    [ $SECONDS -lt $end ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 0.1
  done
}

set_cfg() { # DATA_DIR KEY VALUE: a top-level key, before any table
  python3 - "$1/config.toml" "$2" "$3" <<'PY'
import sys
path, key, value = sys.argv[1:]
lines = [l for l in open(path).read().splitlines() if not l.startswith(key + " =")]
at = next((i for i, l in enumerate(lines) if l.startswith("[")), len(lines))
lines.insert(at, f"{key} = {value}")
open(path, "w").write("\n".join(lines) + "\n")
PY
}

mount_dev() { # N
  mkdir -p "$WORK/d$1/mnt"
  local kv
  for kv in ${MESH_CFG:-}; do set_cfg "$WORK/d$1/data" "${kv%%=*}" "${kv#*=}"; done
  "$BIN" mount --data-dir "$WORK/d$1/data" "$WORK/d$1/mnt"
}

voters_are() { # DATA_DIR N
  [ "$(status_get "$1" "len(s['raft']['voters'])")" = "$2" ]
}

mesh_up() { # N
  local n=$1 i
  mkdir -p "$WORK/d1/mnt"
  "$BIN" init --data-dir "$WORK/d1/data" --name d1 --listen /ip4/127.0.0.1/tcp/0 >/dev/null
  mount_dev 1
  for i in $(seq 2 "$n"); do
    local code; code=$("$BIN" invite --data-dir "$WORK/d1/data" --ttl 10m)
    "$BIN" join "$code" --data-dir "$WORK/d$i/data" --name "d$i" --listen /ip4/127.0.0.1/tcp/0 >/dev/null
    mount_dev "$i"
  done
  local want=$((n < 5 ? n : 5))
  wait_until 60 voters_are "$WORK/d1/data" "$want"
}

mesh_down() {
  local d pid
  for d in "$WORK"/d*/mnt; do
    [ -d "$d" ] || continue
    umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true
  done
  # umount returns before the daemons finish; wait (up to 10 s each) so
  # that a cleanup after this does not race their last writes.
  for d in "$WORK"/d*/data; do
    pid=$(cat "$d/meshfs.pid" 2>/dev/null) || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

leader_of() { # DATA_DIR -> device name of the leader
  status_get "$1" "s['raft']['leader']"
}
