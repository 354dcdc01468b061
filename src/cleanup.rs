//! The guarantee that a run leaves nothing behind: signal handling, and the teardown that
//! removes the container and terminates the instance on every path.
//!
//! The run's work happens in a task of its own. A signal aborts that task, and a panic ends it,
//! but neither can skip `Teardown::finish`, which runs in the caller with whatever the task had
//! recorded. Once spotrun handles SIGINT and SIGTERM they no longer kill the process, so a
//! second Ctrl-C (or Jenkins' repeated abort) only logs that teardown is under way; it cannot
//! cut the terminate call short.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bollard::Docker;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::docker::container;
use crate::ec2::Ec2;
use crate::exit::Signal;

/// How long teardown waits for a RunInstances call that was in flight when a signal came: its
/// answer names the instance to terminate.
const LAUNCH_SETTLE: Duration = Duration::from_secs(60);

/// The first SIGINT or SIGTERM, and the moment it came.
#[derive(Clone)]
pub struct Signals {
    receiver: watch::Receiver<Option<(Signal, Instant)>>,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let (sender, receiver) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let signal = tokio::select! {
                    _ = interrupt.recv() => Signal::Interrupt,
                    _ = terminate.recv() => Signal::Terminate,
                };
                if sender.borrow().is_some() {
                    tracing::warn!(
                        signal = signal.name(),
                        "already stopping; teardown continues"
                    );
                    continue;
                }
                tracing::warn!(
                    signal = signal.name(),
                    "stopping: removing the container and the instance"
                );
                let _ = sender.send(Some((signal, Instant::now())));
            }
        });
        Ok(Signals { receiver })
    }

    /// Resolves with the first signal.
    pub async fn first(&mut self) -> Signal {
        match self.receiver.wait_for(Option::is_some).await {
            Ok(value) => value.expect("waited for Some").0,
            // The listener never ends while the runtime lives.
            Err(_) => std::future::pending().await,
        }
    }

    pub fn received_at(&self) -> Option<Instant> {
        self.receiver.borrow().map(|(_, at)| at)
    }
}

/// What the run has created so far and must not outlive it.
#[derive(Default)]
pub struct Teardown {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    container: Option<ContainerRecord>,
    launch: Option<LaunchRecord>,
}

struct ContainerRecord {
    docker: Docker,
    container_id: String,
    keep: bool,
    stop_grace: Duration,
}

struct LaunchRecord {
    ec2: Arc<Ec2>,
    run_id: String,
    instance_id: Option<String>,
    in_flight: Option<JoinHandle<()>>,
}

impl Teardown {
    pub fn container_created(
        &self,
        docker: Docker,
        container_id: String,
        keep: bool,
        stop_grace: Duration,
    ) {
        self.lock().container = Some(ContainerRecord {
            docker,
            container_id,
            keep,
            stop_grace,
        });
    }

    pub fn container_removed(&self) {
        self.lock().container = None;
    }

    /// Called before RunInstances, so that even an instance whose launch answer is lost gets
    /// found by its run-id tag and terminated.
    pub fn launching(&self, ec2: Arc<Ec2>, run_id: String) {
        self.lock().launch = Some(LaunchRecord {
            ec2,
            run_id,
            instance_id: None,
            in_flight: None,
        });
    }

    pub fn launch_in_flight(&self, task: JoinHandle<()>) {
        if let Some(launch) = self.lock().launch.as_mut() {
            launch.in_flight = Some(task);
        }
    }

    pub fn launched(&self, instance_id: String) {
        if let Some(launch) = self.lock().launch.as_mut() {
            launch.instance_id = Some(instance_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock must not stop teardown from reading what was recorded.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes the container and terminates the instance, whatever state the run was left in.
    /// `keep_instance` is `--keep-on-failure` applied to a failed run. Errors are logged, not
    /// returned: the run's own outcome is what the caller reports.
    pub async fn finish(&self, keep_instance: bool, signals: &Signals) {
        let container = self.lock().container.take();
        if let Some(record) = container {
            if record.keep {
                let container = container::short(&record.container_id);
                tracing::info!(%container, "keeping the container");
            } else {
                // An instance that is about to be terminated takes the job with it, so a grace
                // period would only hold up the termination; on a host that stays, the job gets
                // its grace.
                let terminating = !keep_instance && self.lock().launch.is_some();
                let grace = if terminating {
                    Duration::ZERO
                } else {
                    record.stop_grace
                };
                remove_container(&record, grace).await;
            }
        }

        let in_flight = self
            .lock()
            .launch
            .as_mut()
            .and_then(|launch| launch.in_flight.take());
        if let Some(task) = in_flight
            && tokio::time::timeout(LAUNCH_SETTLE, task).await.is_err()
        {
            tracing::warn!("the launch call did not settle; looking for the instance by its tag");
        }
        let launch = self.lock().launch.take();
        let Some(launch) = launch else { return };
        let instance_id = launch.instance_id.clone();

        if keep_instance && let Some(instance_id) = &instance_id {
            tracing::warn!(
                instance = %instance_id,
                "keeping the instance after the failure (--keep-on-failure); \
                 it powers off at --max-lifetime"
            );
            return;
        }
        if let Some(instance_id) = &instance_id {
            if let Some(at) = signals.received_at() {
                let since_signal_ms = at.elapsed().as_millis() as u64;
                tracing::info!(instance = %instance_id, since_signal_ms, "terminating");
            } else {
                tracing::info!(instance = %instance_id, "terminating");
            }
            if let Err(error) = launch
                .ec2
                .terminate(std::slice::from_ref(instance_id))
                .await
            {
                let error = format!("{error:#}");
                let instance = instance_id;
                tracing::error!(%instance, %error, "failed to terminate; trying by tag");
            }
        }
        // The sweep by tag also catches an instance whose RunInstances answer never arrived.
        match launch.ec2.terminate_run(&launch.run_id).await {
            Ok(swept) => {
                for instance_id in swept {
                    let run = &launch.run_id;
                    tracing::info!(instance = %instance_id, %run, "terminated by its run tag");
                }
            }
            Err(error) => tracing::error!(
                run = %launch.run_id,
                error = %format!("{error:#}"),
                "failed to look for the run's instances; check with `spotrun ls` and `spotrun reap`"
            ),
        }
    }
}

async fn remove_container(record: &ContainerRecord, grace: Duration) {
    let id = container::short(&record.container_id);
    // Stopping first gives the job its grace period; removal then cannot fail on a live one.
    let stop = container::stop(&record.docker, &record.container_id, grace);
    match tokio::time::timeout(grace + Duration::from_secs(15), stop).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(container = %id, error = %format!("{error:#}"), "stop failed")
        }
        Err(_) => tracing::warn!(container = %id, "stop timed out"),
    }
    let remove = container::remove(&record.docker, &record.container_id);
    match tokio::time::timeout(Duration::from_secs(30), remove).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            let error = format!("{error:#}");
            tracing::error!(container = %id, %error, "failed to remove the container")
        }
        Err(_) => tracing::error!(container = %id, "removing the container timed out"),
    }
}
