"""The guest side of every emulated EC2 instance: what cloud-init and the boot would do.

For each instance that appears in moto's EC2 backend, the agent waits for a boot delay, reads
the instance's cloud-config user-data and starts an OpenSSH sshd on the instance's loopback
addresses with exactly the host key and authorized keys the user-data asks for, admitting the
user `spotrun`, who may use the local Docker socket. When the instance stops or terminates, the
agent kills that sshd together with every session it forked and removes the Docker containers
of the instance's run, as a vanished VM would take its containers with it.

It owns the per-instance sshd processes and their directories under `<state>/instances/`.
It does not own moto, the fault settings (it only asks `faults` for them) or the Docker engine.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

SSHD = "/usr/sbin/sshd"
COMMON_SSHD_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sshd_common.conf")
DOCKER_SOCKET = "/var/run/docker.sock"
RUN_ID_TAG = "spotrun:run-id"
RUN_ID_LABEL = "spotrun.run-id"
POLL_SECONDS = 0.05
GONE_STATES = {"shutting-down", "terminated", "stopping", "stopped"}

log = logging.getLogger("agent")


def sshd_config(listen: Iterable[str], host_key: str, authorized_keys: str, pid_file: str) -> str:
    """One sshd's own options; the rest is shared with the fixed SSH host."""
    lines = [f"ListenAddress {address}" for address in listen]
    lines += [
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"PidFile {pid_file}",
        f"Include {COMMON_SSHD_CONFIG}",
    ]
    return "\n".join(lines) + "\n"


class ProcessCage:
    """Holds one sshd and everything it forks, so all of it can be killed at once.

    sshd calls setsid() in every per-connection child, so process groups do not catch the
    sessions, and the children outlive the listener. A cgroup v2 directory does catch them;
    where none can be made, the cage falls back to walking /proc from the listener down.
    """

    _root: str | None = None
    _root_probed = False

    def __init__(self, name: str):
        self.name = name
        self.path = self._make(name)

    @classmethod
    def root(cls) -> str | None:
        if not cls._root_probed:
            cls._root_probed = True
            cls._root = _cgroup_root()
        return cls._root

    def _make(self, name: str) -> str | None:
        root = self.root()
        if root is None:
            return None
        path = os.path.join(root, name)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            log.warning("cgroup %s not created (%s); falling back to process tree", path, error)
            return None
        return path

    def command(self, argv: list[str]) -> list[str]:
        """Wraps argv so the process enters the cgroup before it execs."""
        if self.path is None:
            return argv
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def kill(self, leader_pid: int | None) -> None:
        if self.path is not None and os.path.isdir(self.path):
            kill_cgroup(self.path)
        elif leader_pid is not None:
            kill_process_tree(leader_pid)


def _cgroup_root() -> str | None:
    """A cgroup v2 directory below our own where instance cgroups can be made, if any."""
    mount = None
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                mount = before.split()[4]
                break
    if mount is None:
        return None
    own = "/"
    with open("/proc/self/cgroup", encoding="utf-8") as cgroup:
        for line in cgroup:
            if line.startswith("0::"):
                own = line[3:].strip()
    root = os.path.join(mount, own.lstrip("/"), "spotrun-local-cloud")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        return None
    # cgroup.kill arrived in Linux 5.14; without it a cgroup cannot be killed atomically.
    if not os.path.exists(os.path.join(root, "cgroup.kill")):
        return None
    return root


def kill_cgroup(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.kill"), "w", encoding="utf-8") as kill:
            kill.write("1")
    except FileNotFoundError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, "cgroup.procs"), encoding="utf-8") as procs:
                if not procs.read().strip():
                    break
        except FileNotFoundError:
            return
        time.sleep(0.01)
    try:
        os.rmdir(path)
    except OSError as error:
        log.warning("cgroup %s not removed: %s", path, error)


def kill_process_tree(leader_pid: int) -> None:
    """Stops the leader first so it forks no more, then kills every descendant and itself."""
    _signal(leader_pid, signal.SIGSTOP)
    seen: set[int] = set()
    while True:
        found = _descendants(leader_pid) - seen
        if not found:
            break
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        seen |= found
    for pid in seen | {leader_pid}:
        _signal(pid, signal.SIGKILL)


