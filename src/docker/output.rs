//! The container's output, copied byte for byte as it arrives: its stdout to our stdout, its
//! stderr to our stderr.
//!
//! Output is read from an attach made before the container starts, so nothing is missed. The
//! bytes delivered so far are counted per stream in an `OutputCursor`; if the attach breaks
//! while the container still runs, the rest is read from the container's log, skipping what was
//! already delivered, so nothing is lost or repeated and binary output stays exact.

use std::pin::Pin;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::{AttachContainerOptions, LogsOptions};
use futures_util::{Stream, StreamExt};
use std::io::Write;

type OutputStream = Pin<Box<dyn Stream<Item = Result<LogOutput, DockerError>> + Send>>;

/// How many bytes of each stream the caller has been given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputCursor {
    pub stdout: u64,
    pub stderr: u64,
}

/// An attach to a created container's output, ready before it starts.
pub struct Attached {
    pub output: OutputStream,
}

pub async fn attach(docker: &Docker, container_id: &str, stdin: bool) -> Result<Attached> {
    let options = AttachContainerOptions {
        stream: true,
        stdout: true,
        stderr: true,
        stdin,
        logs: false,
        detach_keys: None,
    };
    let attached = docker
        .attach_container(container_id, Some(options))
        .await
        .context("Failed to attach to the container's output")?;
    Ok(Attached {
        output: attached.output,
    })
}

/// Where output goes; stdout that has been closed by the reader (`| head`) is dropped quietly.
pub struct Sink<Out, Err> {
    stdout: Out,
    stderr: Err,
    stdout_closed: bool,
    pub cursor: OutputCursor,
}

impl<Out: Write, Err: Write> Sink<Out, Err> {
    pub fn new(stdout: Out, stderr: Err) -> Self {
        Sink {
            stdout,
            stderr,
            stdout_closed: false,
            cursor: OutputCursor::default(),
        }
    }

    async fn deliver(&mut self, chunk: LogOutput, skip: &mut OutputCursor) -> Result<()> {
        match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                let fresh = take_fresh(&message, &mut skip.stdout);
                self.cursor.stdout += fresh.len() as u64;
                if !self.stdout_closed
                    && !fresh.is_empty()
                    && let Err(error) = write_now(&mut self.stdout, fresh)
                {
                    if error.kind() != std::io::ErrorKind::BrokenPipe {
                        return Err(error).context("Failed to write the container's stdout");
                    }
                    tracing::debug!("stdout closed by its reader; dropping the rest");
                    self.stdout_closed = true;
                }
            }
            LogOutput::StdErr { message } => {
                let fresh = take_fresh(&message, &mut skip.stderr);
                self.cursor.stderr += fresh.len() as u64;
                if !fresh.is_empty() {
                    // A closed stderr leaves nowhere to report to; the job itself goes on.
                    let _ = write_now(&mut self.stderr, fresh);
                }
            }
            LogOutput::StdIn { .. } => {}
        }
        Ok(())
    }

    /// Copies `stream` until it ends. An error of the stream itself is returned as `Ok(Err)` so
    /// the caller can decide to resume; errors writing locally are final.
    async fn copy(
        &mut self,
        mut stream: OutputStream,
        mut skip: OutputCursor,
    ) -> Result<Result<(), DockerError>> {
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => self.deliver(chunk, &mut skip).await?,
                Err(error) => return Ok(Err(error)),
            }
        }
        Ok(Ok(()))
    }

    /// Copies the attach stream to the end; if it breaks, carries on from the container's log.
    pub async fn pump(
        &mut self,
        docker: &Docker,
        container_id: &str,
        output: OutputStream,
    ) -> Result<()> {
        let Err(error) = self.copy(output, OutputCursor::default()).await? else {
            return Ok(());
        };
        let delivered = self.cursor;
        tracing::warn!(%error, ?delivered, "output stream broke; resuming from the container log");
        let logs = follow_logs(docker, container_id);
        match self.copy(logs, delivered).await? {
            Ok(()) => Ok(()),
            Err(error) => Err(error).context("Failed to read the container's output"),
        }
    }
}

/// The whole log of the container, following it until the container stops.
pub fn follow_logs(docker: &Docker, container_id: &str) -> OutputStream {
    let options = LogsOptions {
        follow: true,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    docker.logs(container_id, Some(options)).boxed()
}

/// The part of `message` past the `skip` bytes still to be skipped; counts `skip` down.
fn take_fresh<'a>(message: &'a [u8], skip: &mut u64) -> &'a [u8] {
    let skipped = (*skip).min(message.len() as u64) as usize;
    *skip -= skipped as u64;
    &message[skipped..]
}

/// Writes straight to the descriptor, on this worker thread: handing each chunk to tokio's
/// blocking pool costs more than the write itself, and `block_in_place` keeps a slow reader
/// (a full pipe) from stalling the other tasks.
fn write_now<W: Write>(writer: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    tokio::task::block_in_place(|| {
        writer.write_all(bytes)?;
        writer.flush()
    })
}

/// Our stdout and stderr as plain files, without std's line buffering in between.
pub fn standard_streams() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::AsFd;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    Ok((stdout.into(), stderr.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn chunks(parts: &[(&str, &[u8])]) -> OutputStream {
        let items: Vec<Result<LogOutput, DockerError>> = parts
            .iter()
            .map(|(stream, bytes)| {
                let message = Bytes::copy_from_slice(bytes);
                Ok(if *stream == "out" {
                    LogOutput::StdOut { message }
                } else {
                    LogOutput::StdErr { message }
                })
            })
            .collect();
        futures_util::stream::iter(items).boxed()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn resuming_from_the_log_neither_loses_nor_repeats_bytes() {
        let log = [
            ("out", b"ab".as_slice()),
            ("err", b"E1"),
            ("out", b"cd\xff\x00"),
            ("err", b"E2"),
            ("out", b"ef"),
        ];
        let mut sink = Sink::new(Vec::new(), Vec::new());
        // The attach delivered "abc" of stdout and "E" of stderr before it broke.
        sink.copy(
            chunks(&[("out", b"ab"), ("err", b"E"), ("out", b"c")]),
            OutputCursor::default(),
        )
        .await
        .unwrap()
        .unwrap();
        let delivered = sink.cursor;
        assert_eq!(
            delivered,
            OutputCursor {
                stdout: 3,
                stderr: 1
            }
        );
        sink.copy(chunks(&log), delivered).await.unwrap().unwrap();
        assert_eq!(sink.stdout, b"abcd\xff\x00ef");
        assert_eq!(sink.stderr, b"E1E2");
        assert_eq!(
            sink.cursor,
            OutputCursor {
                stdout: 8,
                stderr: 4
            }
        );
    }
}
