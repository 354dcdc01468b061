//! The container's lifecycle on the Docker host: create, start, wait, stop, remove.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;

use crate::docker::is_not_found;
use crate::exit::HintExt;

/// The label that ties a container to the run that made it, so that anything left over can be
/// found and removed.
pub const RUN_ID_LABEL: &str = "spotrun.run-id";

#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub entrypoint: Option<String>,
    pub user: Option<String>,
    pub log_driver: Option<String>,
    pub run_id: String,
    pub stdin: bool,
}

pub async fn create(docker: &Docker, spec: &ContainerSpec) -> Result<String> {
    // As with `docker run --entrypoint ""`, an empty entrypoint clears the image's.
    let entrypoint = spec.entrypoint.as_ref().map(|entrypoint| {
        if entrypoint.is_empty() {
            Vec::new()
        } else {
            vec![entrypoint.clone()]
        }
    });
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(spec.env.clone()),
        working_dir: spec.workdir.clone(),
        entrypoint,
        user: spec.user.clone(),
        labels: Some(HashMap::from([(
            RUN_ID_LABEL.to_owned(),
            spec.run_id.clone(),
        )])),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(spec.stdin),
        open_stdin: Some(spec.stdin),
        stdin_once: Some(spec.stdin),
        tty: Some(false),
        host_config: Some(HostConfig {
            log_config: spec.log_driver.as_ref().map(|driver| HostConfigLogConfig {
                typ: Some(driver.clone()),
                config: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = docker
        .create_container(None, body)
        .await
        .with_context(|| format!("Failed to create a container from `{}`", spec.image))?;
    for warning in response.warnings {
        tracing::warn!(warning = %warning, "docker");
    }
    tracing::debug!(container = %response.id, "created");
    Ok(response.id)
}

pub async fn start(docker: &Docker, container_id: &str) -> Result<()> {
    docker
        .start_container(container_id, None)
        .await
        .with_context(|| format!("Failed to start container {}", short(container_id)))
        .hint("check the command, entrypoint and working directory")
}

/// The container's exit status once it stops.
pub async fn wait(docker: &Docker, container_id: &str) -> Result<i64> {
    let options = WaitContainerOptions {
        condition: "not-running".to_owned(),
    };
    let mut stream = docker.wait_container(container_id, Some(options));
    match stream.next().await {
        Some(Ok(response)) => Ok(response.status_code),
        // bollard turns a non-zero status into an error value that still carries it.
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(error)) => Err(error).context("Failed to wait for the container"),
        None => anyhow::bail!("Docker ended the wait without an exit status"),
    }
}

/// SIGTERM, then SIGKILL after `grace`, as `docker stop`.
pub async fn stop(docker: &Docker, container_id: &str, grace: Duration) -> Result<()> {
    let options = StopContainerOptions {
        t: Some(grace.as_secs().try_into().unwrap_or(i32::MAX)),
        signal: None,
    };
    match docker.stop_container(container_id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(DockerError::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(error) if is_not_found(&error) => Ok(()),
        Err(error) => {
            Err(error).with_context(|| format!("Failed to stop container {}", short(container_id)))
        }
    }
}

/// Removes the container, killing it if it still runs; an absent container is fine.
pub async fn remove(docker: &Docker, container_id: &str) -> Result<()> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(container_id, Some(options)).await {
        Ok(()) => {
            tracing::debug!(container = %short(container_id), "removed");
            Ok(())
        }
        Err(error) if is_not_found(&error) => Ok(()),
        // Docker answers 409 while a removal is already under way.
        Err(DockerError::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(error) => Err(error)
            .with_context(|| format!("Failed to remove container {}", short(container_id))),
    }
}

pub fn short(container_id: &str) -> &str {
    &container_id[..container_id.len().min(12)]
}
