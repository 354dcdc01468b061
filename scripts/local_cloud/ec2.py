"""The local cloud's EC2: the moto emulator on loopback, with instances that really boot.

This launcher owns one process that holds:
- moto's server on 127.0.0.1 (`--port`, 5005 by default), patched so that every instance
  address, public and private, is a unique loopback address 127.0.x.y (never 127.0.0.1);
- a test AMI with a fixed id, written to `<state>/ami_id`;
- the instance agent (agent.py) that plays cloud-init and sshd for every instance;
- fault injection for the tests: capacity errors, slow RunInstances answers, boot delays and
  wrong host keys per instance type, spot interruptions;
- a control HTTP server on 127.0.0.1 (`--control-port`, 5006 by default) that exposes the
  faults and a view of the instances as EC2 received them. `scripts/local-cloud` wraps it.

It does not own the Docker engine, the registry or the fixed SSH host; `scripts/local-cloud`
starts those.
"""

from __future__ import annotations

import argparse
import copy
import errno
import ipaddress
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A __pycache__ beside the scripts would only clutter the work tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moto.ec2.exceptions import EC2ClientError  # noqa: E402

from agent import Agent, user_data_text  # noqa: E402

ACCOUNT_ID = "123456789012"
REGION = "us-east-1"
AMI_ID = "ami-0000000000000c10d"
AMI_NAME = "spotrun-local-test"
# Port 22 is what spotrun dials by default; this one is used only when 22 is taken.
FALLBACK_SSH_PORT = 2200
FIRST_ADDRESS = int(ipaddress.IPv4Address("127.0.0.10"))
LAST_ADDRESS = int(ipaddress.IPv4Address("127.0.255.254"))

log = logging.getLogger("ec2")


class LoopbackAddresses:
    """Hands out each loopback address once, so no address is reused while an old sshd on it
    may still be dying, and skips addresses whose SSH port something else already holds
    (another local cloud under a different state directory, say)."""

    def __init__(self, ssh_port: int) -> None:
        self.ssh_port = ssh_port
        self._next = itertools.count(FIRST_ADDRESS)
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            while True:
                value = next(self._next)
                if value > LAST_ADDRESS:
                    raise RuntimeError("loopback addresses exhausted; restart the local cloud")
                # .0 and .255 are valid on loopback but look like network and broadcast
                # addresses to people reading logs.
                if value & 0xFF in (0, 255):
                    continue
                address = str(ipaddress.IPv4Address(value))
                if self._port_free(address):
                    return address

    def _port_free(self, address: str) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, self.ssh_port))
            except OSError:
                log.info("address %s:%d is taken; skipping it", address, self.ssh_port)
                return False
        return True


