//! One job on a reachable Docker host: image, container, output, exit status, and the
//! `--timeout` that bounds it. Removing the container is recorded with `Teardown` so that a
//! signal or a panic cannot leave it behind.

use std::time::Duration;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::auth::DockerCredentials;

use crate::cleanup::Teardown;
use crate::docker::container::{self, ContainerSpec};
use crate::docker::output::{self, Sink};
use crate::docker::pull;
use crate::exit::Outcome;
use crate::settings::JobSettings;

/// After `--timeout` stops the container (SIGTERM, then SIGKILL after the grace period),
/// output already on its way still gets this long to arrive.
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
        log_driver: job.log_driver.clone(),
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
    let (stdout, stderr) =
        output::standard_streams().context("Failed to open stdout and stderr")?;
    let mut sink = Sink::new(stdout, stderr);

    // The output is read from before the start on, and all the way through a stop: every
    // Docker request shares one SSH session, and a channel whose data nobody reads stalls the
    // whole session, so an unread attach would hold up the start or stop call's own answer.
    let outcome = {
        let run_to_end = async {
            container::start(docker, &container_id).await?;
            let container = container::short(&container_id);
            tracing::info!(%container, image = %job.image, "started");
            if job.panic_after_start {
                panic!("SPOTRUN_DEBUG_PANIC_AFTER_START is set");
            }
            container::wait(docker, &container_id).await
        };
        let finished = async {
            let (_, status) = tokio::try_join!(
                sink.pump(docker, &container_id, attached.output),
                run_to_end
            )?;
            anyhow::Ok(status)
        };
        tokio::pin!(finished);
        match job.timeout {
            None => Outcome::Exited((&mut finished).await?),
            Some(timeout) => tokio::select! {
                status = &mut finished => Outcome::Exited(status?),
                _ = tokio::time::sleep(timeout) => {
                    let timeout = humantime::format_duration(timeout);
                    tracing::warn!(%timeout, "job timed out; stopping it");
                    let grace = job.stop_grace;
                    let stopping = container::stop(docker, &container_id, grace);
                    let drained = tokio::time::timeout(grace + DRAIN_AFTER_STOP, &mut finished);
                    let (stopped, _) = tokio::join!(stopping, drained);
                    stopped?;
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
