#!/usr/bin/env bash
# Removes everything that identifies the build instance, so each instance launched from the image
# starts as a first boot: host keys, machine id, cloud-init state, package caches, shell history
# and the build user's authorized key. It must run last: after it, the build user can no longer
# log in.
set -euo pipefail

ssh_user="${SPOTRUN_SSH_USER:?SPOTRUN_SSH_USER must name the image login user}"
files="${SPOTRUN_AMI_FILES:-/tmp/spotrun-ami-files}"
os_id="$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"')"

# cloud-init treats the next boot as a new instance only when its state is gone; that is what
# makes it apply the run's user-data keys.
cloud-init clean --logs --seed

# Host keys baked into an image would be shared by every instance launched from it.
rm -f /etc/ssh/ssh_host_*

# An empty machine-id, not a missing one, is systemd's sign of a first boot: it writes a fresh id
# early, and units conditioned on first boot run.
truncate -s 0 /etc/machine-id
if [[ -f /var/lib/dbus/machine-id && ! -L /var/lib/dbus/machine-id ]]; then
  rm -f /var/lib/dbus/machine-id
fi
rm -f /var/lib/systemd/random-seed

case "$os_id" in
  ubuntu | debian)
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    ;;
  amzn)
    dnf clean all
    rm -rf /var/cache/dnf/*
    ;;
esac

user_home="$(getent passwd "$ssh_user" | cut -d: -f6)"
rm -f /root/.ssh/authorized_keys "${user_home:-/nonexistent}/.ssh/authorized_keys"
for home in /root /home/*; do
  rm -f "$home/.bash_history" "$home/.python_history" "$home/.lesshst" "$home/.viminfo"
done
for login_record in /var/log/wtmp /var/log/btmp /var/log/lastlog; do
  if [[ -f "$login_record" ]]; then
    truncate -s 0 "$login_record"
  fi
done

if [[ "$files" == /tmp/?* ]]; then
  rm -rf -- "$files"
fi
sync