class Faults:
    """Fault settings, keyed by instance type so that parallel tests do not interfere."""

    def __init__(self, default_boot_delay: float):
        self._lock = threading.Lock()
        self.default_boot_delay = default_boot_delay
        self.clear()

    def clear(self, instance_type: str | None = None) -> None:
        """Clears every fault, or with `instance_type` only those of that type, so that a test
        cannot lift the faults another one running beside it depends on."""
        with self._lock:
            if instance_type is None:
                self.capacity: list[dict[str, str | None]] = []
                self.boot_delays: dict[str, float] = {}
                self.launch_delays: dict[str, float] = {}
                self.wrong_host_key_types: set[str] = set()
                return
            self.capacity = [
                rule for rule in self.capacity if rule["instance_type"] != instance_type
            ]
            self.boot_delays.pop(instance_type, None)
            self.launch_delays.pop(instance_type, None)
            self.wrong_host_key_types.discard(instance_type)

    def add_capacity(
        self, instance_type: str | None, subnet_id: str | None, market: str | None
    ) -> None:
        if not instance_type and not subnet_id:
            raise ValueError("a capacity fault needs an instance type, a subnet or both")
        if market not in (None, "spot", "on-demand"):
            raise ValueError(f"unknown market {market!r}: use spot or on-demand")
        with self._lock:
            self.capacity.append(
                {"instance_type": instance_type, "subnet_id": subnet_id, "market": market}
            )

    def capacity_fails(self, instance_type: str, subnet_id: str | None, market: str) -> bool:
        with self._lock:
            return any(
                (rule["instance_type"] in (None, instance_type))
                and (rule["subnet_id"] in (None, subnet_id))
                and (rule["market"] in (None, market))
                for rule in self.capacity
            )

    def set_boot_delay(self, instance_type: str | None, seconds: float) -> None:
        with self._lock:
            if instance_type:
                self.boot_delays[instance_type] = seconds
            else:
                self.default_boot_delay = seconds

    def boot_delay(self, instance_type: str) -> float:
        with self._lock:
            return self.boot_delays.get(instance_type, self.default_boot_delay)

    def set_launch_delay(self, instance_type: str, seconds: float) -> None:
        with self._lock:
            self.launch_delays[instance_type] = seconds

    def launch_delay(self, instance_type: str) -> float:
        with self._lock:
            return self.launch_delays.get(instance_type, 0.0)

    def set_wrong_host_key(self, instance_type: str) -> None:
        with self._lock:
            self.wrong_host_key_types.add(instance_type)

    def wrong_host_key(self, instance_type: str) -> bool:
        with self._lock:
            return instance_type in self.wrong_host_key_types

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "capacity": list(self.capacity),
                "default_boot_delay": self.default_boot_delay,
                "boot_delays": dict(self.boot_delays),
                "launch_delays": dict(self.launch_delays),
                "wrong_host_key": sorted(self.wrong_host_key_types),
            }


class InsufficientInstanceCapacity(EC2ClientError):  # noqa: N818 - named after the EC2 code
    """The error EC2 answers when a type has no capacity left; moto serialises it with this
    code, so the AWS SDK sees the real one."""

    def __init__(self, instance_type: str, subnet_id: str | None):
        where = f" in subnet {subnet_id}" if subnet_id else ""
        super().__init__(
            "InsufficientInstanceCapacity",
            f"We currently do not have sufficient {instance_type} capacity{where}. "
            "(injected by the local cloud)",
        )


