//! Looking at and ending spotrun's instances: one instance's status, termination by id or by
//! run, the list of live instances, and reaping the expired ones.
//!
//! Everything here finds instances through DescribeInstances and spotrun's tags; it keeps no
//! state of its own, so it works the same from the run that launched an instance and from a
//! later `spotrun reap` or `spotrun list`.

use std::time::{Duration, SystemTime};

use aws_sdk_ec2::error::ProvideErrorMetadata as _;
use aws_sdk_ec2::types::Filter;

use super::tags::{EXPIRES_AT, RUN_ID, parse_expires_at, tag_value};
use super::{AwsContext as _, Ec2, InstanceStatus, Lifecycle, ListedInstance};

const NOT_FOUND: &str = "InvalidInstanceID.NotFound";

/// The states of an instance that still costs money or may still run a job.
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// How long a TerminateInstances may keep answering "not found". Right after RunInstances an
/// instance can be invisible to the API for a few seconds (eventual consistency); giving up at
/// once would leave it running when a signal arrives just after the launch.
const TERMINATE_NOT_FOUND_PATIENCE: Duration = Duration::from_secs(10);

impl Ec2 {
    /// One instance by id; `None` while the API does not know it (yet, or any longer).
    pub(super) async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> anyhow::Result<Option<aws_sdk_ec2::types::Instance>> {
        let output = match self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Err(error) if error.code() == Some(NOT_FOUND) => return Ok(None),
            result => {
                result.aws_context(|| format!("Failed to describe instance {instance_id}"))?
            }
        };
        Ok(output
            .reservations()
            .iter()
            .flat_map(|reservation| reservation.instances())
            .find(|instance| instance.instance_id() == Some(instance_id))
            .cloned())
    }

    /// An instance the API no longer knows is reported as terminated: EC2 forgets terminated
    /// instances about an hour after the fact.
    pub async fn status(&self, instance_id: &str) -> anyhow::Result<InstanceStatus> {
        Ok(match self.describe_instance(instance_id).await? {
            Some(instance) => status_of(&instance),
            None => InstanceStatus {
                state: "terminated".to_owned(),
                state_reason_code: None,
                state_reason_message: None,
                lifecycle: Lifecycle::OnDemand,
            },
        })
    }

    pub async fn terminate(&self, instance_ids: &[String]) -> anyhow::Result<()> {
        if instance_ids.is_empty() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            let result = self
                .client
                .terminate_instances()
                .set_instance_ids(Some(instance_ids.to_vec()))
                .send()
                .await;
            match result {
                Err(error)
                    if error.code() == Some(NOT_FOUND)
                        && started.elapsed() < TERMINATE_NOT_FOUND_PATIENCE =>
                {
                    tracing::debug!(instances = ?instance_ids, "not visible yet, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) if error.code() == Some(NOT_FOUND) => {
                    tracing::warn!(instances = ?instance_ids, "instances not found; assuming gone");
                    return Ok(());
                }
                result => {
                    result.aws_context(|| {
                        format!("Failed to terminate instances {}", instance_ids.join(", "))
                    })?;
                    tracing::debug!(instances = ?instance_ids, "TerminateInstances");
                    return Ok(());
                }
            }
        }
    }

    /// Finds every not-yet-terminated instance tagged with the run id and terminates it; this
    /// covers a RunInstances call whose answer was lost to a signal. Returns the ids terminated.
    pub async fn terminate_run(&self, run_id: &str) -> anyhow::Result<Vec<String>> {
        let tag_filter = Filter::builder()
            .name(format!("tag:{RUN_ID}"))
            .values(run_id)
            .build();
        let instance_ids: Vec<String> = self
            .describe_live(tag_filter)
            .await
            .map_err(|error| {
                error.context(format!("Failed to find the instances of run {run_id}"))
            })?
            .iter()
            .filter_map(|instance| instance.instance_id().map(str::to_owned))
            .collect();
        self.terminate(&instance_ids).await?;
        Ok(instance_ids)
    }

    /// spotrun's live instances: those with a `spotrun:run-id` tag that are not yet shutting
    /// down.
    pub async fn list(&self) -> anyhow::Result<Vec<ListedInstance>> {
        let tag_filter = Filter::builder().name("tag-key").values(RUN_ID).build();
        let instances = self
            .describe_live(tag_filter)
            .await
            .map_err(|error| error.context("Failed to list spotrun's instances"))?;
        Ok(instances.iter().filter_map(listed).collect())
    }

    async fn describe_live(
        &self,
        tag_filter: Filter,
    ) -> anyhow::Result<Vec<aws_sdk_ec2::types::Instance>> {
        let state_filter = LIVE_STATES
            .into_iter()
            .fold(
                Filter::builder().name("instance-state-name"),
                |builder, state| builder.values(state),
            )
            .build();
        let reservations = self
            .client
            .describe_instances()
            .filters(tag_filter)
            .filters(state_filter)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .aws_context(|| "DescribeInstances failed")?;
        Ok(reservations
            .into_iter()
            .flat_map(|reservation| reservation.instances.unwrap_or_default())
            .collect())
    }
}

/// Terminates instances whose `spotrun:expires-at` is before `now`; with `dry_run` only lists
/// them. Instances without a readable expiry are left alone: they may not be spotrun's to end.
pub async fn reap(
    ec2: &Ec2,
    now: SystemTime,
    dry_run: bool,
) -> anyhow::Result<Vec<ListedInstance>> {
    let expired: Vec<ListedInstance> = ec2
        .list()
        .await?
        .into_iter()
        .filter(|instance| {
            instance
                .expires_at
                .is_some_and(|expires_at| expires_at < now)
        })
        .collect();
    if dry_run || expired.is_empty() {
        return Ok(expired);
    }

    let instance_ids: Vec<String> = expired.iter().map(|i| i.instance_id.clone()).collect();
    ec2.terminate(&instance_ids).await?;
    Ok(expired)
}

pub(super) fn status_of(instance: &aws_sdk_ec2::types::Instance) -> InstanceStatus {
    let reason = instance.state_reason();
    InstanceStatus {
        state: instance
            .state()
            .and_then(|state| state.name())
            .map_or("unknown", |name| name.as_str())
            .to_owned(),
        state_reason_code: non_empty(reason.and_then(|r| r.code())),
        state_reason_message: non_empty(reason.and_then(|r| r.message())),
        lifecycle: Lifecycle::of(instance),
    }
}

/// Some EC2 implementations answer an empty state reason instead of none.
fn non_empty(text: Option<&str>) -> Option<String> {
    text.filter(|text| !text.is_empty()).map(str::to_owned)
}

fn listed(instance: &aws_sdk_ec2::types::Instance) -> Option<ListedInstance> {
    let tags = instance.tags();
    Some(ListedInstance {
        instance_id: instance.instance_id()?.to_owned(),
        instance_type: instance
            .instance_type()
            .map(|instance_type| instance_type.as_str().to_owned())
            .unwrap_or_default(),
        lifecycle: Lifecycle::of(instance),
        state: status_of(instance).state,
        launch_time: instance
            .launch_time()
            .and_then(|launch_time| SystemTime::try_from(*launch_time).ok()),
        expires_at: tag_value(tags, EXPIRES_AT).and_then(parse_expires_at),
        run_id: tag_value(tags, RUN_ID)?.to_owned(),
    })
}
