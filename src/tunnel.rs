//! bollard's transport over SSH: every HTTP connection bollard makes is a fresh
//! `direct-streamlocal@openssh.com` channel to Docker's Unix socket on the far side.
//!
//! Nothing listens locally and Docker is never exposed on TCP. A channel per request costs one
//! round trip to open, cheap next to the requests themselves, and keeps hijacked connections
//! (attach) independent of the short ones.

use std::sync::Arc;

use anyhow::{Context, Result};
use bollard::{BollardRequest, Docker};
use hyper_util::rt::TokioIo;

use crate::ssh::SshSession;

/// Seconds bollard waits for response headers; long streams (attach, wait) are not bounded by it.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// A Docker client whose requests travel over `session` to `socket_path`.
pub async fn docker_over_ssh(session: Arc<SshSession>, socket_path: &str) -> Result<Docker> {
    let socket_path: Arc<str> = socket_path.into();
    let target = session.target.clone();
    let transport = move |request: BollardRequest| {
        let session = session.clone();
        let socket_path = socket_path.clone();
        async move { send(&session, &socket_path, request).await }
    };

    let docker = Docker::connect_with_custom_transport(
        transport,
        Some("http://docker"),
        REQUEST_TIMEOUT_SECS,
        bollard::API_DEFAULT_VERSION,
    )
    .context("Failed to set up the Docker client")?;
    // bollard sends unversioned paths until the version is negotiated; an old engine (20.10
    // speaks API 1.41) would otherwise reject the newer default.
    docker
        .negotiate_version()
        .await
        .with_context(|| format!("Failed to reach Docker at `{target}`"))
}

async fn send(
    session: &SshSession,
    socket_path: &str,
    mut request: BollardRequest,
) -> Result<http::Response<hyper::body::Incoming>, bollard::errors::Error> {
    // A connection of our own speaks to exactly one server: send the origin form of the URI,
    // and the Host header HTTP/1.1 requires, which a pooled client would otherwise add.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    *request.uri_mut() = path
        .parse()
        .map_err(|_| io_error(format!("bad request path `{path}`")))?;
    request
        .headers_mut()
        .entry(http::header::HOST)
        .or_insert(http::HeaderValue::from_static("docker"));

    let stream = session
        .open_socket(socket_path)
        .await
        .map_err(|error| io_error(format!("{error:#}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| io_error(format!("HTTP handshake over SSH failed: {error}")))?;

    // The connection task lives as long as the response body or the upgraded stream does.
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(error = %error, "Docker connection over SSH ended");
        }
    });

    sender
        .send_request(request)
        .await
        .map_err(|error| io_error(format!("Docker request over SSH failed: {error}")))
}

fn io_error(message: String) -> bollard::errors::Error {
    bollard::errors::Error::IOError {
        err: std::io::Error::other(message),
    }
}
