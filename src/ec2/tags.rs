//! The tags spotrun puts on what it launches, and how `spotrun:expires-at` is written and read.
//!
//! The tags are the only record of a run that outlives the spotrun process: `terminate_run` finds
//! a run's instances by `spotrun:run-id`, `reap` finds expired ones by `spotrun:expires-at`. This
//! file does not call AWS.

use std::time::SystemTime;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};

pub const RUN_ID: &str = "spotrun:run-id";
pub const EXPIRES_AT: &str = "spotrun:expires-at";
const NAME: &str = "Name";

/// RFC 3339 in UTC with second precision, e.g. `2026-12-03T18:10:00Z`.
pub fn format_expires_at(expires_at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(expires_at).to_string()
}

pub fn parse_expires_at(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim()).ok()
}

/// The tags of one run: spotrun's own, then the user's. A user tag may rename the instance
/// (`Name`) but not replace a `spotrun:` tag, since termination and reaping depend on those.
pub fn run_tags(
    run_id: &str,
    expires_at: SystemTime,
    user_tags: &[(String, String)],
) -> Vec<(String, String)> {
    let mut tags = vec![
        (NAME.to_owned(), format!("spotrun-{run_id}")),
        (RUN_ID.to_owned(), run_id.to_owned()),
        (EXPIRES_AT.to_owned(), format_expires_at(expires_at)),
    ];
    for (key, value) in user_tags {
        if key.starts_with("spotrun:") {
            tracing::warn!(tag = %key, "ignoring a user tag in spotrun's own namespace");
            continue;
        }
        match tags.iter_mut().find(|(existing, _)| existing == key) {
            Some(existing) => existing.1 = value.clone(),
            None => tags.push((key.clone(), value.clone())),
        }
    }
    tags
}

/// Tags for the instance and its volumes, applied atomically by RunInstances, so that no
/// untagged instance exists even for a moment.
pub fn tag_specifications(tags: &[(String, String)]) -> Vec<TagSpecification> {
    [ResourceType::Instance, ResourceType::Volume]
        .into_iter()
        .map(|resource_type| {
            let builder = TagSpecification::builder().resource_type(resource_type);
            tags.iter()
                .fold(builder, |builder, (key, value)| {
                    builder.tags(Tag::builder().key(key).value(value).build())
                })
                .build()
        })
        .collect()
}

/// The value of one tag on a described resource.
pub fn tag_value<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|tag| tag.key() == Some(key))
        .and_then(|tag| tag.value())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn expires_at_is_rfc3339_utc_to_the_second() {
        let expires_at = UNIX_EPOCH + Duration::from_millis(1_796_321_400_750);
        assert_eq!(format_expires_at(expires_at), "2026-12-03T18:10:00Z");
    }

    #[test]
    fn expires_at_reads_back_what_it_wrote() {
        let expires_at = UNIX_EPOCH + Duration::from_secs(1_796_321_400);
        assert_eq!(
            parse_expires_at(&format_expires_at(expires_at)),
            Some(expires_at)
        );
        assert_eq!(parse_expires_at("tomorrow"), None);
    }

    #[test]
    fn user_tags_may_rename_but_not_retag_the_run() {
        let user_tags = vec![
            ("Name".to_owned(), "nightly".to_owned()),
            ("spotrun:run-id".to_owned(), "other".to_owned()),
            ("team".to_owned(), "infra".to_owned()),
        ];
        let tags = run_tags("r1", UNIX_EPOCH, &user_tags);
        let pairs: Vec<(&str, &str)> = tags
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("Name", "nightly"),
                ("spotrun:run-id", "r1"),
                ("spotrun:expires-at", "1970-01-01T00:00:00Z"),
                ("team", "infra"),
            ]
        );
    }

    #[test]
    fn instance_and_volume_get_the_same_tags() {
        let specifications = tag_specifications(&run_tags("r1", UNIX_EPOCH, &[]));
        let resource_types: Vec<_> = specifications
            .iter()
            .map(|specification| specification.resource_type().cloned())
            .collect();
        assert_eq!(
            resource_types,
            [Some(ResourceType::Instance), Some(ResourceType::Volume)]
        );
        assert!(specifications.iter().all(|s| s.tags().len() == 3));
        assert_eq!(tag_value(specifications[0].tags(), RUN_ID), Some("r1"));
    }
}
