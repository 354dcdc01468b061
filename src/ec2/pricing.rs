//! What a run costs: the current spot price from EC2, a shipped table of on-demand prices, and
//! the estimate of a run's cost under per-second billing.
//!
//! The estimate is for the closing summary only; nothing here decides what to launch.

use std::time::{Duration, SystemTime};

use aws_sdk_ec2::primitives::DateTime;
use aws_sdk_ec2::types::InstanceType;

use super::{AwsContext as _, Ec2};

/// Approximate on-demand list prices in USD per hour, Linux, us-east-1, as published in
/// 2024–2025. Other regions usually cost a little more; the table exists so that the summary
/// can show an order of magnitude without the Pricing API, which needs its own endpoint and
/// permission.
const ON_DEMAND_US_EAST_1: &[(&str, f64)] = &[
    ("t3.micro", 0.0104),
    ("t3.small", 0.0208),
    ("t3.medium", 0.0416),
    ("t3.large", 0.0832),
    ("t3.xlarge", 0.1664),
    ("t3.2xlarge", 0.3328),
    ("t3a.micro", 0.0094),
    ("t3a.small", 0.0188),
    ("t3a.medium", 0.0376),
    ("t3a.large", 0.0752),
    ("t3a.xlarge", 0.1504),
    ("t3a.2xlarge", 0.3008),
    ("t4g.small", 0.0168),
    ("t4g.medium", 0.0336),
    ("t4g.large", 0.0672),
    ("m5.large", 0.096),
    ("m5.xlarge", 0.192),
    ("m5.2xlarge", 0.384),
    ("m5.4xlarge", 0.768),
    ("m6i.large", 0.096),
    ("m6i.xlarge", 0.192),
    ("m6i.2xlarge", 0.384),
    ("m6i.4xlarge", 0.768),
    ("m6g.large", 0.077),
    ("m6g.xlarge", 0.154),
    ("m7i.large", 0.1008),
    ("m7i.xlarge", 0.2016),
    ("c5.large", 0.085),
    ("c5.xlarge", 0.17),
    ("c5.2xlarge", 0.34),
    ("c5.4xlarge", 0.68),
    ("c6i.large", 0.085),
    ("c6i.xlarge", 0.17),
    ("c6i.2xlarge", 0.34),
    ("c6i.4xlarge", 0.68),
    ("c6g.large", 0.068),
    ("c6g.xlarge", 0.136),
    ("c7i.large", 0.08925),
    ("c7i.xlarge", 0.1785),
    ("r5.large", 0.126),
    ("r5.xlarge", 0.252),
    ("r5.2xlarge", 0.504),
    ("r6i.large", 0.126),
    ("r6i.xlarge", 0.252),
    ("r6i.2xlarge", 0.504),
];

/// EC2 bills Linux instances per second, with a minimum of one minute.
const MINIMUM_BILLED: Duration = Duration::from_secs(60);

pub fn on_demand_price(instance_type: &str) -> Option<f64> {
    ON_DEMAND_US_EAST_1
        .iter()
        .find(|(name, _)| *name == instance_type)
        .map(|&(_, price)| price)
}

/// The cost in USD of `wall` time at `price_per_hour`, billed per started second.
pub fn estimate(price_per_hour: f64, wall: Duration) -> f64 {
    let billed_seconds = wall.max(MINIMUM_BILLED).as_secs_f64().ceil();
    price_per_hour * billed_seconds / 3600.0
}

impl Ec2 {
    /// The latest spot price (USD per hour) of a Linux instance of the type in the zone; `None`
    /// when EC2 does not say, which only makes the summary less precise.
    pub async fn spot_price(&self, instance_type: &str, availability_zone: &str) -> Option<f64> {
        // With the start time at now, EC2 answers with the price in effect now.
        let result = self
            .client
            .describe_spot_price_history()
            .instance_types(InstanceType::from(instance_type))
            .availability_zone(availability_zone)
            .product_descriptions("Linux/UNIX")
            .start_time(DateTime::from(SystemTime::now()))
            .send()
            .await
            .aws_context(|| "Failed to read the spot price history");
        let output = match result {
            Ok(output) => output,
            Err(error) => {
                tracing::debug!(instance_type, availability_zone, "{error:#}");
                return None;
            }
        };

        output
            .spot_price_history()
            .iter()
            .filter(|price| price.availability_zone() == Some(availability_zone))
            .max_by_key(|price| price.timestamp().map(|timestamp| timestamp.secs()))
            .and_then(|price| price.spot_price())
            .and_then(|price| price.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_are_billed_one_minute() {
        let per_minute = 0.6 / 60.0;
        assert!((estimate(0.6, Duration::from_secs(5)) - per_minute).abs() < 1e-12);
        assert!((estimate(0.6, Duration::ZERO) - per_minute).abs() < 1e-12);
    }

    #[test]
    fn longer_runs_are_billed_per_started_second() {
        assert!((estimate(3.6, Duration::from_millis(90_200)) - 0.091).abs() < 1e-12);
        assert!((estimate(0.096, Duration::from_secs(3600)) - 0.096).abs() < 1e-12);
    }

    #[test]
    fn on_demand_table_knows_common_types_only() {
        assert_eq!(on_demand_price("m5.large"), Some(0.096));
        assert_eq!(on_demand_price("t3.micro"), Some(0.0104));
        assert_eq!(on_demand_price("u-24tb1.metal"), None);
    }
}
