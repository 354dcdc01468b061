//! Shared helpers for the integration tests: the local cloud's coordinates (exported by
//! `scripts/local-cloud env`, which `scripts/test` evaluates), running the real binary, and
//! looking at the end state in Docker and in the EC2 emulator.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub fn cloud(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test (it starts the local cloud)")
    })
}

pub fn spotrun() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spotrun"));
    command.stdin(Stdio::null());
    command
}

/// `spotrun run` against the local cloud's SSH host, with the test image, a summary file, and
/// the given extra arguments (container command after `--`).
pub fn host_run(args: &[&str]) -> (Command, PathBuf) {
    let summary = temp_path("summary.json");
    let mut command = spotrun();
    command.arg("run");
    let defaults = [
        ("--host", cloud("LOCAL_CLOUD_HOST")),
        ("-i", cloud("LOCAL_CLOUD_IDENTITY")),
        ("--known-hosts", cloud("LOCAL_CLOUD_KNOWN_HOSTS")),
        ("--image", cloud("LOCAL_CLOUD_IMAGE")),
    ];
    let given: Vec<&str> = args
        .iter()
        .take_while(|arg| **arg != "--")
        .copied()
        .collect();
    for (flag, value) in defaults {
        if !given.contains(&flag) {
            command.args([flag, &value]);
        }
    }
    command.arg("--summary").arg(&summary).args(args);
    (command, summary)
}

/// `spotrun run` on an emulated EC2 instance of `instance_type` (each test uses its own type so
/// that injected faults stay with it), with the test image and a generous boot timeout unless
/// `args` name their own.
pub fn instance_run(instance_type: &str, args: &[&str]) -> (Command, PathBuf) {
    let summary = temp_path("summary.json");
    let mut command = aws_command("run");
    command.args(["--instance-type", instance_type]);
    let given: Vec<&str> = args
        .iter()
        .take_while(|arg| **arg != "--")
        .copied()
        .collect();
    let defaults = [
        ("--image", cloud("LOCAL_CLOUD_IMAGE")),
        ("--boot-timeout", "60s".to_owned()),
    ];
    for (flag, value) in defaults {
        if !given.contains(&flag) {
            command.args([flag, &value]);
        }
    }
    command.arg("--summary").arg(&summary).args(args);
    (command, summary)
}

/// A spotrun subcommand that talks to EC2, after checking that the environment points it at the
/// local cloud: nothing may reach a real AWS endpoint or the instance metadata address.
pub fn aws_command(subcommand: &str) -> Command {
    assert_local_aws_environment();
    let mut command = spotrun();
    command.arg(subcommand);
    command
}

pub fn assert_local_aws_environment() {
    let endpoint = cloud("AWS_ENDPOINT_URL");
    assert!(
        endpoint.starts_with("http://127."),
        "AWS_ENDPOINT_URL={endpoint} is not on loopback"
    );
    assert_eq!(cloud("AWS_EC2_METADATA_DISABLED"), "true");
    for name in ["AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        cloud(name);
    }
}

pub fn temp_path(name: &str) -> PathBuf {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    dir.join(name)
}

pub fn finish(command: &mut Command) -> Output {
    command.output().expect("spotrun runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn summary(path: &PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("no summary at {}: {error}", path.display()));
    serde_json::from_str(&text).expect("summary is JSON")
}

pub fn run_id(path: &PathBuf) -> String {
    summary(path)["run_id"].as_str().expect("run_id").to_owned()
}

/// Containers (running or not) that carry the run's label, as the docker CLI sees them.
pub fn containers_of_run(run_id: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=spotrun.run-id={run_id}"),
        ])
        .output()
        .expect("docker CLI runs");
    assert!(
        output.status.success(),
        "docker ps failed: {}",
        text(&output.stderr)
    );
    text(&output.stdout).lines().map(str::to_owned).collect()
}

/// Starts spotrun and returns once a line of its stderr contains `marker`; stderr keeps being
/// collected in the background.
pub fn spawn_until(
    mut command: Command,
    marker: &str,
    within: Duration,
) -> (Child, mpsc::Receiver<String>) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spotrun starts");
    let stderr = child.stderr.take().expect("stderr");
    let (sender, receiver) = mpsc::channel();
    let wanted = marker.to_owned();
    let (seen_sender, seen_receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = wanted.is_empty();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !seen && line.contains(&wanted) {
                seen = true;
                let _ = seen_sender.send(());
            }
            let _ = sender.send(line);
        }
    });
    if !marker.is_empty() && seen_receiver.recv_timeout(within).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let log: Vec<String> = receiver.try_iter().collect();
        panic!(
            "spotrun never logged `{marker}`; stderr so far:\n{}",
            log.join("\n")
        );
    }
    (child, receiver)
}

/// Everything spotrun wrote to stderr, once it has exited (the reader ends with the pipe).
pub fn collect_log(receiver: mpsc::Receiver<String>) -> Vec<String> {
    receiver.iter().collect()
}

