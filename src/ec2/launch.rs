//! Launching one instance: the RunInstances parameters every attempt carries (IMDSv2, encrypted
//! gp3 root, terminate on shutdown, tags, user-data) and the walk through the candidates that
//! `candidates` orders.
//!
//! A launch returns as soon as RunInstances answers; waiting for the instance to be reachable is
//! `address`'s job, and terminating it on every path is the caller's.

use std::time::SystemTime;

use anyhow::Context as _;
use aws_sdk_ec2::error::ProvideErrorMetadata as _;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, MarketType, ShutdownBehavior, SpotInstanceType,
    SpotMarketOptions, VolumeType,
};
use base64::Engine as _;

use super::candidates::{Candidate, candidates, client_token, is_capacity_error};
use super::tags::{run_tags, tag_specifications};
use super::{AwsContext as _, Ec2, Instance, Lifecycle, Market, describe_error};

/// What to launch for one run.
#[derive(Clone, Debug)]
pub struct LaunchRequest {
    pub run_id: String,
    pub ami: String,
    /// In order of preference, at least one.
    pub instance_types: Vec<String>,
    /// May be empty: then no subnet is named and EC2 picks the default one.
    pub subnets: Vec<String>,
    /// Security group ids; may be empty.
    pub security_groups: Vec<String>,
    pub market: Market,
    pub max_price: Option<String>,
    /// Size of the root volume, which is gp3 and encrypted always.
    pub volume_size_gib: Option<i32>,
    /// A name, or an ARN when it starts with `arn:`.
    pub iam_instance_profile: Option<String>,
    /// The user's tags, in addition to spotrun's own.
    pub tags: Vec<(String, String)>,
    pub expires_at: SystemTime,
    /// Plain text; `launch` base64-encodes it.
    pub user_data: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Every candidate hit a capacity error.
    #[error("No capacity for any candidate: {}", attempts.join("; "))]
    NoCapacity { attempts: Vec<String> },
    /// Any other AWS error, with context.
    #[error(transparent)]
    Aws(anyhow::Error),
}

/// Used when the AMI does not name its root device. Amazon Linux boots from /dev/xvda, most
/// other distributions' AMIs from /dev/sda1.
fn fallback_root_device(image_name: Option<&str>) -> &'static str {
    let name = image_name.unwrap_or_default().to_ascii_lowercase();
    if name.contains("amzn") || name.contains("al2023") || name.contains("amazon linux") {
        "/dev/xvda"
    } else {
        "/dev/sda1"
    }
}

impl Ec2 {
    /// Tries each candidate in order until one launches; see `candidates` for the order.
    pub async fn launch(&self, request: &LaunchRequest) -> Result<Instance, LaunchError> {
        if request.instance_types.is_empty() {
            return Err(LaunchError::Aws(anyhow::anyhow!(
                "No instance type to launch: name at least one"
            )));
        }
        let root_device = self
            .root_device(&request.ami)
            .await
            .map_err(LaunchError::Aws)?;
        let root_volume = root_volume(
            &root_device.name,
            request.volume_size_gib.or(root_device.size_gib),
        );
        let tags = tag_specifications(&run_tags(
            &request.run_id,
            request.expires_at,
            &request.tags,
        ));
        let user_data = base64::engine::general_purpose::STANDARD.encode(&request.user_data);

        let mut attempts = Vec::new();
        for (attempt, candidate) in candidates(request).into_iter().enumerate() {
            let market = candidate.lifecycle.as_str();
            let subnet = candidate.subnet.unwrap_or("default");
            let place = match candidate.subnet {
                Some(subnet) => format!("subnet {subnet}"),
                None => "the default subnet".to_owned(),
            };
            let mut run = self
                .client
                .run_instances()
                .image_id(&request.ami)
                .instance_type(InstanceType::from(candidate.instance_type))
                .min_count(1)
                .max_count(1)
                .client_token(client_token(&request.run_id, attempt))
                .user_data(&user_data)
                .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                .metadata_options(metadata_options())
                .block_device_mappings(root_volume.clone())
                .set_tag_specifications(Some(tags.clone()))
                .set_subnet_id(candidate.subnet.map(str::to_owned))
                .set_iam_instance_profile(request.iam_instance_profile.as_deref().map(profile));
            for security_group in &request.security_groups {
                run = run.security_group_ids(security_group);
            }
            if candidate.lifecycle == Lifecycle::Spot {
                run = run.instance_market_options(spot_market(request.max_price.as_deref()));
            }

            let error = match run.send().await {
                Ok(output) => {
                    let instance = output
                        .instances()
                        .first()
                        .context("RunInstances answered without an instance")
                        .map_err(LaunchError::Aws)?;
                    let instance = launched(instance, &candidate).map_err(LaunchError::Aws)?;
                    tracing::info!(
                        instance = %instance.instance_id,
                        instance_type = %instance.instance_type,
                        availability_zone = %instance.availability_zone,
                        market,
                        "launched"
                    );
                    return Ok(instance);
                }
                Err(error) => error,
            };

            let code = error.code().unwrap_or_default().to_owned();
            if !is_capacity_error(&code) {
                return Err(LaunchError::Aws(
                    anyhow::anyhow!(describe_error(&error)).context(format!(
                        "Failed to launch {} ({market}) from `{}` in {place}",
                        candidate.instance_type, request.ami
                    )),
                ));
            }
            tracing::info!(
                instance_type = candidate.instance_type,
                subnet,
                market,
                reason = %code,
                "no capacity, trying the next candidate"
            );
            attempts.push(format!(
                "{} ({market}) in {place}: {code}",
                candidate.instance_type
            ));
        }
        Err(LaunchError::NoCapacity { attempts })
    }

