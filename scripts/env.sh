# Sourced by every script: one build cache outside the clone, shared by the
# tests, the demo, the benches and the installer (RocksDB's C++ is built once).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meshfs/target}"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
MESHFS_BIN_DIR="$CARGO_TARGET_DIR/release"
export MESHFS_BIN_DIR
