//! The job on the Docker host: pulling the image, the container's lifecycle and its output.
//! Reaching the host is `tunnel`'s business; deciding when to give up is the command's.

pub mod container;
pub mod job;
pub mod output;
pub mod pull;
pub mod registry;

use bollard::errors::Error as DockerError;

/// Docker's answer was a 404: the image or container does not exist.
pub fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}