class LocalEc2:
    """moto's EC2 backend for the one account and region, with the patches applied."""

    def __init__(self, state_dir: str, ssh_port: int, faults: Faults):
        self.state_dir = state_dir
        self.faults = faults
        self.addresses = LoopbackAddresses(ssh_port)
        # Raw RunInstances parameters and what moto made of them, per instance id: moto keeps
        # only part of a launch (block devices are gone once an instance terminates).
        self.launches: dict[str, dict[str, Any]] = {}
        self._patch_moto()
        from moto.ec2.models import ec2_backends

        self.backend = ec2_backends[ACCOUNT_ID][REGION]
        self.agent = Agent(
            state_dir,
            ssh_port,
            instances=self.instances,
            boot_delay=faults.boot_delay,
            wrong_host_key=faults.wrong_host_key,
        )

    def instances(self) -> list[Any]:
        # moto's request threads mutate the reservations while the agent reads them.
        for _ in range(10):
            try:
                return self.backend.all_instances()
            except RuntimeError:
                time.sleep(0.001)
        return []

    def _patch_moto(self) -> None:
        import moto.ec2.models.elastic_ip_addresses as elastic_ips
        import moto.ec2.models.elastic_network_interfaces as interfaces
        import moto.ec2.models.instances as instances
        import moto.ec2.models.nat_gateways as nat_gateways
        import moto.ec2.models.subnets as subnets
        import moto.ec2.models.vpcs as vpcs
        import moto.ec2.utils as utils
        from moto.ec2.responses.instances import InstanceResponse

        original_private_ip = utils.random_private_ip

        def loopback_private_ip(cidr: str | None = None, ipv6: bool = False) -> str:
            if ipv6:
                return original_private_ip(cidr, ipv6=True)
            return self.addresses.take()

        def loopback_ip() -> str:
            return self.addresses.take()

        # The models import the helpers by name, so the names in each using module are what
        # must change; utils itself is patched for code that looks them up there.
        for module in (utils, interfaces, instances, vpcs, nat_gateways):
            if hasattr(module, "random_private_ip"):
                module.random_private_ip = loopback_private_ip
        for module in (utils, interfaces):
            module.random_public_ip = loopback_ip
        for module in (utils, elastic_ips):
            if hasattr(module, "random_ip"):
                module.random_ip = loopback_ip

        # Instances in a subnet take their private address from the subnet's CIDR
        # (172.31.x.y in the default VPC) rather than from the helpers above.
        def loopback_subnet_ip(subnet: Any, instance: Any) -> str:
            address = self.addresses.take()
            subnet._subnet_ips[address] = instance
            return address

        subnets.Subnet.get_available_subnet_ip = loopback_subnet_ip

        original_terminate = instances.Instance.terminate
        original_stop = instances.Instance.stop
        self._terminate_in_moto = original_terminate

        # A terminated VM takes its sshd, sessions and containers with it before EC2 answers,
        # so that a test can check the end state as soon as spotrun exits.
        def terminate(instance: Any) -> Any:
            # EC2 leaves a terminated instance as it is, its state reason (an interruption,
            # say) included, when it is asked to terminate it again.
            if instance.state == "terminated":
                return copy.copy(instance._state)
            previous = original_terminate(instance)
            self.agent.shut_down(instance)
            return previous

        def stop(instance: Any) -> Any:
            previous = original_stop(instance)
            self.agent.shut_down(instance)
            return previous

        instances.Instance.terminate = terminate
        instances.Instance.stop = stop

        original_run_instances = InstanceResponse.run_instances

        def run_instances(response: Any) -> Any:
            launch = self._effective_launch(response)
            if self.faults.capacity_fails(
                launch["instance_type"], launch["subnet_id"], launch["market"]
            ):
                log.info("RunInstances refused by capacity fault: %s", launch)
                raise InsufficientInstanceCapacity(launch["instance_type"], launch["subnet_id"])
            result = original_run_instances(response)
            self._record_launch(response, launch, result.result)
            self.agent.wake.set()
            # The instance exists while the caller still waits for its id: what a client
            # interrupted during RunInstances must still find and terminate.
            delay = self.faults.launch_delay(launch["instance_type"])
            if delay > 0:
                log.info("RunInstances answer held back %.1fs: %s", delay, launch)
                time.sleep(delay)
            return result

        InstanceResponse.run_instances = run_instances

    def _effective_launch(self, response: Any) -> dict[str, Any]:
        """Instance type, subnet and market of a RunInstances call, with the launch template
        filling in what the call leaves out, as EC2 does."""
        params = response.params if isinstance(response.params, dict) else {}
        template: dict[str, Any] = {}
        if params.get("LaunchTemplate"):
            try:
                template = self.backend._get_template_from_args(params["LaunchTemplate"]).data
            except Exception:  # noqa: BLE001 - moto reports a bad template itself
                template = {}
        interfaces = params.get("NetworkInterfaces") or template.get("NetworkInterfaces") or [{}]
        market_options = (
            params.get("InstanceMarketOptions") or template.get("InstanceMarketOptions") or {}
        )
        return {
            "instance_type": params.get("InstanceType")
            or template.get("InstanceType")
            or "m1.small",
            "subnet_id": params.get("SubnetId")
            or interfaces[0].get("SubnetId")
            or template.get("SubnetId"),
            "market": "spot" if market_options.get("MarketType") == "spot" else "on-demand",
            "launch_template_data": template or None,
        }

    def _record_launch(self, response: Any, launch: dict[str, Any], reservation: Any) -> None:
        request = {k: v for k, v in response.params.items() if k != "UserData"}
        request = json.loads(json.dumps(request, default=str))
        template = json.loads(json.dumps(launch["launch_template_data"], default=str))
        for instance in reservation.instances:
            self.launches[instance.id] = {
                "request": request,
                "launch_template_data": template,
                "block_devices": self._block_devices(instance),
            }

    def _block_devices(self, instance: Any) -> list[dict[str, Any]]:
        devices = []
        for device_name, block in instance.get_block_device_mapping:
            volume = self.backend.volumes.get(block.volume_id)
            devices.append(
                {
                    "device_name": device_name,
                    "volume_id": block.volume_id,
                    "encrypted": bool(volume.encrypted) if volume else block.encrypted,
                    "size": volume.size if volume else block.size,
                    "volume_type": getattr(volume, "volume_type", None),
                    "delete_on_termination": block.delete_on_termination,
                }
            )
        return devices

    def register_ami(self) -> None:
        ami = self.backend.register_image(
            name=AMI_NAME, description="spotrun local cloud test image"
        )
        # A fixed id keeps SPOTRUN_AMI valid across launcher restarts.
        del self.backend.amis[ami.id]
        ami.id = AMI_ID
        self.backend.amis[AMI_ID] = ami
        with open(os.path.join(self.state_dir, "ami_id"), "w", encoding="utf-8") as ami_file:
            ami_file.write(AMI_ID + "\n")

    def interrupt(self, instance_id: str) -> dict[str, Any]:
        """A spot interruption: the instance terminates with the reason EC2 gives for it."""
        from moto.ec2.models.instances import StateReason

        instance = self.backend.get_instance(instance_id)
        # The reason is in place before the guest goes down: a client that loses its link asks
        # EC2 at once why, and must not read the user-initiated reason moto's terminate sets.
        self._terminate_in_moto(instance)
        instance.state_reason = StateReason(
            "Server.SpotInstanceTermination: Spot instance termination",
            "Server.SpotInstanceTermination",
        )
        instance._reason = "Server.SpotInstanceTermination"
        self.agent.shut_down(instance)
        return self.describe(instance)

    def describe(self, instance: Any) -> dict[str, Any]:
        guest = self.agent.guest(instance.id)
        launch = self.launches.get(instance.id, {})
        metadata = instance.metadata_options
        return {
            "id": instance.id,
            "state": instance.state,
            "state_reason": instance.state_reason.code or None,
            "instance_type": instance.instance_type,
            "address": instance.public_ip or instance.private_ip,
            "public_ip": instance.public_ip,
            "private_ip": instance.private_ip,
            "lifecycle": "spot" if instance.lifecycle == "spot" else "on-demand",
            "subnet_id": instance.subnet_id,
            "image_id": instance.image_id,
            "tags": {tag["key"]: tag["value"] for tag in instance.get_tags()},
            "user_data": user_data_text(instance),
            "sshd": bool(guest and guest.sshd_running),
            "sshd_listening_since": guest.listening_since if guest else None,
            "seen_at": guest.seen_at if guest else None,
            "wrong_host_key": bool(guest and guest.wrong_host_key),
            "removed_containers": guest.removed_containers if guest else [],
            "metadata_options": {
                "http_tokens": metadata.http_tokens,
                "http_endpoint": metadata.http_endpoint,
                "http_put_response_hop_limit": metadata.http_put_response_hop_limit,
                "instance_metadata_tags": metadata.instance_metadata_tags,
            },
            "instance_initiated_shutdown_behavior": instance.instance_initiated_shutdown_behavior,
            "block_devices": launch.get("block_devices"),
            "request": launch.get("request"),
            "launch_template_data": launch.get("launch_template_data"),
        }

    def subnets(self) -> list[tuple[str, str]]:
        vpc = self.backend.get_default_vpc()
        return sorted(
            (subnet.id, subnet.availability_zone)
            for subnet in self.backend.describe_subnets()
            if vpc is not None and subnet.vpc_id == vpc.id
        )