def _descendants(leader_pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    stack = [leader_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def remove_run_containers(run_id: str) -> list[str]:
    """Force-removes the containers labelled with this run id; returns their ids."""
    filters = json.dumps({"label": [f"{RUN_ID_LABEL}={run_id}"]})
    try:
        status, body = _docker(
            "GET", "/containers/json?all=1&filters=" + urllib.parse.quote(filters)
        )
        if status != 200:
            log.warning("docker list for run %s answered %s: %s", run_id, status, body[:200])
            return []
        removed = []
        for container in json.loads(body):
            status, body = _docker("DELETE", f"/containers/{container['Id']}?force=1&v=1")
            if status in (204, 404):
                removed.append(container["Id"][:12])
            else:
                log.warning("docker rm %s answered %s: %s", container["Id"], status, body[:200])
        return removed
    except OSError as error:
        log.warning("docker not reachable to remove run %s containers: %s", run_id, error)
        return []


def _docker(method: str, path: str) -> tuple[int, bytes]:
    connection = _UnixHTTPConnection(DOCKER_SOCKET)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str):
        super().__init__("localhost", timeout=30)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def user_data_text(instance: Any) -> str | None:
    """The instance's user-data as text; cloud-init's binary forms (gzip) count as none."""
    if not instance.user_data:
        return None
    try:
        return instance.user_data.decode()
    except (UnicodeDecodeError, ValueError):
        return None


def parse_cloud_config(user_data: str | None) -> dict[str, Any]:
    """The parts of a cloud-config that matter here; anything else is ignored as cloud-init
    ignores modules it does not run."""
    if not user_data or not user_data.startswith("#cloud-config"):
        return {}
    try:
        document = yaml.safe_load(user_data)
    except yaml.YAMLError as error:
        log.warning("user-data is not valid YAML: %s", error)
        return {}
    return document if isinstance(document, dict) else {}


@dataclass
class Guest:
    """What the agent knows about one instance."""

    instance_id: str
    instance_type: str
    seen_at: float
    boot_at: float
    directory: str
    cage: ProcessCage | None = None
    process: subprocess.Popen[bytes] | None = None
    addresses: list[str] = field(default_factory=list)
    listening_since: float | None = None
    wrong_host_key: bool = False
    gone: bool = False
    removed_containers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sshd_running(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self.gone


class Agent:
    """Polls moto's instances and keeps one sshd per running instance."""

    def __init__(
        self,
        state_dir: str,
        ssh_port: int,
        instances: Callable[[], list[Any]],
        boot_delay: Callable[[str], float],
        wrong_host_key: Callable[[str], bool],
    ):
        self.directory = os.path.join(state_dir, "instances")
        self.ssh_port = ssh_port
        self.instances = instances
        self.boot_delay = boot_delay
        self.wrong_host_key = wrong_host_key
        self.guests: dict[str, Guest] = {}
        self.guests_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="instance-agent", daemon=True)

    def start(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, mode=0o755)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=5)
        for guest in list(self.guests.values()):
            self._kill_sshd(guest)

    def guest(self, instance_id: str) -> Guest | None:
        return self.guests.get(instance_id)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                next_boot = self._tick()
            except Exception:  # noqa: BLE001 - one bad instance must not stop the agent
                log.exception("agent tick failed")
                next_boot = None
            timeout = POLL_SECONDS
            if next_boot is not None:
                timeout = max(0.0, min(timeout, next_boot - time.time()))
            self.wake.wait(timeout)
            self.wake.clear()

    def _tick(self) -> float | None:
        next_boot = None
        for instance in self.instances():
            guest = self._guest_for(instance)
            state = instance.state
            if state in GONE_STATES:
                self.shut_down(instance)
            elif state == "running" and guest.process is None and not guest.gone:
                if time.time() >= guest.boot_at:
                    self._boot(guest, instance)
                elif next_boot is None or guest.boot_at < next_boot:
                    next_boot = guest.boot_at
        return next_boot

    def _guest_for(self, instance: Any) -> Guest:
        with self.guests_lock:
            guest = self.guests.get(instance.id)
            if guest is None:
                now = time.time()
                guest = Guest(
                    instance_id=instance.id,
                    instance_type=instance.instance_type,
                    seen_at=now,
                    boot_at=now + self.boot_delay(instance.instance_type),
                    directory=os.path.join(self.directory, instance.id),
                )
                self.guests[instance.id] = guest
                log.info("instance=%s type=%s seen", instance.id, instance.instance_type)
            return guest

    def _boot(self, guest: Guest, instance: Any) -> None:
        with guest.lock:
            if guest.gone or guest.process is not None:
                return
            addresses = [a for a in (instance.public_ip, instance.private_ip) if a]
            if not addresses or not all(a.startswith("127.") for a in addresses):
                log.error(
                    "instance=%s has non-loopback addresses %s; not booting",
                    guest.instance_id,
                    addresses,
                )
                guest.gone = True
                return
            guest.addresses = addresses
            config = parse_cloud_config(user_data_text(instance))
            guest.wrong_host_key = self.wrong_host_key(guest.instance_type)
            self._write_guest_files(guest, config)
            guest.cage = ProcessCage(guest.instance_id)
            argv = [SSHD, "-D", "-e", "-f", os.path.join(guest.directory, "sshd_config")]
            guest.process = subprocess.Popen(
                guest.cage.command(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Without a cgroup the fallback kill walks the tree from here; a session of
                # its own keeps the launcher's signals away from sshd.
                start_new_session=True,
            )
            with open(
                os.path.join(guest.directory, "sshd.pid.launcher"), "w", encoding="utf-8"
            ) as pid_file:
                pid_file.write(f"{guest.process.pid}\n")
            if guest.cage.path is not None:
                with open(
                    os.path.join(guest.directory, "cgroup"), "w", encoding="utf-8"
                ) as cgroup_file:
                    cgroup_file.write(guest.cage.path + "\n")
            threading.Thread(
                target=self._watch_sshd_log, args=(guest, guest.process), daemon=True
            ).start()
            log.info(
                "instance=%s addresses=%s port=%d wrong_host_key=%s sshd started",
                guest.instance_id,
                ",".join(addresses),
                self.ssh_port,
                guest.wrong_host_key,
            )

    def _write_guest_files(self, guest: Guest, config: dict[str, Any]) -> None:
        os.makedirs(guest.directory, mode=0o755, exist_ok=True)
        host_key = os.path.join(guest.directory, "ssh_host_ed25519_key")
        ssh_keys = config.get("ssh_keys") or {}
        private_key = ssh_keys.get("ed25519_private") if isinstance(ssh_keys, dict) else None
        if private_key and not guest.wrong_host_key:
            fd = os.open(host_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as key_file:
                key_file.write(private_key if private_key.endswith("\n") else private_key + "\n")
        else:
            # cloud-init generates a key when the user-data brings none; the wrong-host-key
            # fault does the same on purpose.
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    guest.instance_id,
                    "-f",
                    host_key,
                ],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        keys = config.get("ssh_authorized_keys") or []
        authorized_keys = os.path.join(guest.directory, "authorized_keys")
        with open(authorized_keys, "w", encoding="utf-8") as keys_file:
            keys_file.writelines(f"{key.strip()}\n" for key in keys if isinstance(key, str))
        os.chmod(authorized_keys, 0o644)
        listen = [f"{address}:{self.ssh_port}" for address in guest.addresses]
        config_text = sshd_config(
            listen, host_key, authorized_keys, os.path.join(guest.directory, "sshd.pid")
        )
        with open(
            os.path.join(guest.directory, "sshd_config"), "w", encoding="utf-8"
        ) as config_file:
            config_file.write(config_text)

    def _watch_sshd_log(self, guest: Guest, process: subprocess.Popen[bytes]) -> None:
        """Copies sshd's log to a file and notes when it listens on every address."""
        assert process.stderr is not None
        listening = 0
        with open(os.path.join(guest.directory, "sshd.log"), "ab") as log_file:
            for line in process.stderr:
                log_file.write(line)
                log_file.flush()
                if line.startswith(b"Server listening on"):
                    listening += 1
                    if listening == len(guest.addresses):
                        guest.listening_since = time.time()
                        log.info("instance=%s sshd listening", guest.instance_id)

    def shut_down(self, instance: Any) -> None:
        """Takes the instance's guest down: sshd, its sessions and its run's containers."""
        guest = self._guest_for(instance)
        with guest.lock:
            if guest.gone:
                return
            guest.gone = True
            self._kill_sshd(guest)
            run_id = _tag(instance, RUN_ID_TAG)
            if run_id:
                guest.removed_containers = remove_run_containers(run_id)
            log.info(
                "instance=%s state=%s sshd stopped containers_removed=%s",
                guest.instance_id,
                instance.state,
                ",".join(guest.removed_containers) or "-",
            )

    def _kill_sshd(self, guest: Guest) -> None:
        if guest.process is None or guest.cage is None:
            return
        # Once reaped, the listener's pid may belong to someone else; the cgroup stays safe.
        leader = guest.process.pid if guest.process.poll() is None else None
        guest.cage.kill(leader)
        try:
            guest.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("instance=%s sshd did not exit", guest.instance_id)


def _tag(instance: Any, key: str) -> str | None:
    for tag in instance.get_tags():
        if tag.get("key") == key:
            return tag.get("value")
    return None
