# Sourced by benches that compare with sshfs: `sshfs_up SRC MNT` starts
# sshd on a private loopback port with a throwaway host and user key (under
# $WORK/ssh) and mounts SRC at MNT over it; `sshfs_down` unmounts and stops
# sshd. Installs sshfs and openssh-server when missing. Needs $WORK.
SSHD_PID=""
SSHFS_MNT=""

sshfs_up() { # SRC MNT
  local need=() p
  for p in sshfs openssh-server; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  mkdir -p "$WORK/ssh" "$2" /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/host" >/dev/null
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/user" >/dev/null
  cp "$WORK/ssh/user.pub" "$WORK/ssh/authorized_keys"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  /usr/sbin/sshd -D -p "$port" -o ListenAddress=127.0.0.1 -h "$WORK/ssh/host" \
    -o AuthorizedKeysFile="$WORK/ssh/authorized_keys" -o PasswordAuthentication=no \
    -o StrictModes=no -o PermitRootLogin=prohibit-password -o UsePAM=no &
  SSHD_PID=$!
  sleep 0.5
  sshfs -p "$port" -o IdentityFile="$WORK/ssh/user",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null \
    "root@127.0.0.1:$1" "$2"
  SSHFS_MNT=$2
}

sshfs_down() {
  if [ -n "$SSHFS_MNT" ]; then
    umount "$SSHFS_MNT" 2>/dev/null || umount -l "$SSHFS_MNT" 2>/dev/null || true
  fi
  if [ -n "$SSHD_PID" ]; then kill "$SSHD_PID" 2>/dev/null || true; fi
}
