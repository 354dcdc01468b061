//! `spotrun run` on a launched instance, against the local cloud's EC2 emulator: provisioning,
//! fallbacks, faults, signals at every stage, interruption, ECR login, reaping, and what the
//! launch request carries.
//!
//! Each test launches its own instance type, because the emulator's faults are keyed by type and
//! the tests run in parallel.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;

/// Long enough for a launch, a boot and a job on a busy two-core machine.
const RUN_WITHIN: Duration = Duration::from_secs(120);

fn the_instance_of_run(run_id: &str) -> Value {
    let instances = instances_of_run(run_id);
    assert_eq!(
        instances.len(),
        1,
        "run {run_id} should have launched exactly one instance: {instances:#?}"
    );
    instances.into_iter().next().unwrap()
}

#[test]
fn a_job_runs_on_a_provisioned_spot_instance_and_its_exit_code_comes_back() {
    let (mut command, summary_path) = instance_run(
        "m6i.large",
        &["--", "sh", "-c", "echo on-the-instance; exit 3"],
    );
    let output = finish(&mut command);
    assert_exit(&output, 3);
    assert_eq!(text(&output.stdout), "on-the-instance\n");

    let summary = summary(&summary_path);
    assert_eq!(summary["exit_code"], 3);
    let reported = &summary["instance"];
    let instance_id = reported["instance_id"].as_str().expect("instance id");
    assert!(instance_id.starts_with("i-"), "summary: {summary}");
    assert_eq!(reported["instance_type"], "m6i.large");
    assert_eq!(reported["market"], "spot");
    let region = cloud("AWS_REGION");
    assert_eq!(reported["region"], region.as_str());
    let zone = reported["availability_zone"].as_str().expect("zone");
    assert!(
        zone.starts_with(&region) && zone.len() > region.len(),
        "zone {zone} is not in {region}"
    );

    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);
    assert_eq!(instance["id"], instance_id);
    assert_eq!(instance["lifecycle"], "spot");
    assert!(
        instance["sshd_listening_since"].is_number(),
        "the job did not run on the instance: {instance}"
    );
    assert_nothing_left(&run_id);
}

#[test]
fn a_capacity_error_falls_back_to_the_next_instance_type() {
    let faults = Faults::on("r5.large");
    faults.inject("capacity", &[]);
    let (mut command, summary_path) =
        instance_run("r5.large", &["--instance-type", "r5.xlarge", "--", "true"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("InsufficientInstanceCapacity"),
        "the first type was not refused: {stderr}"
    );

    let summary = summary(&summary_path);
    assert_eq!(summary["instance"]["instance_type"], "r5.xlarge");
    let run_id = run_id(&summary_path);
    assert_eq!(the_instance_of_run(&run_id)["instance_type"], "r5.xlarge");
    assert_nothing_left(&run_id);
}

#[test]
fn spot_capacity_errors_fall_back_to_on_demand_only_when_the_market_allows_it() {
    let faults = Faults::on("r5.2xlarge");
    faults.inject("capacity", &["--market", "spot"]);

    let (mut command, summary_path) = instance_run(
        "r5.2xlarge",
        &["--market", "spot-then-on-demand", "--", "true"],
    );
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(summary(&summary_path)["instance"]["market"], "on-demand");
    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);
    assert_eq!(instance["lifecycle"], "on-demand");
    assert!(
        instance["request"]["InstanceMarketOptions"].is_null(),
        "an on-demand launch asked for a market: {}",
        instance["request"]
    );
    assert_nothing_left(&run_id);

    let (mut command, summary_path) =
        instance_run("r5.2xlarge", &["--market", "spot", "--", "true"]);
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(
        stderr.contains("error: Failed to launch an instance"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("hint: add instance types or subnets, or allow on-demand"),
        "stderr: {stderr}"
    );
    let run_id = common::run_id(&summary_path);
    assert_eq!(
        instances_of_run(&run_id),
        Vec::<Value>::new(),
        "a refused launch left an instance"
    );
    assert_nothing_left(&run_id);
}

#[test]
fn a_slow_boot_is_waited_out() {
    let faults = Faults::on("c6i.large");
    faults.inject("boot-delay", &["--seconds", "3"]);
    let (mut command, summary_path) = instance_run("c6i.large", &["--", "echo", "booted"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "booted\n");

    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);
    let seen = instance["seen_at"].as_f64().expect("seen_at");
    let listening = instance["sshd_listening_since"]
        .as_f64()
        .expect("sshd listened");
    assert!(
        listening - seen >= 2.9,
        "the boot delay was not applied: sshd listened {:.1}s after launch",
        listening - seen
    );
    assert_nothing_left(&run_id);
}

#[test]
fn a_wrong_host_key_on_the_instance_is_refused_before_any_container_exists() {
    let faults = Faults::on("c6i.xlarge");
    faults.inject("wrong-host-key", &[]);
    let (mut command, summary_path) = instance_run("c6i.xlarge", &["--", "true"]);
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(stderr.contains("not the expected one"), "stderr: {stderr}");
    for later_step in ["Docker answered", "pulling", "started"] {
        assert!(
            !stderr.contains(later_step),
            "spotrun went on to `{later_step}` with a wrong host key: {stderr}"
        );
    }

    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);
    assert_eq!(
        instance["wrong_host_key"], true,
        "the fault did not apply: {instance}"
    );
    assert_nothing_left(&run_id);
}

