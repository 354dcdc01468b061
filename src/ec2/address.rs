//! Waiting for a launched instance to be running with the address spotrun connects to.
//!
//! The SDK's own waiter polls every 15 s, which would add seconds to every job; this one starts
//! at 100 ms and grows to 1 s. It does not try to reach the address: that is the SSH step's job.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use super::instances::status_of;
use super::{AddressKind, Ec2, InstanceStatus};

const FIRST_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(1);

/// EC2 assigns addresses before an instance reaches `running`; one still missing a little while
/// after is never coming (a subnet that does not assign public addresses).
const RUNNING_WITHOUT_ADDRESS_GRACE: Duration = Duration::from_secs(5);

/// The instance shut down or terminated before it became reachable, for example because the spot
/// service took it back. Callers downcast to this to tell an interruption from other failures.
#[derive(Debug, thiserror::Error)]
pub struct InstanceGone {
    pub instance_id: String,
    pub status: InstanceStatus,
}

impl fmt::Display for InstanceGone {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "Instance {} is {} and was never reachable",
            self.instance_id, self.status.state
        )?;
        match (
            &self.status.state_reason_code,
            &self.status.state_reason_message,
        ) {
            (_, Some(message)) => write!(formatter, ": {message}"),
            (Some(code), None) => write!(formatter, ": {code}"),
            (None, None) => Ok(()),
        }
    }
}

impl fmt::Display for AddressKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            AddressKind::Public => "public",
            AddressKind::Private => "private",
        })
    }
}

impl Ec2 {
    /// Polls until the instance is running and has an address of `kind`, with a short growing
    /// backoff. Fails with [`InstanceGone`] if the instance shuts down first, or when `deadline`
    /// passes.
    pub async fn wait_for_address(
        &self,
        instance_id: &str,
        kind: AddressKind,
        deadline: Instant,
    ) -> anyhow::Result<IpAddr> {
        let mut delay = FIRST_POLL;
        let mut last_state = String::from("unknown");
        let mut running_since: Option<Instant> = None;
        loop {
            tokio::time::sleep_until((Instant::now() + delay).min(deadline)).await;

            // Right after RunInstances the instance may not be visible yet; keep polling.
            if let Some(instance) = self.describe_instance(instance_id).await? {
                let status = status_of(&instance);
                if status.is_gone() {
                    return Err(InstanceGone {
                        instance_id: instance_id.to_owned(),
                        status,
                    }
                    .into());
                }

                if status.state == "running" {
                    if let Some(address) = address_of(&instance, kind) {
                        let address: IpAddr = address.parse().with_context(|| {
                            format!("Instance {instance_id} has an unreadable address `{address}`")
                        })?;
                        tracing::info!(instance = %instance_id, %address, "running");
                        return Ok(address);
                    }
                    let since = *running_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > RUNNING_WITHOUT_ADDRESS_GRACE {
                        anyhow::bail!(
                            "Instance {instance_id} is running but has no {kind} address; \
                             hint: launch it in a subnet that assigns public addresses, or \
                             connect to its private address"
                        );
                    }
                }
                last_state = status.state;
            }
            tracing::debug!(instance = instance_id, state = %last_state, "waiting for address");

            if Instant::now() >= deadline {
                anyhow::bail!(
                    "Timed out waiting for instance {instance_id} to be running with a {kind} \
                     address (last state: {last_state})"
                );
            }
            delay = (delay * 2).min(MAX_POLL);
        }
    }
}

fn address_of(instance: &aws_sdk_ec2::types::Instance, kind: AddressKind) -> Option<&str> {
    match kind {
        AddressKind::Public => instance.public_ip_address(),
        AddressKind::Private => instance.private_ip_address(),
    }
}
