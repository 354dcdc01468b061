#!/usr/bin/env bash
# Masks the timers that update packages in the background. An instance lives for one job, and an
# upgrade that restarts dockerd or sshd mid-job would cut spotrun's tunnel; fixes reach the
# instances by rebuilding the image instead.
set -euo pipefail

for timer in apt-daily.timer apt-daily-upgrade.timer motd-news.timer dnf-makecache.timer; do
  if [[ -f "/usr/lib/systemd/system/$timer" || -f "/lib/systemd/system/$timer" ]]; then
    systemctl mask "$timer"
    if [[ -d /run/systemd/system ]]; then
      systemctl stop "$timer"
    fi
  fi
done
