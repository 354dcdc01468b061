//! `spotrun run`: get a Docker host (launch an instance, or use `--host`), run the job there,
//! and give everything back.
//!
//! The work runs in its own task so that a signal can abort it at any await point and a panic
//! cannot skip teardown; see `cleanup`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow};
use bollard::Docker;
use bollard::auth::DockerCredentials;
use russh::keys::ssh_key::{Algorithm, LineEnding, PrivateKey};

use crate::cleanup::{Signals, Teardown};
use crate::cli::{AddressArg, HostKeyCheck, MarketArg, RegistryAuth};
use crate::docker::{job, registry};
use crate::ec2::{self, AddressKind, Ec2, Instance, LaunchError, LaunchRequest, Market};
use crate::exit::{HintExt, Outcome};
use crate::settings::RunSettings;
use crate::ssh::{ConnectError, HostKeyPolicy, Identity, PinnedKey, SshSession, SshTarget};
use crate::summary::{InstanceSummary, Summary};
use crate::tunnel;

/// The reach step retries the SSH handshake this soon after a failure, growing the wait each
/// time up to the cap, while the instance does not answer at all (still booting, or its network
/// not up yet).
const FIRST_RETRY: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(2);
/// A refused connection means the machine is up and only sshd is missing; cloud-init starts it
/// within moments, so that phase is polled at this steady, cheap rate (one SYN and one RST).
const REFUSED_RETRY: Duration = Duration::from_millis(100);

pub async fn run(settings: RunSettings) -> Result<i32> {
    let started = Instant::now();
    let mut signals = Signals::install()?;
    let teardown = Arc::new(Teardown::default());
    let settings = Arc::new(settings);
    let run_id = new_run_id();
    let report = Arc::new(std::sync::Mutex::new(Summary {
        run_id: run_id.clone(),
        ..Default::default()
    }));

    let mut work = tokio::spawn(work(
        settings.clone(),
        run_id,
        teardown.clone(),
        report.clone(),
    ));
    let result = tokio::select! {
        joined = &mut work => match joined {
            Ok(result) => result,
            Err(error) if error.is_panic() => Err(anyhow!("spotrun hit an internal error (panic)")),
            Err(error) => Err(anyhow!("the run's task ended unexpectedly: {error}")),
        },
        signal = signals.first() => {
            work.abort();
            Ok(Outcome::Signalled(signal))
        }
    };

    // A stop by signal is the caller's decision, not a failure to investigate: the instance
    // goes even with --keep-on-failure.
    let failed = matches!(result, Err(_) | Ok(Outcome::TimedOut))
        || matches!(result, Ok(Outcome::Exited(code)) if code != 0);
    teardown
        .finish(failed && settings.ec2.keep_on_failure, &signals)
        .await;

    let exit_code = match &result {
        Ok(outcome) => outcome.exit_code(),
        Err(error) => crate::exit::report(error),
    };
    let mut summary = std::mem::take(&mut *report.lock().unwrap_or_else(|p| p.into_inner()));
    summary.set_wall(started.elapsed());
    summary.outcome = match &result {
        Ok(outcome) => outcome.to_string(),
        Err(_) => "spotrun failed".to_owned(),
    };
    summary.exit_code = exit_code;
    if let Some(instance) = summary.instance.as_mut()
        && let Some(price) = instance.price_per_hour_usd
    {
        instance.estimated_cost_usd = Some(ec2::pricing::estimate(price, started.elapsed()));
    }
    eprintln!("{}", summary.line());
    if let Some(path) = &settings.summary {
        summary.write_json(path)?;
    }
    Ok(exit_code)
}

fn new_run_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("sr-{}", &id[..12])
}

type Report = Arc<std::sync::Mutex<Summary>>;

async fn work(
    settings: Arc<RunSettings>,
    run_id: String,
    teardown: Arc<Teardown>,
    report: Report,
) -> Result<Outcome> {
    match &settings.host {
        Some(target) => {
            report.lock().expect("report").host = Some(target.to_string());
            on_host(&settings, target, &run_id, &teardown).await
        }
        None => on_instance(&settings, &run_id, &teardown, &report).await,
    }
}