#[test]
fn an_expired_boot_timeout_fails_with_125_and_terminates_the_instance() {
    let faults = Faults::on("c6i.2xlarge");
    faults.inject("boot-delay", &["--seconds", "120"]);
    let started = Instant::now();
    let (mut command, summary_path) =
        instance_run("c6i.2xlarge", &["--boot-timeout", "3s", "--", "true"]);
    let output = finish(&mut command);
    let elapsed = started.elapsed();
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(
        stderr.contains("hint: raise --boot-timeout"),
        "stderr: {stderr}"
    );
    // Far below the boot delay: the timeout, not the boot, ended the wait.
    assert!(
        elapsed < Duration::from_secs(60),
        "took {elapsed:?} with a 3 s boot timeout"
    );

    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);
    assert!(
        instance["sshd_listening_since"].is_null(),
        "the instance booted after all: {instance}"
    );
    assert_nothing_left(&run_id);
}

/// The stage of a run at which a test stops it.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// RunInstances has created the instance but not yet answered.
    Launch,
    /// The instance runs; its sshd does not answer yet.
    BootWait,
    /// The image is being pulled on the instance.
    Pull,
    /// The container runs.
    Job,
}

/// The stage tests that pull share one big image, which each removes from the Docker engine
/// first so that the pull is real; they must not remove it under each other's pull.
static BIG_IMAGE: Mutex<()> = Mutex::new(());

/// Launch delay of the in-flight tests: ample time to signal while RunInstances has not answered.
const LAUNCH_DELAY_SECONDS: &str = "6";

