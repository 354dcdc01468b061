#!/usr/bin/env bash
# Installs Docker Engine and confines it to its Unix socket: daemon.json names the only host, a
# unit drop-in takes the host flag off dockerd's packaged command line, and the login user joins
# the docker group so spotrun's SSH session can open the socket.
set -euo pipefail

ssh_user="${SPOTRUN_SSH_USER:?SPOTRUN_SSH_USER must name the image login user}"
files="${SPOTRUN_AMI_FILES:-/tmp/spotrun-ami-files}"
os_id="$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"')"

die() {
  echo "10-docker: $*" >&2
  exit 1
}

install_packages() {
  case "$os_id" in
    ubuntu | debian)
      # Ubuntu's own docker.io rather than Docker's repository: it is signed by the archive key
      # the image already trusts, takes security fixes from the same archive, and is the package
      # the local test cloud runs. spotrun drives the Engine API only, so the compose and buildx
      # plugins that Docker's repository adds would be dead weight.
      if command -v cloud-init >/dev/null; then
        # First boot of the build instance may still hold the dpkg lock; a degraded boot is
        # not a reason to stop the build, so only the waiting matters here.
        cloud-init status --wait >/dev/null || true
      fi
      export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
      local apt=(apt-get -q -o DPkg::Lock::Timeout=300)
      "${apt[@]}" update
      "${apt[@]}" -y upgrade
      "${apt[@]}" -y install --no-install-recommends docker.io
      ;;
    amzn)
      dnf -y -q upgrade
      dnf -y -q install docker
      ;;
    *)
      die "unsupported base image: ${os_id:-unknown}"
      ;;
  esac
}

if [[ "${SPOTRUN_AMI_SKIP_PACKAGES:-0}" == 1 ]]; then
  echo "10-docker: package installation skipped (SPOTRUN_AMI_SKIP_PACKAGES=1)" >&2
else
  install_packages
fi
command -v dockerd >/dev/null || die "dockerd is not installed"

install -d -m 0755 /etc/docker
install -m 0644 "$files/daemon.json" /etc/docker/daemon.json

vendor_unit=""
for candidate in /usr/lib/systemd/system/docker.service /lib/systemd/system/docker.service; do
  if [[ -f "$candidate" ]]; then
    vendor_unit="$candidate"
    break
  fi
done
[[ -n "$vendor_unit" ]] || die "the docker package installed no docker.service"

# The packaged command line differs by distribution (binary path, containerd socket, an
# environment file's options), so it is kept as shipped, minus the socket-activation host.
exec_start="$(sed -n 's/^ExecStart=\(..*\)$/\1/p' "$vendor_unit" | tail -n 1)"
[[ -n "$exec_start" ]] || die "no ExecStart in $vendor_unit"
exec_start="$(sed -E 's#(^|[[:space:]])(-H|--host)([[:space:]]+|=)fd://([[:space:]]|$)#\1#' \
  <<<"$exec_start")"
case " $exec_start " in
  *" -H "* | *" -H="* | *" --host "* | *" --host="*)
    die "cannot take the host flag off: $exec_start"
    ;;
esac

install -d -m 0755 /etc/systemd/system/docker.service.d
cat >/etc/systemd/system/docker.service.d/10-spotrun-hosts.conf <<UNIT
# Written by the spotrun image build. /etc/docker/daemon.json names the daemon's only socket, and
# dockerd refuses to start when hosts come from both its command line and that file, so the
# packaged command runs here without its -H flag.
[Service]
ExecStart=
ExecStart=$exec_start
UNIT

getent group docker >/dev/null || die "the docker group is missing"
id "$ssh_user" >/dev/null 2>&1 || die "login user $ssh_user does not exist"
usermod -aG docker "$ssh_user"

systemctl enable docker.service

# On the build instance the new configuration is applied now, so a daemon that rejects it fails
# the build instead of the first job.
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl restart docker.service
  docker info >/dev/null || die "dockerd did not come up with the new configuration"
  [[ -S /var/run/docker.sock ]] || die "dockerd is not serving /var/run/docker.sock"
fi
