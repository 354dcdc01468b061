#!/usr/bin/env bash
# Installs spotrun's sshd policy as a drop-in and refuses to finish unless sshd accepts it and
# its effective configuration is the one spotrun relies on.
set -euo pipefail

files="${SPOTRUN_AMI_FILES:-/tmp/spotrun-ami-files}"
drop_in=/etc/ssh/sshd_config.d/00-spotrun.conf

die() {
  echo "20-sshd: $*" >&2
  exit 1
}

sshd_bin="$(command -v sshd || echo /usr/sbin/sshd)"
[[ -x "$sshd_bin" ]] || die "sshd is not installed"
grep -Eq '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/\*\.conf' /etc/ssh/sshd_config ||
  die "/etc/ssh/sshd_config does not include /etc/ssh/sshd_config.d/*.conf"

install -d -m 0755 /etc/ssh/sshd_config.d
install -m 0644 "$files/sshd-spotrun.conf" "$drop_in"

# sshd's checks insist on its privilege separation directory, which only exists at runtime.
install -d -m 0755 /run/sshd
"$sshd_bin" -t || die "sshd rejects its configuration with $drop_in"

effective="$("$sshd_bin" -T)"
for expected in \
  "pubkeyauthentication yes" \
  "passwordauthentication no" \
  "kbdinteractiveauthentication no" \
  "permitrootlogin no" \
  "allowstreamlocalforwarding local" \
  "allowtcpforwarding no" \
  "allowagentforwarding no" \
  "x11forwarding no" \
  "permittunnel no" \
  "gatewayports no"; do
  grep -qixF "$expected" <<<"$effective" ||
    die "another setting overrides $drop_in: expected '$expected'"
done