    /// The AMI's root device, so that the encrypted gp3 mapping replaces the root volume instead
    /// of adding a second disk.
    async fn root_device(&self, ami: &str) -> anyhow::Result<RootDevice> {
        let output = match self.client.describe_images().image_ids(ami).send().await {
            Err(error) if error.code() == Some("UnauthorizedOperation") => {
                tracing::warn!(
                    ami,
                    "not allowed to describe the AMI; guessing its root device"
                );
                return Ok(RootDevice {
                    name: fallback_root_device(None).to_owned(),
                    size_gib: None,
                });
            }
            result => result.aws_context(|| format!("Failed to describe the AMI `{ami}`"))?,
        };
        let image = output
            .images()
            .first()
            .with_context(|| format!("AMI `{ami}` not found in {}", self.region))?;

        let name = match image.root_device_name() {
            Some(name) => name.to_owned(),
            None => fallback_root_device(image.name()).to_owned(),
        };
        let size_gib = image
            .block_device_mappings()
            .iter()
            .find(|mapping| mapping.device_name() == Some(name.as_str()))
            .and_then(|mapping| mapping.ebs())
            .and_then(|ebs| ebs.volume_size());
        Ok(RootDevice { name, size_gib })
    }
}

struct RootDevice {
    name: String,
    /// The size of the AMI's root snapshot. EC2 would inherit it, but some implementations of the
    /// API (the local cloud's emulator) insist on a size or snapshot in every mapping.
    size_gib: Option<i32>,
}

/// IMDSv2 only, and a hop limit of 1 so that containers cannot reach the instance's credentials.
fn metadata_options() -> InstanceMetadataOptionsRequest {
    InstanceMetadataOptionsRequest::builder()
        .http_tokens(HttpTokensState::Required)
        .http_put_response_hop_limit(1)
        .http_endpoint(InstanceMetadataEndpointState::Enabled)
        .build()
}

fn root_volume(device_name: &str, size_gib: Option<i32>) -> BlockDeviceMapping {
    let ebs = EbsBlockDevice::builder()
        .encrypted(true)
        .volume_type(VolumeType::Gp3)
        .delete_on_termination(true)
        .set_volume_size(size_gib)
        .build();
    BlockDeviceMapping::builder()
        .device_name(device_name)
        .ebs(ebs)
        .build()
}

fn spot_market(max_price: Option<&str>) -> InstanceMarketOptionsRequest {
    let spot_options = SpotMarketOptions::builder()
        .spot_instance_type(SpotInstanceType::OneTime)
        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
        .set_max_price(max_price.map(str::to_owned))
        .build();
    InstanceMarketOptionsRequest::builder()
        .market_type(MarketType::Spot)
        .spot_options(spot_options)
        .build()
}

fn profile(name_or_arn: &str) -> IamInstanceProfileSpecification {
    let builder = IamInstanceProfileSpecification::builder();
    if name_or_arn.starts_with("arn:") {
        builder.arn(name_or_arn).build()
    } else {
        builder.name(name_or_arn).build()
    }
}

fn launched(
    instance: &aws_sdk_ec2::types::Instance,
    candidate: &Candidate<'_>,
) -> anyhow::Result<Instance> {
    let instance_id = instance
        .instance_id()
        .context("RunInstances answered without an instance id")?;
    Ok(Instance {
        instance_id: instance_id.to_owned(),
        instance_type: instance
            .instance_type()
            .map_or(candidate.instance_type, |instance_type| {
                instance_type.as_str()
            })
            .to_owned(),
        availability_zone: instance
            .placement()
            .and_then(|placement| placement.availability_zone())
            .unwrap_or_default()
            .to_owned(),
        lifecycle: candidate.lifecycle,
        subnet_id: instance.subnet_id().or(candidate.subnet).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amazon_linux_falls_back_to_xvda_and_others_to_sda1() {
        assert_eq!(fallback_root_device(Some("al2023-ami-2023.6")), "/dev/xvda");
        assert_eq!(fallback_root_device(Some("amzn2-ami-hvm")), "/dev/xvda");
        assert_eq!(fallback_root_device(Some("debian-12-amd64")), "/dev/sda1");
        assert_eq!(fallback_root_device(None), "/dev/sda1");
    }

    #[test]
    fn instance_profile_is_an_arn_only_with_the_arn_prefix() {
        let by_arn = profile("arn:aws:iam::123456789012:instance-profile/runner");
        assert!(by_arn.arn().is_some() && by_arn.name().is_none());
        let by_name = profile("runner");
        assert_eq!(by_name.name(), Some("runner"));
    }
}
