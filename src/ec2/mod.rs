//! EC2: launching, reaching and terminating the instances spotrun runs jobs on.
//!
//! This module owns the AWS client and the vocabulary the rest of spotrun uses to talk about
//! instances (markets, lifecycles, states). The steps live in their own files: `launch` (the
//! RunInstances parameters), `candidates` (what each attempt tries, and when to move on),
//! `address` (waiting for an address), `instances` (status, termination, listing and reaping),
//! `tags`, `user_data`, `pricing`, `security_group` and `ecr`. It does not know about SSH,
//! Docker or signals; the caller decides when to terminate.

pub mod address;
mod candidates;
pub mod ecr;
pub mod instances;
pub mod launch;
pub mod pricing;
pub mod security_group;
pub mod tags;
pub mod user_data;

use std::fmt::Display;
use std::time::SystemTime;

use anyhow::Context as _;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::ProvideErrorMetadata;

pub use instances::reap;
pub use launch::{LaunchError, LaunchRequest};

/// A connection to the EC2 API of one region.
#[derive(Clone, Debug)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    region: String,
}

impl Ec2 {
    /// Region and credentials from the standard aws-config chain; `region` and `endpoint_url`
    /// override.
    pub async fn connect(region: Option<&str>, endpoint_url: Option<&str>) -> anyhow::Result<Ec2> {
        let config = load_config(region, endpoint_url).await?;
        let region = config_region(&config)?;
        Ok(Ec2 {
            client: aws_sdk_ec2::Client::new(&config),
            region,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }
}

/// Loads the shared AWS configuration, applying the caller's overrides on top of the chain.
pub(crate) async fn load_config(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> anyhow::Result<SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(endpoint_url) = endpoint_url {
        loader = loader.endpoint_url(endpoint_url);
    }
    Ok(loader.load().await)
}

pub(crate) fn config_region(config: &SdkConfig) -> anyhow::Result<String> {
    config
        .region()
        .map(|region| region.to_string())
        .context("No AWS region is configured: pass --region or set AWS_REGION")
}

/// Which market an instance was bought on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Market {
    Spot,
    OnDemand,
    /// Spot first; on-demand only after every spot candidate hit a capacity error.
    SpotThenOnDemand,
}

/// How a launched instance is billed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    Spot,
    OnDemand,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Spot => "spot",
            Lifecycle::OnDemand => "on-demand",
        }
    }

    fn of(instance: &aws_sdk_ec2::types::Instance) -> Lifecycle {
        match instance.instance_lifecycle() {
            Some(aws_sdk_ec2::types::InstanceLifecycleType::Spot) => Lifecycle::Spot,
            _ => Lifecycle::OnDemand,
        }
    }
}

impl Display for Lifecycle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Which of the instance's addresses the caller connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressKind {
    Public,
    Private,
}

/// An instance as RunInstances reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub lifecycle: Lifecycle,
    pub subnet_id: Option<String>,
}

/// One look at a running job's instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// pending, running, shutting-down, terminated, stopping or stopped.
    pub state: String,
    pub state_reason_code: Option<String>,
    pub state_reason_message: Option<String>,
    pub lifecycle: Lifecycle,
}

/// The reason code EC2 records when the spot service takes an instance back.
const SPOT_TERMINATION: &str = "Server.SpotInstanceTermination";

/// Reason codes of the shutdowns someone on the customer's side asked for: a TerminateInstances
/// call, or a power-off from inside (the dead-man timer).
const REQUESTED_SHUTDOWNS: [&str; 2] = [
    "Client.UserInitiatedShutdown",
    "Client.InstanceInitiatedShutdown",
];

impl InstanceStatus {
    pub fn is_gone(&self) -> bool {
        matches!(
            self.state.as_str(),
            "shutting-down" | "terminated" | "stopping" | "stopped"
        )
    }

    /// Whether the instance went away without being asked: the spot service reclaimed it.
    pub fn was_interrupted(&self) -> bool {
        if !self.is_gone() {
            return false;
        }
        let code = self.state_reason_code.as_deref();
        if code == Some(SPOT_TERMINATION) {
            return true;
        }
        self.lifecycle == Lifecycle::Spot && !code.is_some_and(|c| REQUESTED_SHUTDOWNS.contains(&c))
    }
}

/// One of spotrun's live instances, as `list` and `reap` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedInstance {
    pub instance_id: String,
    pub instance_type: String,
    pub lifecycle: Lifecycle,
    pub state: String,
    pub launch_time: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    pub run_id: String,
}

/// Wraps an AWS SDK error with the "Failed to …" context, keeping the service's error code and
/// message, which the SDK's own Display ("service error") hides.
pub(crate) trait AwsContext<T> {
    fn aws_context<C: Display + Send + Sync + 'static>(
        self,
        context: impl FnOnce() -> C,
    ) -> anyhow::Result<T>;
}

impl<T, E> AwsContext<T> for Result<T, E>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn aws_context<C: Display + Send + Sync + 'static>(
        self,
        context: impl FnOnce() -> C,
    ) -> anyhow::Result<T> {
        self.map_err(|error| anyhow::anyhow!(describe_error(&error)).context(context()))
    }
}

/// `Code: message` for a service error; the chain of sources for anything else (a refused
/// connection, missing credentials).
pub(crate) fn describe_error<E>(error: &E) -> String
where
    E: ProvideErrorMetadata + std::error::Error,
{
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => {
            let mut text = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, code: Option<&str>, lifecycle: Lifecycle) -> InstanceStatus {
        InstanceStatus {
            state: state.to_owned(),
            state_reason_code: code.map(str::to_owned),
            state_reason_message: None,
            lifecycle,
        }
    }

    #[test]
    fn a_running_instance_is_neither_gone_nor_interrupted() {
        let running = status("running", None, Lifecycle::Spot);
        assert!(!running.is_gone());
        assert!(!running.was_interrupted());
    }

    #[test]
    fn spot_termination_reason_is_an_interruption() {
        let reclaimed = status("terminated", Some(SPOT_TERMINATION), Lifecycle::OnDemand);
        assert!(reclaimed.was_interrupted());
    }

    #[test]
    fn a_requested_termination_is_not_an_interruption() {
        for code in REQUESTED_SHUTDOWNS {
            let terminated = status("shutting-down", Some(code), Lifecycle::Spot);
            assert!(terminated.is_gone());
            assert!(!terminated.was_interrupted());
        }
    }

    #[test]
    fn a_spot_instance_gone_for_an_unknown_reason_was_interrupted() {
        assert!(status("stopped", None, Lifecycle::Spot).was_interrupted());
        assert!(!status("stopped", None, Lifecycle::OnDemand).was_interrupted());
    }
}
