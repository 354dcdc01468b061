//! `spotrun ls`: spotrun's live instances, one per line on stdout.

use std::time::SystemTime;

use anyhow::Result;

use crate::ec2::{Ec2, Lifecycle, ListedInstance};
use crate::settings::AwsSettings;

pub async fn ls(aws: &AwsSettings) -> Result<i32> {
    let ec2 = Ec2::connect(aws.region.as_deref(), aws.endpoint_url.as_deref()).await?;
    let instances = ec2.list().await?;
    println!(
        "{:<20} {:<14} {:<10} {:<13} {:>8}  {:<20} RUN",
        "INSTANCE", "TYPE", "MARKET", "STATE", "AGE", "EXPIRES-AT"
    );
    let now = SystemTime::now();
    for instance in &instances {
        println!("{}", row(instance, now));
    }
    Ok(0)
}

fn row(instance: &ListedInstance, now: SystemTime) -> String {
    let market = match instance.lifecycle {
        Lifecycle::Spot => "spot",
        Lifecycle::OnDemand => "on-demand",
    };
    let age = instance
        .launch_time
        .and_then(|launched| now.duration_since(launched).ok())
        .map(|age| {
            humantime::format_duration(std::time::Duration::from_secs(age.as_secs())).to_string()
        })
        .unwrap_or_else(|| "-".to_owned());
    let expires = instance
        .expires_at
        .map(|at| humantime::format_rfc3339_seconds(at).to_string())
        .unwrap_or_else(|| "-".to_owned());
    format!(
        "{:<20} {:<14} {:<10} {:<13} {:>8}  {:<20} {}",
        instance.instance_id,
        instance.instance_type,
        market,
        instance.state,
        age,
        expires,
        instance.run_id
    )
}