/// Runs a job on `instance_type`, sends `signals` once the run reaches `stage`, and checks that
/// spotrun exits with the first signal's code after taking everything down.
fn stopped_by_signals(stage: Stage, instance_type: &str, signals: &[i32]) {
    let faults = Faults::on(instance_type);
    let mut _big_image = None;
    let big_image = cloud("LOCAL_CLOUD_BIG_IMAGE");
    let (args, marker): (Vec<&str>, &str) = match stage {
        Stage::Launch => {
            faults.inject("launch-delay", &["--seconds", LAUNCH_DELAY_SECONDS]);
            (vec!["--", "true"], "")
        }
        Stage::BootWait => {
            faults.inject("boot-delay", &["--seconds", "300"]);
            (
                vec!["--boot-timeout", "600s", "--", "true"],
                "waiting for sshd",
            )
        }
        Stage::Pull => {
            _big_image = Some(BIG_IMAGE.lock().unwrap_or_else(|p| p.into_inner()));
            let _ = Command::new("docker")
                .args(["rmi", &big_image])
                .output()
                .expect("docker CLI runs");
            (
                vec!["--image", &big_image, "--pull", "missing", "--", "true"],
                "pulling",
            )
        }
        Stage::Job => (vec!["--stop-grace", "1s", "--", "sleep", "300"], "started"),
    };

    let earlier: HashSet<String> = instances_of_type(instance_type)
        .iter()
        .filter_map(|instance| instance["id"].as_str().map(str::to_owned))
        .collect();
    let (command, summary_path) = instance_run(instance_type, &args);
    let (mut child, log) = spawn_until(command, marker, RUN_WITHIN);
    if let Stage::Launch = stage {
        wait_for_new_instance(instance_type, &earlier);
    }
    for (index, &signal) in signals.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        send_signal(&child, signal);
    }
    let status = wait_with_timeout(&mut child, RUN_WITHIN);
    let log = collect_log(log);
    let expected = 128 + signals[0];
    assert_eq!(
        status.code(),
        Some(expected),
        "stage {stage:?}; stderr:\n{}",
        log.join("\n")
    );

    let position = |needle: &str| log.iter().position(|line| line.contains(needle));
    let stopping = position("stopping:").expect("spotrun logged no signal");
    if signals.len() > 1 {
        assert!(
            position("already stopping").is_some_and(|again| again > stopping),
            "the repeated signal was not seen during teardown:\n{}",
            log.join("\n")
        );
    }
    match stage {
        Stage::Launch => {
            // The answer came only after the signal: the instance was created while the call
            // was in flight, the case where only the later answer (or the tag) names it.
            let launched = position(" launched ");
            assert!(
                launched.is_none_or(|launched| launched > stopping),
                "the launch had answered before the signal:\n{}",
                log.join("\n")
            );
        }
        Stage::BootWait | Stage::Pull => {
            assert!(
                position("started").is_none(),
                "a container started:\n{}",
                log.join("\n")
            );
        }
        Stage::Job => {}
    }
    if let Stage::Pull = stage {
        assert!(
            position(" pulled ").is_none_or(|pulled| pulled > stopping),
            "the pull had finished before the signal:\n{}",
            log.join("\n")
        );
    }

    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);
    assert!(
        !earlier.contains(instance["id"].as_str().unwrap_or_default()),
        "run {run_id} is tagged on an older instance"
    );
    if let Stage::BootWait = stage {
        assert!(instance["sshd_listening_since"].is_null());
    }
    assert_nothing_left(&run_id);
}

