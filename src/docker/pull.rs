//! Making the image present on the Docker host, per the pull policy, with progress on stderr:
//! bars when stderr is a terminal, a few plain lines when it is a CI log.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::PullPolicy;
use crate::docker::is_not_found;
use crate::docker::registry::pull_reference;
use crate::exit::HintExt;

pub async fn ensure_image(
    docker: &Docker,
    image: &str,
    policy: PullPolicy,
    credentials: Option<DockerCredentials>,
) -> Result<()> {
    if policy != PullPolicy::Always {
        match docker.inspect_image(image).await {
            Ok(_) => {
                tracing::debug!(image, "image already present");
                return Ok(());
            }
            Err(error) if is_not_found(&error) => {
                if policy == PullPolicy::Never {
                    return Err(anyhow!("Image `{image}` is not on the Docker host"))
                        .hint("drop `--pull never` or pull it there first");
                }
            }
            Err(error) => {
                return Err(error).with_context(|| format!("Failed to look up image `{image}`"));
            }
        }
    }
    pull(docker, image, credentials).await
}

async fn pull(docker: &Docker, image: &str, credentials: Option<DockerCredentials>) -> Result<()> {
    let (from_image, tag) = pull_reference(image);
    let options = CreateImageOptions {
        from_image: Some(from_image),
        tag,
        ..Default::default()
    };
    let started = Instant::now();
    tracing::info!(image, "pulling");

    let mut progress = Progress::new();
    let mut stream = docker.create_image(Some(options), None, credentials);
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => progress.update(&info),
            Err(error) => {
                progress.finish();
                return Err(pull_error(image, error));
            }
        }
    }
    progress.finish();
    tracing::info!(image, layers = progress.layers(), elapsed = ?started.elapsed(), "pulled");
    Ok(())
}

fn pull_error(image: &str, error: DockerError) -> anyhow::Error {
    let message = error.to_string();
    let lower = message.to_lowercase();
    let failed = Err::<(), _>(error).with_context(|| format!("Failed to pull `{image}`"));
    let hint = if lower.contains("unauthorized")
        || lower.contains("authentication required")
        || lower.contains("no basic auth")
        || lower.contains("denied")
    {
        "check the registry credentials: ~/.docker/config.json (or DOCKER_CONFIG), \
         --registry-user with --registry-password-stdin, or --registry-auth ecr"
    } else if lower.contains("not found") || lower.contains("manifest unknown") {
        "check the image name and tag"
    } else {
        "check that the Docker host can reach the registry"
    };
    failed.hint(hint).unwrap_err()
}

/// Layer progress: indicatif bars on a terminal, nothing per layer otherwise (the plain
/// `pulling` and `pulled` log lines say enough in a CI log).
struct Progress {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    layers: usize,
}

impl Progress {
    fn new() -> Progress {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| (MultiProgress::new(), HashMap::new()));
        Progress { bars, layers: 0 }
    }

    fn layers(&self) -> usize {
        self.layers
    }

    fn update(&mut self, info: &bollard::models::CreateImageInfo) {
        let (Some(id), Some(status)) = (&info.id, &info.status) else {
            return;
        };
        if status == "Pull complete" || status == "Already exists" {
            self.layers += 1;
        }
        let Some((multi, bars)) = &mut self.bars else {
            return;
        };
        let bar = bars.entry(id.clone()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template("{prefix} {msg:>16} {bar:30} {bytes}/{total_bytes}")
                    .expect("valid template"),
            );
            bar.set_prefix(id.clone());
            bar
        });
        bar.set_message(status.clone());
        if let Some(detail) = &info.progress_detail {
            if let Some(total) = detail.total {
                bar.set_length(total.max(0) as u64);
            }
            if let Some(current) = detail.current {
                bar.set_position(current.max(0) as u64);
            }
        }
        if status == "Pull complete" || status == "Already exists" {
            bar.finish();
        }
    }

    fn finish(&mut self) {
        if let Some((multi, bars)) = &self.bars {
            for bar in bars.values() {
                bar.finish_and_clear();
            }
            let _ = multi.clear();
        }
    }
}