/// `--host`: the job on an existing Docker host.
async fn on_host(
    settings: &RunSettings,
    target: &SshTarget,
    run_id: &str,
    teardown: &Teardown,
) -> Result<Outcome> {
    let ssh = &settings.ssh;
    let identity = match &ssh.identity {
        Some(path) => Identity::load(path, ssh.identity_passphrase.as_deref())?,
        None => Identity::Agent,
    };
    let policy = match (&ssh.host_key, ssh.host_key_check) {
        (Some(key), _) => HostKeyPolicy::Pinned(key.parse::<PinnedKey>().context("--host-key")?),
        (None, HostKeyCheck::Off) => HostKeyPolicy::Off,
        (None, check) => HostKeyPolicy::KnownHosts {
            path: ssh.known_hosts.clone(),
            check,
        },
    };

    let session = SshSession::connect(target, &identity, &policy, ssh.connect_timeout)
        .await
        .map_err(|error| match error {
            ConnectError::Unreachable(error) | ConnectError::Refused(error) => error,
        })
        .with_context(|| format!("Failed to connect to `{target}`"))?;
    let docker = tunnel::docker_over_ssh(Arc::new(session), &ssh.docker_socket).await?;

    run_job(settings, &docker, run_id, teardown).await
}

/// The job on a freshly launched instance.
async fn on_instance(
    settings: &RunSettings,
    run_id: &str,
    teardown: &Arc<Teardown>,
    report: &Report,
) -> Result<Outcome> {
    let ec2_settings = &settings.ec2;
    let ami = ec2_settings.ami.clone().context("No AMI to launch").hint(
        "name one with --ami (or SPOTRUN_AMI); ami/ builds one, \
             or use --host for an existing machine",
    )?;
    let ec2 = Arc::new(
        Ec2::connect(
            settings.aws.region.as_deref(),
            settings.aws.endpoint_url.as_deref(),
        )
        .await?,
    );

    // The client key lives only in this process unless the user brought one; the host key is
    // ours too, so the instance is verified from its first packet.
    let client_key = match &settings.ssh.identity {
        Some(path) => match Identity::load(path, settings.ssh.identity_passphrase.as_deref())? {
            Identity::Key(key) => key,
            Identity::Agent => unreachable!("a loaded identity is a key"),
        },
        None => Arc::new(generate_key()?),
    };
    let host_key = generate_key()?;
    let client_public = client_key.public_key().to_openssh().context("client key")?;
    let host_private = host_key.to_openssh(LineEnding::LF).context("host key")?;
    let host_public = host_key.public_key().to_openssh().context("host key")?;
    let user_data = ec2::user_data::CloudConfig {
        host_key_private_openssh: &host_private,
        host_key_public: &host_public,
        authorized_keys: &[format!("{client_public} spotrun-{run_id}")],
        max_lifetime: ec2_settings.max_lifetime,
    }
    .render();

    let security_groups = if ec2_settings.security_groups.is_empty() {
        let subnet = ec2_settings.subnets.first().map(String::as_str);
        let group = ec2
            .ssh_security_group(subnet, &ec2_settings.ssh_cidr, ec2_settings.ssh_port)
            .await
            .context("Failed to prepare a security group that admits SSH")
            .hint("name one with --security-group")?;
        vec![group]
    } else {
        ec2_settings.security_groups.clone()
    };

    let request = LaunchRequest {
        run_id: run_id.to_owned(),
        ami,
        instance_types: ec2_settings.instance_types.clone(),
        subnets: ec2_settings.subnets.clone(),
        security_groups,
        market: match ec2_settings.market {
            MarketArg::Spot => Market::Spot,
            MarketArg::OnDemand => Market::OnDemand,
            MarketArg::SpotThenOnDemand => Market::SpotThenOnDemand,
        },
        max_price: ec2_settings.max_price.clone(),
        volume_size_gib: ec2_settings.volume_size,
        iam_instance_profile: ec2_settings.iam_instance_profile.clone(),
        tags: ec2_settings.tags.clone(),
        expires_at: SystemTime::now() + ec2_settings.max_lifetime,
        user_data,
    };
    let instance = launch(&ec2, request, teardown).await?;
    report.lock().expect("report").instance = Some(InstanceSummary {
        instance_id: instance.instance_id.clone(),
        instance_type: instance.instance_type.clone(),
        region: ec2.region().to_owned(),
        availability_zone: instance.availability_zone.clone(),
        market: instance.lifecycle,
        price_per_hour_usd: None,
        estimated_cost_usd: None,
    });

    let result = job_on_instance(
        settings, &ec2, &instance, &host_key, client_key, run_id, teardown,
    )
    .await;

    let price = match instance.lifecycle {
        ec2::Lifecycle::Spot => {
            ec2.spot_price(&instance.instance_type, &instance.availability_zone)
                .await
        }
        ec2::Lifecycle::OnDemand => None,
    }
    .or_else(|| ec2::pricing::on_demand_price(&instance.instance_type));
    if let Some(summary) = report.lock().expect("report").instance.as_mut() {
        summary.price_per_hour_usd = price;
    }

    match result {
        Ok(outcome) => Ok(outcome),
        // A lost link or a Docker error on a spot instance is most often the interruption
        // itself; EC2 says which.
        Err(error) => match ec2.status(&instance.instance_id).await {
            Ok(status) if status.was_interrupted() => {
                tracing::error!(
                    instance = %instance.instance_id,
                    state = %status.state,
                    reason = ?status.state_reason_code,
                    "spot instance interrupted"
                );
                Ok(Outcome::SpotInterrupted)
            }
            _ => Err(error),
        },
    }
}

