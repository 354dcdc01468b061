//! Exit codes and the one place where an outcome or an error becomes one.
//!
//! The job's own exit status passes through untouched; everything spotrun adds is in the table
//! below, chosen to match what CI systems already understand from `timeout` and `docker run`.

use std::fmt;

/// spotrun itself failed: bad input, AWS, SSH, Docker or registry error (as `docker run`).
pub const FAILURE: i32 = 125;
/// The job hit `--timeout` (as coreutils `timeout`).
pub const TIMEOUT: i32 = 124;
/// The spot instance was interrupted and no retry was left (EX_TEMPFAIL).
pub const SPOT_INTERRUPTED: i32 = 75;
pub const SIGINT: i32 = 130;
pub const SIGTERM: i32 = 143;

/// How a run ended when spotrun itself did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The container ran to its end; this is its exit status.
    Exited(i64),
    TimedOut,
    SpotInterrupted,
    Signalled(Signal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            // A container status outside 0..=255 cannot be an exit status; keep the low byte as
            // a shell would report it.
            Outcome::Exited(code) => (code & 0xff) as i32,
            Outcome::TimedOut => TIMEOUT,
            Outcome::SpotInterrupted => SPOT_INTERRUPTED,
            Outcome::Signalled(Signal::Interrupt) => SIGINT,
            Outcome::Signalled(Signal::Terminate) => SIGTERM,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "exited with {code}"),
            Outcome::TimedOut => write!(f, "timed out"),
            Outcome::SpotInterrupted => write!(f, "spot instance interrupted"),
            Outcome::Signalled(signal) => write!(f, "stopped by {}", signal.name()),
        }
    }
}

/// An error the user can do something about: the hint is printed under the error line.
#[derive(Debug)]
pub struct Hinted {
    pub error: anyhow::Error,
    pub hint: String,
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

pub trait HintExt<T> {
    /// Attaches a `hint:` line for the user to an error.
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> HintExt<T> for Result<T, E> {
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T> {
        self.map_err(|error| {
            anyhow::Error::new(Hinted {
                error: error.into(),
                hint: hint.into(),
            })
        })
    }
}

/// Prints `error: …` and any `hint: …` to stderr and returns the exit code for a failure.
pub fn report(error: &anyhow::Error) -> i32 {
    eprintln!("error: {error:#}");
    for cause in error.chain() {
        if let Some(hinted) = cause.downcast_ref::<Hinted>() {
            eprintln!("hint: {}", hinted.hint);
            break;
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_status_keeps_its_low_byte() {
        assert_eq!(Outcome::Exited(3).exit_code(), 3);
        assert_eq!(Outcome::Exited(256 + 7).exit_code(), 7);
        assert_eq!(Outcome::Exited(-1).exit_code(), 255);
    }

    #[test]
    fn hint_survives_added_context() {
        use anyhow::Context;
        let error = Err::<(), _>(anyhow::anyhow!("denied"))
            .hint("check the password")
            .context("Failed to pull")
            .unwrap_err();
        let hinted = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<Hinted>());
        assert_eq!(hinted.map(|h| h.hint.as_str()), Some("check the password"));
        assert_eq!(format!("{error:#}"), "Failed to pull: denied");
    }
}
