//! One job on a reachable Docker host: image, container, output, exit status, and the
//! `--timeout` that bounds it. Removing the container is recorded with `Teardown` so that a
//! signal or a panic cannot leave it behind.

use std::time::Duration;

use anyhow::Result;
use bollard::Docker;
use bollard::auth::DockerCredentials;

use crate::cleanup::Teardown;
use crate::docker::container::{self, ContainerSpec};
use crate::docker::output::{self, Sink};
use crate::docker::pull;
use crate::exit::Outcome;
use crate::settings::JobSettings;

/// After `--timeout` stops the container, output already on its way still gets this long to
/// arrive.
const DRAIN_AFTER_STOP: Duration = Duration::from_secs(3);

pub async fn run(
    docker: &Docker,
    job: &JobSettings,
    credentials: Option<DockerCredentials>,
    run_id: &str,
    teardown: &Teardown,
) -> Result<Outcome> {
    pull::ensure_image(docker, &job.image, job.pull, credentials).await?;

    let spec = ContainerSpec {
        image: job.image.clone(),
        command: job.command.clone(),
        env: job.env.clone(),
        workdir: job.workdir.clone(),
        entrypoint: job.entrypoint.clone(),
        user: job.user.clone(),
        run_id: run_id.to_owned(),
        stdin: false,
    };
    let container_id = container::create(docker, &spec).await?;
    teardown.container_created(
        docker.clone(),
        container_id.clone(),
        job.keep_container,
        job.stop_grace,
    );

    let attached = output::attach(docker, &container_id, false).await?;
    container::start(docker, &container_id).await?;
    tracing::info!(container = %container::short(&container_id), image = %job.image, "started");

    let mut sink = Sink::new(tokio::io::stdout(), tokio::io::stderr());
    let outcome = {
        let finished = async {
            let (_, status) = tokio::try_join!(
                sink.pump(docker, &container_id, attached.output),
                container::wait(docker, &container_id),
            )?;
            anyhow::Ok(status)
        };
        tokio::pin!(finished);
        match job.timeout {
            None => Outcome::Exited((&mut finished).await?),
            Some(timeout) => tokio::select! {
                status = &mut finished => Outcome::Exited(status?),
                _ = tokio::time::sleep(timeout) => {
                    tracing::warn!(timeout = %humantime::format_duration(timeout), "job timed out; stopping it");
                    container::stop(docker, &container_id, job.stop_grace).await?;
                    let _ = tokio::time::timeout(DRAIN_AFTER_STOP, &mut finished).await;
                    Outcome::TimedOut
                }
            },
        }
    };
    tracing::debug!(cursor = ?sink.cursor, "output delivered");

    if job.keep_container {
        tracing::info!(container = %container_id, "kept (--keep-container)");
    } else {
        container::remove(docker, &container_id).await?;
    }
    teardown.container_removed();
    Ok(outcome)
}
