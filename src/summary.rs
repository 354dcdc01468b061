//! The closing summary of a run: one line on stderr, and the same as JSON when asked.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::ec2::Lifecycle;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub run_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceSummary>,
    pub wall_seconds: f64,
    pub outcome: String,
    pub exit_code: i32,
}

#[derive(Debug, Serialize)]
pub struct InstanceSummary {
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    pub availability_zone: String,
    pub market: Lifecycle,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_per_hour_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<f64>,
}

impl Summary {
    pub fn set_wall(&mut self, wall: Duration) {
        self.wall_seconds = (wall.as_secs_f64() * 1000.0).round() / 1000.0;
    }

    pub fn line(&self) -> String {
        let mut line = format!("spotrun: run={}", self.run_id);
        if let Some(host) = &self.host {
            line.push_str(&format!(" host={host}"));
        }
        if let Some(instance) = &self.instance {
            let market = match instance.market {
                Lifecycle::Spot => "spot",
                Lifecycle::OnDemand => "on-demand",
            };
            line.push_str(&format!(
                " instance={} type={} zone={} market={market}",
                instance.instance_id, instance.instance_type, instance.availability_zone
            ));
        }
        line.push_str(&format!(" wall={:.1}s", self.wall_seconds));
        if let Some(instance) = &self.instance {
            match instance.estimated_cost_usd {
                Some(cost) if cost < 0.0001 => line.push_str(" cost<$0.0001"),
                Some(cost) => line.push_str(&format!(" cost≈${cost:.4}")),
                None => line.push_str(" cost=unknown"),
            }
        }
        line.push_str(&format!(
            " outcome=\"{}\" exit={}",
            self.outcome, self.exit_code
        ));
        line
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("summary serializes");
        std::fs::write(path, json + "\n")
            .with_context(|| format!("Failed to write the summary to `{}`", path.display()))
    }
}
