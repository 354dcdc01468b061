//! The security group that lets the caller reach an instance's sshd when the user names none.
//!
//! A VPC's default group admits only its own members, so without a group of its own a launch
//! would boot an instance nobody can reach. spotrun keeps one group per VPC and source range,
//! named after the range and reused by every run, rather than one per run: deleting a group
//! has to wait until its instance is fully terminated (a minute or more on EC2), which would
//! hold every run's exit for no gain. The group admits TCP on the SSH port only; what keeps
//! others out is the per-run key and the pinned host key, and `--ssh-cidr` narrows the range.

use anyhow::Context as _;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, ResourceType, Tag, TagSpecification};

use super::{AwsContext as _, Ec2};

const DUPLICATE: &str = "InvalidGroup.Duplicate";
const MANAGED_TAG: &str = "spotrun:managed";

/// The group's name: stable for a VPC and range, so that runs find and share it.
pub fn group_name(cidr: &str, port: u16) -> String {
    let range: String = cidr
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("spotrun-ssh-{port}-from-{range}")
}

impl Ec2 {
    /// The id of spotrun's SSH group in the VPC of `subnet` (the default VPC without one),
    /// created on first use.
    pub async fn ssh_security_group(
        &self,
        subnet: Option<&str>,
        cidr: &str,
        port: u16,
    ) -> anyhow::Result<String> {
        let vpc_id = self.vpc_of(subnet).await?;
        let name = group_name(cidr, port);
        if let Some(group_id) = self.find_group(&vpc_id, &name).await? {
            return Ok(group_id);
        }

        let created = self
            .client
            .create_security_group()
            .group_name(&name)
            .description(format!("spotrun: SSH on port {port} from {cidr}"))
            .vpc_id(&vpc_id)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .tags(Tag::builder().key("Name").value(&name).build())
                    .tags(Tag::builder().key(MANAGED_TAG).value("ssh").build())
                    .build(),
            )
            .send()
            .await;
        let group_id = match created {
            Ok(output) => output
                .group_id()
                .context("CreateSecurityGroup named no group")?
                .to_owned(),
            // Another run created it meanwhile; use theirs.
            Err(error) if error.code() == Some(DUPLICATE) => {
                return self
                    .find_group(&vpc_id, &name)
                    .await?
                    .with_context(|| format!("security group `{name}` exists but was not found"));
            }
            Err(error) => {
                return Err(error).aws_context(|| {
                    format!("Failed to create the security group `{name}` in {vpc_id}")
                });
            }
        };

        let rule = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(i32::from(port))
            .to_port(i32::from(port))
            .ip_ranges(
                IpRange::builder()
                    .cidr_ip(cidr)
                    .description("spotrun SSH")
                    .build(),
            )
            .build();
        self.client
            .authorize_security_group_ingress()
            .group_id(&group_id)
            .ip_permissions(rule)
            .send()
            .await
            .aws_context(|| format!("Failed to open port {port} from {cidr} in {group_id}"))?;
        let (group, vpc) = (&group_id, &vpc_id);
        tracing::info!(%group, %vpc, %cidr, port, "created the SSH security group");
        Ok(group_id)
    }

    async fn vpc_of(&self, subnet: Option<&str>) -> anyhow::Result<String> {
        let vpc_id = match subnet {
            Some(subnet) => self
                .client
                .describe_subnets()
                .subnet_ids(subnet)
                .send()
                .await
                .aws_context(|| format!("Failed to look up subnet {subnet}"))?
                .subnets()
                .first()
                .and_then(|found| found.vpc_id().map(str::to_owned)),
            None => self
                .client
                .describe_vpcs()
                .filters(Filter::builder().name("is-default").values("true").build())
                .send()
                .await
                .aws_context(|| "Failed to look up the default VPC")?
                .vpcs()
                .first()
                .and_then(|found| found.vpc_id().map(str::to_owned)),
        };
        vpc_id.context("No VPC to launch in: the region has no default VPC; name a --subnet")
    }

    async fn find_group(&self, vpc_id: &str, name: &str) -> anyhow::Result<Option<String>> {
        let output = self
            .client
            .describe_security_groups()
            .filters(Filter::builder().name("vpc-id").values(vpc_id).build())
            .filters(Filter::builder().name("group-name").values(name).build())
            .send()
            .await
            .aws_context(|| format!("Failed to look up the security group `{name}`"))?;
        Ok(output
            .security_groups()
            .first()
            .and_then(|group| group.group_id().map(str::to_owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_stable_and_valid_for_ec2() {
        assert_eq!(group_name("0.0.0.0/0", 22), "spotrun-ssh-22-from-0-0-0-0-0");
        assert_eq!(
            group_name("203.0.113.7/32", 2222),
            "spotrun-ssh-2222-from-203-0-113-7-32"
        );
    }
}