def control_handler(ec2: LocalEc2) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self._send(200, "ok\n")
            elif self.path == "/instances":
                lines = [json.dumps(ec2.describe(i), sort_keys=True) for i in ec2.instances()]
                self._send(200, "".join(line + "\n" for line in lines))
            elif self.path == "/subnets":
                self._send(200, "".join(f"{sid} {zone}\n" for sid, zone in ec2.subnets()))
            elif self.path == "/faults":
                self._send(200, json.dumps(ec2.faults.describe()) + "\n")
            else:
                self._send(404, f"no such path {self.path}\n")

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                answer = self._post(body)
            except (ValueError, KeyError) as error:
                self._send(400, f"{error}\n")
                return
            except Exception as error:  # noqa: BLE001 - report moto's errors to the caller
                self._send(400, f"{type(error).__name__}: {error}\n")
                return
            self._send(200, answer)

        def _post(self, body: dict[str, Any]) -> str:
            faults = ec2.faults
            if self.path == "/faults/capacity":
                faults.add_capacity(
                    body.get("instance_type"), body.get("subnet_id"), body.get("market")
                )
            elif self.path == "/faults/boot-delay":
                faults.set_boot_delay(body.get("instance_type"), float(body["seconds"]))
            elif self.path == "/faults/launch-delay":
                faults.set_launch_delay(body["instance_type"], float(body["seconds"]))
            elif self.path == "/faults/wrong-host-key":
                faults.set_wrong_host_key(body["instance_type"])
            elif self.path == "/faults/clear":
                faults.clear(body.get("instance_type"))
            elif self.path == "/interrupt":
                return json.dumps(ec2.interrupt(body["instance_id"]), sort_keys=True) + "\n"
            else:
                raise KeyError(f"no such path {self.path}")
            return json.dumps(faults.describe()) + "\n"

        def _send(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
            log.debug("control: " + format, *args)

    return Handler


def choose_ssh_port() -> int:
    """22 unless something on this machine already listens on it for every address."""
    for port in (22, FALLBACK_SSH_PORT):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # 127.0.0.2 is never handed to an instance; a bind there fails exactly when a
            # wildcard listener holds the port.
            probe.bind(("127.0.0.2", port))
            return port
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            log.warning("port %d is taken on this machine", port)
        finally:
            probe.close()
    raise SystemExit(f"neither port 22 nor {FALLBACK_SSH_PORT} is free for instance sshds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--port", type=int, default=5005)
    parser.add_argument("--control-port", type=int, default=5006)
    parser.add_argument("--boot-delay", type=float, default=0.3)
    args = parser.parse_args()

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per EC2 request drowns the instance events.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # moto's dependencies can otherwise reach for real AWS endpoints or metadata.
    os.environ.update(
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
    )
    os.environ.pop("AWS_ENDPOINT_URL", None)

    ssh_port = choose_ssh_port()
    with open(os.path.join(args.state_dir, "ssh_port"), "w", encoding="utf-8") as port_file:
        port_file.write(f"{ssh_port}\n")

    ec2 = LocalEc2(args.state_dir, ssh_port, Faults(args.boot_delay))
    ec2.register_ami()
    ec2.agent.start()

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    control = ThreadingHTTPServer(("127.0.0.1", args.control_port), control_handler(ec2))
    control.daemon_threads = True
    threading.Thread(target=control.serve_forever, name="control", daemon=True).start()
    log.info(
        "moto on 127.0.0.1:%d, control on 127.0.0.1:%d, instance ssh port %d",
        args.port,
        args.control_port,
        ssh_port,
    )

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()

    log.info("stopping")
    # Only the instance sshds outlive this process; the servers' threads end with it.
    ec2.agent.stop()


if __name__ == "__main__":
    main()
