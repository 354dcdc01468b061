//! The attempts of one launch: which instance type, subnet and market each tries, in which
//! order, and which RunInstances errors mean "try the next one".
//!
//! This file decides nothing about the parameters of an attempt (that is `launch`) and does not
//! call AWS.

use super::launch::LaunchRequest;
use super::{Lifecycle, Market};

/// One RunInstances attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Candidate<'a> {
    pub instance_type: &'a str,
    pub subnet: Option<&'a str>,
    pub lifecycle: Lifecycle,
}

/// Every spot candidate comes before any on-demand one: on-demand costs several times more, so
/// a less preferred instance type on spot beats the preferred one on demand. Within a market
/// the preferred type is tried in every subnet before the next type.
pub(super) fn candidates(request: &LaunchRequest) -> Vec<Candidate<'_>> {
    let lifecycles: &[Lifecycle] = match request.market {
        Market::Spot => &[Lifecycle::Spot],
        Market::OnDemand => &[Lifecycle::OnDemand],
        Market::SpotThenOnDemand => &[Lifecycle::Spot, Lifecycle::OnDemand],
    };
    let subnets: Vec<Option<&str>> = if request.subnets.is_empty() {
        vec![None]
    } else {
        request
            .subnets
            .iter()
            .map(|subnet| Some(subnet.as_str()))
            .collect()
    };

    let mut candidates = Vec::new();
    for &lifecycle in lifecycles {
        for instance_type in &request.instance_types {
            for &subnet in &subnets {
                candidates.push(Candidate {
                    instance_type,
                    subnet,
                    lifecycle,
                });
            }
        }
    }
    candidates
}

/// Errors that say "not this type, here, now" rather than "this request is wrong": the next
/// candidate may well succeed.
pub(super) fn is_capacity_error(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "InsufficientCapacity"
            | "InsufficientHostCapacity"
            | "InsufficientReservedInstanceCapacity"
            | "InsufficientFreeAddressesInSubnet"
            | "SpotMaxPriceTooLow"
            | "MaxSpotInstanceCountExceeded"
            | "InstanceLimitExceeded"
            | "VcpuLimitExceeded"
            | "Unsupported"
    )
}

/// Idempotency token of one attempt: a retried request (the SDK retries on timeouts) cannot
/// launch a second instance. EC2 accepts at most 64 ASCII characters.
pub(super) fn client_token(run_id: &str, attempt: usize) -> String {
    format!("spotrun-{attempt}-{run_id}")
        .chars()
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn request(types: &[&str], subnets: &[&str], market: Market) -> LaunchRequest {
        LaunchRequest {
            run_id: "r1".to_owned(),
            ami: "ami-1".to_owned(),
            instance_types: types.iter().map(|t| t.to_string()).collect(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            security_groups: Vec::new(),
            market,
            max_price: None,
            volume_size_gib: None,
            iam_instance_profile: None,
            tags: Vec::new(),
            expires_at: UNIX_EPOCH,
            user_data: String::new(),
        }
    }

    fn order(request: &LaunchRequest) -> Vec<String> {
        candidates(request)
            .iter()
            .map(|c| {
                let subnet = c.subnet.unwrap_or("-");
                format!("{} {} {}", c.lifecycle, c.instance_type, subnet)
            })
            .collect()
    }

    #[test]
    fn spot_then_on_demand_tries_every_spot_candidate_first() {
        let request = request(
            &["c5.large", "m5.large"],
            &["a", "b"],
            Market::SpotThenOnDemand,
        );
        assert_eq!(
            order(&request),
            [
                "spot c5.large a",
                "spot c5.large b",
                "spot m5.large a",
                "spot m5.large b",
                "on-demand c5.large a",
                "on-demand c5.large b",
                "on-demand m5.large a",
                "on-demand m5.large b",
            ]
        );
    }

    #[test]
    fn without_subnets_each_type_is_tried_once_per_market() {
        assert_eq!(
            order(&request(&["t3.small"], &[], Market::Spot)),
            ["spot t3.small -"]
        );
        assert_eq!(
            order(&request(&["t3.small", "t3a.small"], &[], Market::OnDemand)),
            ["on-demand t3.small -", "on-demand t3a.small -"]
        );
    }

    #[test]
    fn capacity_errors_move_on_and_others_stop() {
        for code in [
            "InsufficientInstanceCapacity",
            "SpotMaxPriceTooLow",
            "Unsupported",
        ] {
            assert!(is_capacity_error(code), "{code}");
        }
        for code in [
            "InvalidAMIID.NotFound",
            "UnauthorizedOperation",
            "",
            "InvalidParameterValue",
        ] {
            assert!(!is_capacity_error(code), "{code}");
        }
    }

    #[test]
    fn client_tokens_differ_per_attempt_and_fit_in_64_characters() {
        assert_eq!(client_token("r1", 0), "spotrun-0-r1");
        assert_ne!(client_token("r1", 0), client_token("r1", 1));
        let long_run_id = "x".repeat(100);
        assert_eq!(client_token(&long_run_id, 12).len(), 64);
        assert!(client_token(&long_run_id, 12).starts_with("spotrun-12-"));
    }
}