/// Waits until the emulator holds an instance of `instance_type` not in `earlier`.
fn wait_for_new_instance(instance_type: &str, earlier: &HashSet<String>) {
    let deadline = Instant::now() + RUN_WITHIN;
    loop {
        let created = instances_of_type(instance_type)
            .iter()
            .any(|instance| !earlier.contains(instance["id"].as_str().unwrap_or_default()));
        if created {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {instance_type} instance was launched"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_while_run_instances_is_in_flight_terminates_the_instance_it_created_and_exits_143() {
    stopped_by_signals(Stage::Launch, "m6i.xlarge", &[libc::SIGTERM]);
}

#[test]
fn sigint_while_run_instances_is_in_flight_terminates_the_instance_it_created_and_exits_130() {
    stopped_by_signals(Stage::Launch, "m6i.2xlarge", &[libc::SIGINT]);
}

#[test]
fn a_second_sigint_right_after_the_first_does_not_skip_the_terminate() {
    stopped_by_signals(Stage::Launch, "c7i.large", &[libc::SIGINT, libc::SIGINT]);
}

#[test]
fn sigterm_while_waiting_for_sshd_terminates_the_instance_and_exits_143() {
    stopped_by_signals(Stage::BootWait, "m5a.large", &[libc::SIGTERM]);
}

#[test]
fn sigint_while_waiting_for_sshd_terminates_the_instance_and_exits_130() {
    stopped_by_signals(Stage::BootWait, "m5a.xlarge", &[libc::SIGINT]);
}

#[test]
fn sigterm_during_the_pull_terminates_the_instance_and_exits_143() {
    stopped_by_signals(Stage::Pull, "m5n.large", &[libc::SIGTERM]);
}

#[test]
fn sigint_during_the_pull_terminates_the_instance_and_exits_130() {
    stopped_by_signals(Stage::Pull, "m5n.xlarge", &[libc::SIGINT]);
}

#[test]
fn sigterm_during_the_job_removes_the_container_terminates_the_instance_and_exits_143() {
    stopped_by_signals(Stage::Job, "r6i.large", &[libc::SIGTERM]);
}

#[test]
fn sigint_during_the_job_removes_the_container_terminates_the_instance_and_exits_130() {
    stopped_by_signals(Stage::Job, "r6i.xlarge", &[libc::SIGINT]);
}

#[test]
fn a_spot_interruption_under_a_running_job_exits_75() {
    let (command, summary_path) =
        instance_run("m6a.large", &["--stop-grace", "1s", "--", "sleep", "300"]);
    let (mut child, log) = spawn_until(command, "started", RUN_WITHIN);
    let so_far: Vec<String> = log.try_iter().collect();
    let instance_id = launched_instance(&so_far).expect("a `launched` line before `started`");
    local_cloud(&["interrupt", &instance_id]);

    let status = wait_with_timeout(&mut child, RUN_WITHIN);
    let rest = collect_log(log);
    assert_eq!(
        status.code(),
        Some(75),
        "stderr:\n{}\n{}",
        so_far.join("\n"),
        rest.join("\n")
    );
    assert!(
        rest.iter().any(|line| line.contains("interrupted")),
        "stderr:\n{}",
        rest.join("\n")
    );
    let summary = summary(&summary_path);
    assert_eq!(summary["exit_code"], 75);
    assert_eq!(summary["instance"]["instance_id"], instance_id.as_str());
    let run_id = run_id(&summary_path);
    assert_eq!(
        the_instance_of_run(&run_id)["state_reason"],
        "Server.SpotInstanceTermination"
    );
    assert_nothing_left(&run_id);
}

#[test]
fn an_ecr_login_made_on_the_callers_side_pulls_from_a_registry_that_demands_auth() {
    let empty_docker_config = tempfile::tempdir().unwrap();

    let (mut command, summary_path) = instance_run(
        "m6a.xlarge",
        &[
            "--registry-auth",
            "ecr",
            "--pull",
            "always",
            "--",
            "echo",
            "pulled-with-ecr",
        ],
    );
    command.env("DOCKER_CONFIG", empty_docker_config.path());
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "pulled-with-ecr\n");
    assert_nothing_left(&run_id(&summary_path));

    let (mut command, summary_path) = instance_run(
        "m6a.xlarge",
        &[
            "--registry-auth",
            "docker",
            "--pull",
            "always",
            "--",
            "true",
        ],
    );
    command.env("DOCKER_CONFIG", empty_docker_config.path());
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(stderr.contains("error: Failed to pull"), "stderr: {stderr}");
    assert_nothing_left(&run_id(&summary_path));
}

/// Terminates the instances a test keeps alive on purpose, also when the test fails.
struct TerminateOnDrop(Vec<String>);

impl Drop for TerminateOnDrop {
    fn drop(&mut self) {
        if let Err(error) = terminate_instances(&self.0) {
            eprintln!("could not terminate {:?}: {error}", self.0);
        }
    }
}

/// A run whose job fails and whose instance `--keep-on-failure` keeps; returns run and instance.
fn kept_instance(instance_type: &str, max_lifetime: &str) -> (String, String) {
    let (mut command, summary_path) = instance_run(
        instance_type,
        &[
            "--keep-on-failure",
            "--max-lifetime",
            max_lifetime,
            "--",
            "sh",
            "-c",
            "exit 1",
        ],
    );
    let output = finish(&mut command);
    assert_exit(&output, 1);
    let run_id = run_id(&summary_path);
    let instance_id = summary(&summary_path)["instance"]["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    (run_id, instance_id)
}

fn state_of(instance_id: &str) -> String {
    instance(instance_id)["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn spotrun_output(subcommand: &str, args: &[&str]) -> String {
    let output = finish(aws_command(subcommand).args(args));
    assert_exit(&output, 0);
    text(&output.stdout)
}

#[test]
fn reap_terminates_an_expired_instance_and_leaves_a_fresh_one_alone() {
    let (expired_run, expired) = kept_instance("r6a.large", "1s");
    let _expired_guard = TerminateOnDrop(vec![expired.clone()]);
    let (fresh_run, fresh) = kept_instance("r6a.large", "1h");
    let _fresh_guard = TerminateOnDrop(vec![fresh.clone()]);
    assert_eq!(state_of(&expired), "running");
    assert_eq!(state_of(&fresh), "running");
    assert_eq!(containers_of_run(&expired_run), Vec::<String>::new());
    assert_eq!(containers_of_run(&fresh_run), Vec::<String>::new());

    // expires-at has whole seconds; two more make sure it has passed.
    std::thread::sleep(Duration::from_secs(2));

    let listed = spotrun_output("reap", &["--dry-run"]);
    assert!(
        listed
            .lines()
            .any(|line| line.starts_with(&format!("would terminate {expired} "))),
        "reap --dry-run: {listed}"
    );
    assert!(!listed.contains(&fresh), "reap --dry-run: {listed}");
    assert_eq!(state_of(&expired), "running", "--dry-run terminated it");

    let reaped = spotrun_output("reap", &[]);
    assert!(
        reaped
            .lines()
            .any(|line| line.starts_with(&format!("terminated {expired} "))),
        "reap: {reaped}"
    );
    assert!(!reaped.contains(&fresh), "reap: {reaped}");
    assert!(
        matches!(state_of(&expired).as_str(), "terminated" | "shutting-down"),
        "the expired instance is {}",
        state_of(&expired)
    );
    assert_eq!(state_of(&fresh), "running");

    let listing = spotrun_output("ls", &[]);
    let row = listing
        .lines()
        .find(|line| line.starts_with(&fresh))
        .unwrap_or_else(|| panic!("ls does not list {fresh}: {listing}"));
    assert!(
        row.contains("r6a.large") && row.contains("spot") && row.ends_with(&fresh_run),
        "ls row: {row}"
    );
    assert!(!listing.contains(&expired), "ls: {listing}");

    terminate_instances(std::slice::from_ref(&fresh)).expect("terminate the fresh instance");
    assert_nothing_left(&expired_run);
    assert_nothing_left(&fresh_run);
}

/// The user-data as cloud-init would read it, parsed by the local cloud's PyYAML.
fn parse_cloud_config(user_data: &str) -> Value {
    let venv = std::env::var("SPOTRUN_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/spotrun-venv",
            std::env::var("HOME").expect("HOME")
        )
    });
    let mut python = Command::new(format!("{venv}/bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the local cloud's python runs");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(user_data.as_bytes())
        .unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "user-data is not YAML: {user_data}"
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The `ssh-ed25519 AAAA…` part of a public key line, without its comment.
fn key_blob(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The public key that belongs to an OpenSSH private key, as ssh-keygen derives it.
fn public_key_of(private_key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, private_key).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    key_blob(&ssh_keygen(&["-y", "-f"], &path))
}

fn tag<'a>(request: &'a Value, key: &str) -> Option<&'a str> {
    request["TagSpecifications"]
        .as_array()?
        .iter()
        .find(|spec| spec["ResourceType"] == "instance")?["Tags"]
        .as_array()?
        .iter()
        .find(|tag| tag["Key"] == key)?["Value"]
        .as_str()
}

#[test]
fn the_launch_request_carries_keys_dead_man_timer_tags_and_hardening() {
    let before = SystemTime::now();
    let (mut command, summary_path) = instance_run(
        "m7i.large",
        &["--max-lifetime", "30m", "--tag", "team=ci", "--", "true"],
    );
    let output = finish(&mut command);
    assert_exit(&output, 0);
    let run_id = run_id(&summary_path);
    let instance = the_instance_of_run(&run_id);

    let user_data = instance["user_data"].as_str().expect("user-data");
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    // One BEGIN and one END line: exactly one private key, whatever its format.
    assert_eq!(
        user_data.matches("PRIVATE KEY-----").count(),
        2,
        "exactly one private key belongs in user-data: {user_data}"
    );
    let config = parse_cloud_config(user_data);
    let host_private = config["ssh_keys"]["ed25519_private"]
        .as_str()
        .expect("ssh_keys.ed25519_private");
    let host_public = key_blob(
        config["ssh_keys"]["ed25519_public"]
            .as_str()
            .expect("ssh_keys.ed25519_public"),
    );
    assert!(host_public.starts_with("ssh-ed25519 "), "{host_public}");
    // The one private key is the host's; the client's never leaves spotrun.
    assert_eq!(public_key_of(host_private), host_public);
    let authorized = config["ssh_authorized_keys"]
        .as_array()
        .expect("ssh_authorized_keys");
    assert_eq!(authorized.len(), 1, "{config}");
    let client_public = key_blob(authorized[0].as_str().unwrap());
    assert!(client_public.starts_with("ssh-ed25519 "));
    assert_ne!(client_public, host_public, "the client key is the host key");

    let bootcmd = config["bootcmd"].to_string();
    assert!(
        bootcmd.contains("--on-active=1800s") && bootcmd.contains("poweroff"),
        "no dead-man timer at 30 minutes: {bootcmd}"
    );

    let tags = &instance["tags"];
    assert!(
        tags["Name"].as_str().is_some_and(|name| !name.is_empty()),
        "{tags}"
    );
    assert_eq!(tags["spotrun:run-id"], run_id.as_str());
    assert_eq!(tags["team"], "ci");
    let expires_at = humantime::parse_rfc3339(
        tags["spotrun:expires-at"]
            .as_str()
            .expect("spotrun:expires-at"),
    )
    .expect("expires-at is RFC 3339");
    let lifetime = Duration::from_secs(30 * 60);
    assert!(
        expires_at + Duration::from_secs(2) >= before + lifetime
            && expires_at <= SystemTime::now() + lifetime,
        "expires-at {:?} is not launch + 30m",
        tags["spotrun:expires-at"]
    );

    let request = &instance["request"];
    assert_eq!(tag(request, "spotrun:run-id"), Some(run_id.as_str()));
    assert_eq!(request["MetadataOptions"]["HttpTokens"], "required");
    assert_eq!(request["MetadataOptions"]["HttpPutResponseHopLimit"], 1);
    assert_eq!(instance["metadata_options"]["http_tokens"], "required");
    assert_eq!(
        instance["metadata_options"]["http_put_response_hop_limit"],
        1
    );
    assert_eq!(request["InstanceInitiatedShutdownBehavior"], "terminate");
    assert_eq!(
        instance["instance_initiated_shutdown_behavior"],
        "terminate"
    );
    let devices = instance["block_devices"].as_array().expect("block devices");
    assert_eq!(
        devices.len(),
        1,
        "the root volume was added, not replaced: {devices:?}"
    );
    assert_eq!(devices[0]["encrypted"], true, "{devices:?}");
    let market = &request["InstanceMarketOptions"];
    assert_eq!(market["MarketType"], "spot");
    assert_eq!(market["SpotOptions"]["SpotInstanceType"], "one-time");
    assert_eq!(
        market["SpotOptions"]["InstanceInterruptionBehavior"],
        "terminate"
    );
    let client_token = request["ClientToken"].as_str().unwrap_or_default();
    assert!(
        !client_token.is_empty() && client_token.len() <= 64,
        "ClientToken {client_token:?}"
    );

    assert_nothing_left(&run_id);
}

#[test]
fn a_panic_after_the_start_still_terminates_the_instance_and_exits_125() {
    let (mut command, summary) = instance_run("c7i.xlarge", &["--", "sleep", "300"]);
    command.env("SPOTRUN_DEBUG_PANIC_AFTER_START", "1");
    let output = finish(&mut command);
    assert_exit(&output, 125);
    assert!(text(&output.stderr).contains("internal error (panic)"));
    let run_id = run_id(&summary);
    assert_eq!(the_instance_of_run(&run_id)["state"], "terminated");
    assert_nothing_left(&run_id);
}

/// One ingress rule: protocol, first and last port, source ranges.
type Rule = (String, i32, i32, Vec<String>);

/// A security group's name and ingress rules.
fn ingress_of(group_id: &str) -> (String, Vec<Rule>) {
    with_ec2(async |client| {
        let output = client
            .describe_security_groups()
            .group_ids(group_id)
            .send()
            .await
            .unwrap();
        let group = &output.security_groups()[0];
        let rules = group
            .ip_permissions()
            .iter()
            .map(|rule| {
                let cidrs = rule
                    .ip_ranges()
                    .iter()
                    .filter_map(|range| range.cidr_ip())
                    .map(str::to_owned)
                    .collect();
                (
                    rule.ip_protocol().unwrap_or_default().to_owned(),
                    rule.from_port().unwrap_or_default(),
                    rule.to_port().unwrap_or_default(),
                    cidrs,
                )
            })
            .collect();
        (group.group_name().unwrap_or_default().to_owned(), rules)
    })
}

fn security_groups_of_run(run_id: &str) -> Vec<String> {
    let request = &the_instance_of_run(run_id)["request"];
    request["SecurityGroupIds"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .map(|id| id.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn without_a_security_group_spotrun_uses_its_own_that_admits_only_ssh() {
    let (mut command, summary) =
        instance_run("c7i.2xlarge", &["--ssh-cidr", "127.0.0.0/8", "--", "true"]);
    assert_exit(&finish(&mut command), 0);
    let first_run = run_id(&summary);
    let groups = security_groups_of_run(&first_run);
    assert_eq!(groups.len(), 1, "{groups:?}");
    let (name, rules) = ingress_of(&groups[0]);
    assert_eq!(name, "spotrun-ssh-22-from-127-0-0-0-8");
    assert_eq!(
        rules,
        [("tcp".to_owned(), 22, 22, vec!["127.0.0.0/8".to_owned()])]
    );
    assert_nothing_left(&first_run);

    // The next run with the same range reuses the group instead of piling up new ones.
    let (mut command, summary) =
        instance_run("c7i.2xlarge", &["--ssh-cidr", "127.0.0.0/8", "--", "true"]);
    assert_exit(&finish(&mut command), 0);
    let second_run = run_id(&summary);
    assert_eq!(security_groups_of_run(&second_run), groups);
    assert_nothing_left(&second_run);

    // A group the user names is used as it is.
    let (mut command, summary) = instance_run(
        "c7i.2xlarge",
        &["--security-group", &groups[0], "--", "true"],
    );
    assert_exit(&finish(&mut command), 0);
    let third_run = run_id(&summary);
    assert_eq!(security_groups_of_run(&third_run), groups);
    assert_nothing_left(&third_run);
}

#[test]
fn an_ssh_cidr_that_is_not_an_ipv4_range_is_refused_before_any_launch() {
    let (mut command, _) = instance_run("c7i.4xlarge", &["--ssh-cidr", "everyone", "--", "true"]);
    let output = finish(&mut command);
    assert_exit(&output, 125);
    assert!(text(&output.stderr).contains("not an IPv4 range"));
    assert!(instances_of_type("c7i.4xlarge").is_empty());
}
