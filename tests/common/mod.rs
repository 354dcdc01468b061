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
/// that injected faults stay with it).
pub fn instance_run(instance_type: &str, args: &[&str]) -> (Command, PathBuf) {
    let summary = temp_path("summary.json");
    let mut command = spotrun();
    command
        .args(["run", "--instance-type", instance_type])
        .args(["--image", &cloud("LOCAL_CLOUD_IMAGE")])
        .args(["--boot-timeout", "60s"])
        .arg("--summary")
        .arg(&summary)
        .args(args);
    (command, summary)
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
        let mut seen = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !seen && line.contains(&wanted) {
                seen = true;
                let _ = seen_sender.send(());
            }
            let _ = sender.send(line);
        }
    });
    if seen_receiver.recv_timeout(within).is_err() {
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

pub fn instances_of_run(run_id: &str) -> Vec<serde_json::Value> {
    instances()
        .into_iter()
        .filter(|instance| instance["tags"]["spotrun:run-id"].as_str() == Some(run_id))
        .collect()
}

/// Asserts the run left nothing: no container, and every instance of it terminated (or on its
/// way there) with its sshd gone.
pub fn assert_nothing_left(run_id: &str) {
    assert_eq!(
        containers_of_run(run_id),
        Vec::<String>::new(),
        "containers left behind"
    );
    for instance in instances_of_run(run_id) {
        let state = instance["state"].as_str().unwrap_or_default();
        assert!(
            state == "terminated" || state == "shutting-down",
            "instance {} of run {run_id} is {state}",
            instance["id"]
        );
    }
}