/// RunInstances in a task of its own that records the instance with `teardown` itself: if a
/// signal aborts the run meanwhile, the call still completes and the instance still gets
/// terminated.
async fn launch(
    ec2: &Arc<Ec2>,
    request: LaunchRequest,
    teardown: &Arc<Teardown>,
) -> Result<Instance> {
    teardown.launching(ec2.clone(), request.run_id.clone());
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let task_ec2 = ec2.clone();
    let task_teardown = teardown.clone();
    let task = tokio::spawn(async move {
        let result = task_ec2.launch(&request).await;
        if let Ok(instance) = &result {
            task_teardown.launched(instance.instance_id.clone());
        }
        let _ = sender.send(result);
    });
    teardown.launch_in_flight(task);
    let instance = match receiver
        .await
        .context("the launch task ended without an answer")?
    {
        Ok(instance) => instance,
        Err(error @ LaunchError::NoCapacity { .. }) => {
            return Err(error).context("Failed to launch an instance").hint(
                "add instance types or subnets, or allow on-demand with \
                 --market spot-then-on-demand",
            );
        }
        Err(error) => return Err(error).context("Failed to launch an instance"),
    };
    Ok(instance)
}

async fn job_on_instance(
    settings: &RunSettings,
    ec2: &Ec2,
    instance: &Instance,
    host_key: &PrivateKey,
    client_key: Arc<PrivateKey>,
    run_id: &str,
    teardown: &Teardown,
) -> Result<Outcome> {
    let ec2_settings = &settings.ec2;
    let deadline = tokio::time::Instant::now() + ec2_settings.boot_timeout;
    let kind = match ec2_settings.address {
        AddressArg::Public => AddressKind::Public,
        AddressArg::Private => AddressKind::Private,
    };
    let address = ec2
        .wait_for_address(&instance.instance_id, kind, deadline)
        .await
        .with_context(|| format!("Instance {} did not come up", instance.instance_id))?;
    let target = SshTarget {
        user: ec2_settings.ssh_user.clone(),
        host: address.to_string(),
        port: ec2_settings.ssh_port,
    };
    tracing::info!(instance = %instance.instance_id, address = %address, "waiting for sshd");

    let policy = HostKeyPolicy::Pinned(PinnedKey::Key(host_key.public_key().clone()));
    let identity = Identity::Key(client_key);
    let docker = reach(
        &target,
        &identity,
        &policy,
        deadline,
        &settings.ssh.docker_socket,
    )
    .await
    .with_context(|| {
        format!(
            "Failed to reach Docker on instance {} at `{target}`",
            instance.instance_id
        )
    })?;

    run_job(settings, &docker, run_id, teardown).await
}

