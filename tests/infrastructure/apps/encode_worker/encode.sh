#!/bin/sh
# A user's command-mode workload: the message body arrives on stdin.
set -eu
mkdir -p "$SPOTGUARD_CHECKPOINT_DIR"
cat > "$SPOTGUARD_CHECKPOINT_DIR/last-body"
