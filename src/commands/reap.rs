//! `spotrun reap`: terminate spotrun instances whose `spotrun:expires-at` has passed, the safety
//! net for runs whose spotrun was killed before it could clean up.

use std::time::SystemTime;

use anyhow::Result;

use crate::ec2::{self, Ec2};
use crate::settings::AwsSettings;

pub async fn reap(aws: &AwsSettings, dry_run: bool) -> Result<i32> {
    let ec2 = Ec2::connect(aws.region.as_deref(), aws.endpoint_url.as_deref()).await?;
    let reaped = ec2::reap(&ec2, SystemTime::now(), dry_run).await?;
    let verb = if dry_run {
        "would terminate"
    } else {
        "terminated"
    };
    for instance in &reaped {
        let expired = instance
            .expires_at
            .map(|at| humantime::format_rfc3339_seconds(at).to_string())
            .unwrap_or_default();
        println!(
            "{verb} {} (run {}, expired {expired})",
            instance.instance_id, instance.run_id
        );
    }
    tracing::info!(count = reaped.len(), dry_run, "reap done");
    Ok(0)
}