/// Retries SSH with a short growing backoff until sshd answers with our host key and Docker
/// answers a ping, or the boot deadline passes. A wrong host key is never retried: cloud-init
/// installs ours before sshd starts, so another key means another machine.
async fn reach(
    target: &SshTarget,
    identity: &Identity,
    policy: &HostKeyPolicy,
    deadline: tokio::time::Instant,
    docker_socket: &str,
) -> Result<Docker> {
    let mut wait = FIRST_RETRY;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt_timeout = remaining.min(Duration::from_secs(10));
        let last_error = match SshSession::connect(target, identity, policy, attempt_timeout).await
        {
            Ok(session) => match tunnel::docker_over_ssh(Arc::new(session), docker_socket).await {
                Ok(docker) => {
                    tracing::info!(target = %target, attempts, "Docker answered");
                    return Ok(docker);
                }
                Err(error) => error,
            },
            Err(ConnectError::Refused(error)) => return Err(error),
            Err(ConnectError::Unreachable(error)) => error,
        };
        let error = format!("{last_error:#}");
        tracing::debug!(%target, attempts, %error, "not reachable yet");
        let next = if is_refused(&last_error) {
            REFUSED_RETRY
        } else {
            let next = wait;
            wait = (wait * 3 / 2).min(RETRY_CAP);
            next
        };
        if tokio::time::Instant::now() + next >= deadline {
            return Err(last_error)
                .context(format!(
                    "gave up after {attempts} attempts at the boot timeout"
                ))
                .hint(
                    "raise --boot-timeout, or check that the security group lets you reach port 22",
                );
        }
        tokio::time::sleep(next).await;
    }
}

fn is_refused(error: &anyhow::Error) -> bool {
    let refused = |io: &std::io::Error| io.kind() == std::io::ErrorKind::ConnectionRefused;
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(refused)
            || matches!(
                cause.downcast_ref::<russh::Error>(),
                Some(russh::Error::IO(io)) if refused(io)
            )
    })
}

fn generate_key() -> Result<PrivateKey> {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .context("Failed to generate an SSH key")
}

/// Credentials for the pull: an explicit login wins, then ECR, then the docker config.
/// The job on a reached Docker host. The SSH session stays open until teardown is done with
/// it: the Docker client recorded there holds it, and removing a container after a failure
/// needs it.
async fn run_job(
    settings: &RunSettings,
    docker: &Docker,
    run_id: &str,
    teardown: &Teardown,
) -> Result<Outcome> {
    let credentials = registry_credentials(settings).await?;
    job::run(docker, &settings.job, credentials, run_id, teardown).await
}

async fn registry_credentials(settings: &RunSettings) -> Result<Option<DockerCredentials>> {
    let (job, aws) = (&settings.job, &settings.aws);
    if let Some(login) = &job.registry_login {
        return Ok(Some(registry::from_login(
            &job.image,
            &login.username,
            &login.password,
        )));
    }
    let use_ecr = match job.registry_auth {
        RegistryAuth::Ecr => true,
        RegistryAuth::Auto => ec2::ecr::is_ecr_image(&job.image),
        RegistryAuth::Docker => false,
    };
    if use_ecr {
        let region = aws
            .region
            .clone()
            .or_else(|| ec2::ecr::region_of(&job.image));
        let login = ec2::ecr::registry_credentials(region.as_deref(), aws.endpoint_url.as_deref())
            .await
            .context("Failed to get an ECR login")
            .hint("the caller needs ecr:GetAuthorizationToken")?;
        tracing::debug!(registry = %registry::registry_of(&job.image), "using an ECR login");
        return Ok(Some(registry::from_login(
            &job.image,
            &login.username,
            &login.password,
        )));
    }
    registry::from_docker_config(&job.docker_config, &job.image)
}