/// The instance id from spotrun's `launched instance=i-…` log line.
pub fn launched_instance(log: &[String]) -> Option<String> {
    log.iter()
        .find(|line| line.contains(" launched "))
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("instance="))
                .map(|id| id.trim_matches('"').to_owned())
        })
}

pub fn send_signal(child: &Child, signal: i32) {
    let result = unsafe_kill(child.id() as i32, signal);
    assert_eq!(result, 0, "kill failed");
}

fn unsafe_kill(pid: i32, signal: i32) -> i32 {
    // The test crate allows what the binary forbids; sending a signal needs libc.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, signal)
    }
}

pub fn wait_with_timeout(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("spotrun did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The local cloud's helper script, for fault injection and for the emulator's view of
/// instances.
pub fn local_cloud(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/local-cloud");
    let output = Command::new(script)
        .args(args)
        .output()
        .expect("local-cloud runs");
    assert!(
        output.status.success(),
        "local-cloud {args:?} failed: {}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Every instance the emulator knows, as it reports them.
pub fn instances() -> Vec<serde_json::Value> {
    local_cloud(&["instances"])
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("instance JSON"))
        .collect()
}

pub fn instances_of_type(instance_type: &str) -> Vec<serde_json::Value> {
    instances()
        .into_iter()
        .filter(|instance| instance["instance_type"].as_str() == Some(instance_type))
        .collect()
}

pub fn instance(instance_id: &str) -> serde_json::Value {
    instances()
        .into_iter()
        .find(|instance| instance["id"].as_str() == Some(instance_id))
        .unwrap_or_else(|| panic!("the emulator knows no instance {instance_id}"))
}

pub fn instances_of_run(run_id: &str) -> Vec<serde_json::Value> {
    instances()
        .into_iter()
        .filter(|instance| instance["tags"]["spotrun:run-id"].as_str() == Some(run_id))
        .collect()
}

/// Asserts the run left nothing: no container, and every instance of it terminated (or on its
/// way there) with its sshd gone. The emulator removes a terminated instance's containers as a
/// vanished VM would, so a container it had to remove is one spotrun left behind, unless the
/// instance was taken away under the job (a spot interruption).
pub fn assert_nothing_left(run_id: &str) {
    assert_eq!(
        containers_of_run(run_id),
        Vec::<String>::new(),
        "containers left behind"
    );
    for instance in instances_of_run(run_id) {
        let id = &instance["id"];
        let state = instance["state"].as_str().unwrap_or_default();
        assert!(
            state == "terminated" || state == "shutting-down",
            "instance {id} of run {run_id} is {state}"
        );
        assert_eq!(instance["sshd"], false, "instance {id} still runs sshd");
        let interrupted =
            instance["state_reason"].as_str() == Some("Server.SpotInstanceTermination");
        if !interrupted {
            assert_eq!(
                instance["removed_containers"],
                serde_json::json!([]),
                "spotrun left containers on instance {id} for the terminate to take down"
            );
        }
    }
}

/// Faults injected for one instance type, cleared again (for that type only) when dropped, even
/// by a failing test.
pub struct Faults {
    instance_type: String,
}

impl Faults {
    pub fn on(instance_type: &str) -> Faults {
        local_cloud(&["fault", "clear", "--instance-type", instance_type]);
        Faults {
            instance_type: instance_type.to_owned(),
        }
    }

    /// `scripts/local-cloud fault KIND --instance-type T ARGS…`
    pub fn inject(&self, kind: &str, args: &[&str]) {
        let mut all = vec!["fault", kind, "--instance-type", &self.instance_type];
        all.extend_from_slice(args);
        local_cloud(&all);
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        // No assertion here: a panic while a failed test unwinds would abort the whole run.
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/local-cloud");
        let _ = Command::new(script)
            .args(["fault", "clear", "--instance-type", &self.instance_type])
            .output();
    }
}

/// Runs `work` with an EC2 client of the local cloud's emulator, as an operator's tool would.
pub fn with_ec2<T>(work: impl AsyncFnOnce(aws_sdk_ec2::Client) -> T) -> T {
    assert_local_aws_environment();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(cloud("AWS_ENDPOINT_URL"))
            .load()
            .await;
        work(aws_sdk_ec2::Client::new(&config)).await
    })
}

/// Terminates instances through the EC2 API, as an operator would; for instances a test kept
/// alive on purpose.
pub fn terminate_instances(instance_ids: &[String]) -> Result<(), String> {
    if instance_ids.is_empty() {
        return Ok(());
    }
    with_ec2(async |client| {
        client
            .terminate_instances()
            .set_instance_ids(Some(instance_ids.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|error| format!("{}", aws_sdk_ec2::error::DisplayErrorContext(error)))
    })
}

/// Runs `ssh-keygen ARGS FILE`, which must succeed, and returns its stdout.
pub fn ssh_keygen(args: &[&str], file: &std::path::Path) -> String {
    let output = Command::new("ssh-keygen")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ssh-keygen {args:?}: {}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Asserts spotrun's exit code, showing its stderr when it differs.
pub fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stderr: {}",
        text(&output.stderr)
    );
}
