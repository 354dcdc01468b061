#!/usr/bin/env bash
# Installs spotrun's cloud-init policy, which makes the host key and the authorized key of each
# run come from that run's user-data, and checks it against cloud-init's own schema.
set -euo pipefail

files="${SPOTRUN_AMI_FILES:-/tmp/spotrun-ami-files}"
drop_in=/etc/cloud/cloud.cfg.d/99-spotrun.cfg

die() {
  echo "30-cloud-init: $*" >&2
  exit 1
}

command -v cloud-init >/dev/null || die "cloud-init is not installed; the keys depend on it"
install -d -m 0755 /etc/cloud/cloud.cfg.d
install -m 0644 "$files/cloud-init-spotrun.cfg" "$drop_in"
cloud-init schema --config-file "$drop_in" >/dev/null || die "cloud-init rejects $drop_in"
