"""Checks the local cloud itself, end to end, with the stock OpenSSH client and boto3.

Run after `scripts/local-cloud up` (it loads `scripts/local-cloud env` itself):

    "${SPOTRUN_VENV:-$HOME/.cache/spotrun-venv}/bin/python" scripts/local_cloud/selftest.py

It owns nothing of the local cloud; it launches its own instances (one instance type per
check, as the Rust tests do), terminates them and clears the faults it set.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_CLOUD = os.path.join(REPO, "scripts", "local-cloud")


def load_local_cloud_env() -> None:
    """Takes the environment from `local-cloud env` itself, before boto3 is imported: without
    it botocore would look for a region and credentials at the instance metadata address."""
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    exports = subprocess.run(
        [LOCAL_CLOUD, "env"], check=True, capture_output=True, text=True
    ).stdout
    for line in exports.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        os.environ[name] = shlex.split(value)[0] if value else ""
    if not os.environ["AWS_ENDPOINT_URL"].startswith("http://127."):
        raise SystemExit(f"refusing a non-loopback endpoint {os.environ['AWS_ENDPOINT_URL']}")


load_local_cloud_env()

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402

ENV = os.environ
SSH_PORT = ENV.get("SPOTRUN_SSH_PORT", "22")

ec2 = boto3.client("ec2", endpoint_url=ENV["AWS_ENDPOINT_URL"], region_name=ENV["AWS_REGION"])
work = tempfile.mkdtemp(prefix="local-cloud-selftest-")
launched: list[str] = []


def local_cloud(*args: str) -> str:
    return subprocess.run([LOCAL_CLOUD, *args], check=True, capture_output=True, text=True).stdout


def instance_view(instance_id: str) -> dict[str, Any]:
    for line in local_cloud("instances").splitlines():
        view = json.loads(line)
        if view["id"] == instance_id:
            return view
    raise AssertionError(f"{instance_id} missing from `local-cloud instances`")


def wait_until(what: str, check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def keypair(name: str) -> tuple[str, str]:
    path = os.path.join(work, name)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path], check=True
    )
    with open(path + ".pub", encoding="utf-8") as public:
        return path, public.read().strip()


def cloud_config(host_key: str, host_public: str, client_public: str) -> str:
    with open(host_key, encoding="utf-8") as private:
        indented = "".join(f"    {line}" for line in private)
    return (
        "#cloud-config\nssh_deletekeys: true\nssh_genkeytypes: []\nssh_keys:\n"
        f"  ed25519_private: |\n{indented}  ed25519_public: {host_public}\n"
        f"ssh_authorized_keys:\n  - {client_public}\n"
        "bootcmd:\n  - [sh, -c, 'echo dead-man timer ignored here']\n"
    )


class Guest:
    """One launched instance with the keys to reach it."""

    def __init__(self, instance_type: str, spot: bool = True, subnet_id: str | None = None):
        self.run_id = f"selftest-{uuid.uuid4().hex[:8]}"
        self.host_key, self.host_public = keypair(f"{self.run_id}-host")
        self.client_key, client_public = keypair(f"{self.run_id}-client")
        params: dict[str, Any] = {
            "ImageId": ENV["SPOTRUN_AMI"],
            "MinCount": 1,
            "MaxCount": 1,
            "InstanceType": instance_type,
            # boto3 base64-encodes UserData itself; the Rust SDK leaves that to the caller.
            "UserData": cloud_config(self.host_key, self.host_public, client_public),
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "InstanceInitiatedShutdownBehavior": "terminate",
            "BlockDeviceMappings": [
                {
                    "DeviceName": "/dev/xvda",
                    "Ebs": {"Encrypted": True, "VolumeSize": 8, "DeleteOnTermination": True},
                }
            ],
            "TagSpecifications": [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": "spotrun:run-id", "Value": self.run_id}],
                }
            ],
        }
        if spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time"},
            }
        if subnet_id:
            params["SubnetId"] = subnet_id
        self.instance = ec2.run_instances(**params)["Instances"][0]
        self.id = self.instance["InstanceId"]
        launched.append(self.id)
        self.address = self.instance.get("PublicIpAddress") or self.instance["PrivateIpAddress"]
        self.known_hosts = os.path.join(work, f"{self.run_id}-known_hosts")
        with open(self.known_hosts, "w", encoding="utf-8") as known:
            host = self.address if SSH_PORT == "22" else f"[{self.address}]:{SSH_PORT}"
            known.write(f"{host} {self.host_public}\n")

    def ssh_argv(self, *extra: str) -> list[str]:
        return [
            "ssh",
            "-i",
            self.client_key,
            "-p",
            SSH_PORT,
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            *extra,
            f"{ENV['SPOTRUN_SSH_USER']}@{self.address}",
        ]

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ssh_argv(), command], capture_output=True, text=True, timeout=30
        )

    def wait_for_sshd(self) -> None:
        wait_until(
            f"sshd of {self.id}", lambda: instance_view(self.id)["sshd_listening_since"] is not None
        )

    def state(self) -> str:
        return ec2.describe_instances(InstanceIds=[self.id])["Reservations"][0]["Instances"][0][
            "State"
        ]["Name"]


def docker_ping_through(argv_prefix: list[str]) -> str:
    """Forwards a local socket to the remote Docker socket, as spotrun's streamlocal channels
    do, and pings Docker through it."""
    local_socket = os.path.join(work, f"{uuid.uuid4().hex[:8]}.sock")
    forward = subprocess.Popen(
        [*argv_prefix[:-1], "-N", "-L", f"{local_socket}:/var/run/docker.sock", argv_prefix[-1]]
    )
    try:
        wait_until("the forwarded socket", lambda: os.path.exists(local_socket), 10)
        return subprocess.run(
            ["curl", "-sS", "--unix-socket", local_socket, "http://docker/_ping"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        forward.terminate()
        forward.wait()


def labelled_containers(run_id: str) -> list[str]:
    result = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=spotrun.run-id={run_id}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.split()


def check_host_runs_docker_over_ssh() -> None:
    user_host, port = ENV["LOCAL_CLOUD_HOST"].rsplit(":", 1)
    argv = [
        "ssh",
        "-i",
        ENV["LOCAL_CLOUD_IDENTITY"],
        "-p",
        port,
        "-o",
        f"UserKnownHostsFile={ENV['LOCAL_CLOUD_KNOWN_HOSTS']}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        user_host,
    ]
    version = subprocess.run(
        [*argv, "docker version --format '{{.Server.Version}}'"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert version.strip(), "no Docker server version from the SSH host"
    assert docker_ping_through(argv) == "OK"


def check_instance_boots_and_dies_with_its_sessions() -> None:
    guest = Guest("t3.micro")
    assert guest.address.startswith("127.") and guest.address != "127.0.0.1", guest.address
    assert guest.instance["PrivateIpAddress"].startswith("127."), guest.instance
    assert guest.state() == "running"
    guest.wait_for_sshd()

    view = instance_view(guest.id)
    assert view["lifecycle"] == "spot" and view["sshd"], view
    assert view["metadata_options"]["http_tokens"] == "required", view
    assert view["instance_initiated_shutdown_behavior"] == "terminate", view
    assert view["block_devices"][0]["encrypted"] is True, view
    assert view["request"]["MetadataOptions"]["HttpTokens"] == "required", view
    assert view["tags"]["spotrun:run-id"] == guest.run_id, view
    assert view["user_data"].startswith("#cloud-config"), view

    result = guest.ssh("id -nG")
    assert result.returncode == 0 and "docker" in result.stdout.split(), result
    assert docker_ping_through(guest.ssh_argv()) == "OK"

    started = guest.ssh(
        f"docker run -d --label spotrun.run-id={guest.run_id} {ENV['LOCAL_CLOUD_IMAGE']} sleep 600"
    )
    assert started.returncode == 0, started
    other = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--label",
            "spotrun.run-id=selftest-bystander",
            ENV["LOCAL_CLOUD_IMAGE"],
            "sleep",
            "600",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    session = subprocess.Popen(
        [*guest.ssh_argv(), "sleep 600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    assert session.poll() is None, "the open session ended early"

    ec2.terminate_instances(InstanceIds=[guest.id])
    session.wait(timeout=5)
    assert not instance_view(guest.id)["sshd"]
    assert labelled_containers(guest.run_id) == [], "the terminated instance's container survived"
    assert other[:12] in "".join(
        labelled_containers("selftest-bystander")
    ), "a bystander container was removed"
    subprocess.run(["docker", "rm", "-f", other], check=True, capture_output=True)
    assert guest.ssh("true").returncode == 255, "sshd still answers after termination"


def check_capacity_faults() -> None:
    subnet, _zone = local_cloud("subnets").splitlines()[0].split()
    local_cloud("fault", "capacity", "--instance-type", "c5.large")
    local_cloud("fault", "capacity", "--instance-type", "c5.xlarge", "--market", "spot")
    local_cloud("fault", "capacity", "--subnet", subnet, "--instance-type", "c5.2xlarge")

    def refused(instance_type: str, spot: bool, subnet_id: str | None = None) -> bool:
        try:
            Guest(instance_type, spot=spot, subnet_id=subnet_id)
        except botocore.exceptions.ClientError as error:
            assert error.response["Error"]["Code"] == "InsufficientInstanceCapacity", error.response
            return True
        return False

    assert refused("c5.large", spot=True) and refused("c5.large", spot=False)
    assert refused("c5.xlarge", spot=True) and not refused("c5.xlarge", spot=False)
    assert refused("c5.2xlarge", spot=True, subnet_id=subnet)
    other_subnet = local_cloud("subnets").splitlines()[1].split()[0]
    assert not refused("c5.2xlarge", spot=True, subnet_id=other_subnet)


def check_boot_delay() -> None:
    local_cloud("fault", "boot-delay", "--instance-type", "t3.small", "--seconds", "1.5")
    guest = Guest("t3.small")
    time.sleep(0.5)
    assert guest.ssh("true").returncode == 255, "sshd answered during the boot delay"
    guest.wait_for_sshd()
    view = instance_view(guest.id)
    assert view["sshd_listening_since"] - view["seen_at"] >= 1.5, view
    assert guest.ssh("true").returncode == 0


def check_wrong_host_key() -> None:
    local_cloud("fault", "wrong-host-key", "--instance-type", "t3.medium")
    guest = Guest("t3.medium")
    guest.wait_for_sshd()
    result = guest.ssh("true")
    assert result.returncode == 255 and "Host key verification failed" in result.stderr, result


def check_interrupt() -> None:
    guest = Guest("t3.large")
    guest.wait_for_sshd()
    session = subprocess.Popen(
        [*guest.ssh_argv(), "sleep 600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    view = json.loads(local_cloud("interrupt", guest.id))
    assert view["state"] == "terminated" and not view["sshd"], view
    session.wait(timeout=5)
    described = ec2.describe_instances(InstanceIds=[guest.id])["Reservations"][0]["Instances"][0]
    assert described["StateReason"]["Code"] == "Server.SpotInstanceTermination", described


def check_nothing_leaves_loopback() -> None:
    for line in local_cloud("instances").splitlines():
        view = json.loads(line)
        for address in (view["public_ip"], view["private_ip"]):
            assert address is None or (address.startswith("127.") and address != "127.0.0.1"), view


def main() -> int:
    checks = [
        check_host_runs_docker_over_ssh,
        check_instance_boots_and_dies_with_its_sessions,
        check_capacity_faults,
        check_boot_delay,
        check_wrong_host_key,
        check_interrupt,
        check_nothing_leaves_loopback,
    ]
    passed = failed = 0
    try:
        for check in checks:
            started = time.monotonic()
            try:
                check()
                passed += 1
                print(f"ok   {check.__name__} ({time.monotonic() - started:.2f}s)")
            except Exception:  # noqa: BLE001 - report every failing check, not only the first
                failed += 1
                print(f"FAIL {check.__name__}\n{traceback.format_exc()}")
    finally:
        local_cloud("fault", "clear")
        if launched:
            ec2.terminate_instances(InstanceIds=launched)
        shutil.rmtree(work, ignore_errors=True)
    print(f"selftest: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
