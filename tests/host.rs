//! `spotrun run --host`: a job on an existing Docker host over SSH, against the local cloud's
//! sshd, dockerd and registry.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

#[test]
fn exit_code_of_the_container_is_returned() {
    let (mut command, summary) = host_run(&["--", "sh", "-c", "exit 3"]);
    let output = finish(&mut command);
    assert_exit(&output, 3);
    assert_eq!(common::summary(&summary)["exit_code"], 3);
    assert_nothing_left(&run_id(&summary));

    let (mut command, summary) = host_run(&["--", "true"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn stdout_and_stderr_are_kept_apart() {
    let (mut command, _) = host_run(&[
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; echo more-out",
    ]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "to-out\nmore-out\n");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("to-err\n"), "stderr: {stderr}");
    assert!(
        !stderr.contains("to-out"),
        "stdout leaked into stderr: {stderr}"
    );
}

#[test]
fn twenty_megabytes_of_binary_output_arrive_byte_exact() {
    // The container hashes what it sends; the hash travels on stderr, the bytes on stdout.
    let script =
        "head -c 20000000 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob";
    let (mut command, _) = host_run(&["--", "sh", "-c", script]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(output.stdout.len(), 20_000_000);
    let local_hash = format!("{:x}", Sha256::digest(&output.stdout));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("{local_hash}  /tmp/blob")),
        "hash mismatch; stderr: {stderr}"
    );
}

#[test]
fn env_workdir_and_entrypoint_reach_the_container() {
    let env_file = temp_path("job.env");
    std::fs::write(&env_file, "# a comment\nFROM_FILE=file value\n").unwrap();
    let (mut command, _) = host_run(&[
        "-e",
        "GREETING=hello world",
        "-e",
        "SPOTRUN_TEST_PASSTHROUGH",
        "--env-file",
        env_file.to_str().unwrap(),
        "-w",
        "/tmp",
        "--entrypoint",
        "sh",
        "--",
        "-c",
        "echo \"$GREETING|$SPOTRUN_TEST_PASSTHROUGH|$FROM_FILE|$(pwd)\"",
    ]);
    command.env("SPOTRUN_TEST_PASSTHROUGH", "from the caller");
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(
        text(&output.stdout),
        "hello world|from the caller|file value|/tmp\n"
    );
}

#[test]
fn container_user_is_applied() {
    let (mut command, _) = host_run(&["--container-user", "65534", "--", "sh", "-c", "id -u"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "65534\n");
}

#[test]
fn image_is_pulled_from_the_authenticated_registry_with_docker_config_credentials() {
    let (mut command, _) = host_run(&["--pull", "always", "--", "echo", "pulled"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "pulled\n");
    assert!(
        text(&output.stderr).contains("pulled"),
        "no pull was logged"
    );
}

#[test]
fn registry_password_can_come_from_stdin() {
    let empty_config = tempfile::tempdir().unwrap();
    let (mut command, _) = host_run(&[
        "--pull",
        "always",
        "--registry-user",
        &cloud("LOCAL_CLOUD_REGISTRY_USER"),
        "--registry-password-stdin",
        "--",
        "echo",
        "ok",
    ]);
    command
        .env("DOCKER_CONFIG", empty_config.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let password = cloud("LOCAL_CLOUD_REGISTRY_PASSWORD");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "ok\n");
}

#[test]
fn wrong_registry_password_fails_with_125_and_a_clear_message() {
    let empty_config = tempfile::tempdir().unwrap();
    let (mut command, summary) = host_run(&[
        "--pull",
        "always",
        "--registry-user",
        &cloud("LOCAL_CLOUD_REGISTRY_USER"),
        "--",
        "true",
    ]);
    command
        .env("DOCKER_CONFIG", empty_config.path())
        .env("SPOTRUN_REGISTRY_PASSWORD", "not-the-password");
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(stderr.contains("error: Failed to pull"), "stderr: {stderr}");
    assert!(
        stderr.contains("hint: check the registry credentials"),
        "stderr: {stderr}"
    );
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn unknown_image_fails_with_125() {
    let image = format!("{}/spotrun/no-such-image:1", cloud("LOCAL_CLOUD_REGISTRY"));
    let (mut command, summary) = host_run(&["--image", &image, "--", "true"]);
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(stderr.contains("no-such-image"), "stderr: {stderr}");
    assert_nothing_left(&run_id(&summary));
}

/// A valid ed25519 key that belongs to no host of the local cloud.
const OTHER_HOST_KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIGL7tQwR4gIDj2Pa6e0MLqVWPKTdlHSjlEd6dZvJxHiU";

#[test]
fn wrong_host_key_is_refused_with_125_and_no_container_is_created() {
    let known_hosts = temp_path("known_hosts");
    let host = cloud("LOCAL_CLOUD_HOST");
    let (address, port) = host.split_once('@').unwrap().1.rsplit_once(':').unwrap();
    // A valid key, but not the host's.
    std::fs::write(
        &known_hosts,
        format!("[{address}]:{port} ssh-ed25519 {OTHER_HOST_KEY}\n"),
    )
    .unwrap();
    let (mut command, summary) =
        host_run(&["--known-hosts", known_hosts.to_str().unwrap(), "--", "true"]);
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(stderr.contains("not the expected one"), "stderr: {stderr}");
    assert!(!stderr.contains("started"), "a container ran: {stderr}");
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn unknown_host_key_is_refused_in_strict_mode_and_learned_with_accept_new() {
    let known_hosts = temp_path("known_hosts");
    let (mut command, _) =
        host_run(&["--known-hosts", known_hosts.to_str().unwrap(), "--", "true"]);
    let output = finish(&mut command);
    assert_exit(&output, 125);
    assert!(text(&output.stderr).contains("not in known_hosts"));

    let (mut command, _) = host_run(&[
        "--known-hosts",
        known_hosts.to_str().unwrap(),
        "--host-key-check",
        "accept-new",
        "--",
        "true",
    ]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    let learned = std::fs::read_to_string(&known_hosts).unwrap();
    let expected_key = cloud("LOCAL_CLOUD_HOST_KEY");
    let expected_blob = expected_key.split_whitespace().nth(1).unwrap();
    assert!(learned.contains(expected_blob), "learned: {learned}");
}

#[test]
fn host_key_can_be_pinned_by_key_or_fingerprint() {
    let empty_known_hosts = temp_path("known_hosts");
    let key = cloud("LOCAL_CLOUD_HOST_KEY");
    let (mut command, _) = host_run(&[
        "--known-hosts",
        empty_known_hosts.to_str().unwrap(),
        "--host-key",
        &key,
        "--",
        "true",
    ]);
    let output = finish(&mut command);
    assert_exit(&output, 0);

    let key_file = temp_path("host.pub");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let fingerprint = ssh_keygen(&["-lf"], &key_file)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(fingerprint.starts_with("SHA256:"));
    let (mut command, _) = host_run(&["--host-key", &fingerprint, "--", "true"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);

    let (mut command, _) = host_run(&[
        "--host-key",
        "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "--",
        "true",
    ]);
    let output = finish(&mut command);
    assert_exit(&output, 125);
}

#[test]
fn hashed_known_hosts_entries_are_honoured() {
    let known_hosts = temp_path("known_hosts");
    std::fs::copy(cloud("LOCAL_CLOUD_KNOWN_HOSTS"), &known_hosts).unwrap();
    ssh_keygen(&["-H", "-f"], &known_hosts);
    assert!(
        std::fs::read_to_string(&known_hosts)
            .unwrap()
            .starts_with("|1|")
    );
    let (mut command, _) =
        host_run(&["--known-hosts", known_hosts.to_str().unwrap(), "--", "true"]);
    let output = finish(&mut command);
    assert_exit(&output, 0);
}

#[test]
fn ssh_agent_is_used_when_no_identity_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = std::process::Command::new("ssh-add")
        .arg(cloud("LOCAL_CLOUD_IDENTITY"))
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .unwrap();
    assert!(added.status.success(), "ssh-add: {}", text(&added.stderr));

    let mut command = spotrun();
    command
        .args([
            "run",
            "--host",
            &cloud("LOCAL_CLOUD_HOST"),
            "--known-hosts",
            &cloud("LOCAL_CLOUD_KNOWN_HOSTS"),
        ])
        .args([
            "--image",
            &cloud("LOCAL_CLOUD_IMAGE"),
            "--",
            "echo",
            "via-agent",
        ])
        .env("SSH_AUTH_SOCK", &socket)
        .env_remove("SPOTRUN_IDENTITY");
    let output = finish(&mut command);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "via-agent\n");
}

#[test]
fn sigterm_during_a_long_sleep_removes_the_container_and_exits_143() {
    let (command, summary) = host_run(&["--stop-grace", "1s", "--", "sleep", "300"]);
    let (mut child, _log) = spawn_until(command, "started", Duration::from_secs(60));
    send_signal(&child, libc::SIGTERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(143));
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn sigint_during_a_long_sleep_removes_the_container_and_exits_130() {
    let (command, summary) = host_run(&["--stop-grace", "1s", "--", "sleep", "300"]);
    let (mut child, _log) = spawn_until(command, "started", Duration::from_secs(60));
    send_signal(&child, libc::SIGINT);
    // A second Ctrl-C while stopping must not cut the teardown short.
    std::thread::sleep(Duration::from_millis(100));
    send_signal(&child, libc::SIGINT);
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(130));
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn timeout_stops_the_job_exits_124_and_removes_the_container() {
    let (mut command, summary) = host_run(&[
        "--timeout",
        "2s",
        "--stop-grace",
        "1s",
        "--",
        "sh",
        "-c",
        "echo before; sleep 300",
    ]);
    let output = finish(&mut command);
    assert_exit(&output, 124);
    assert_eq!(text(&output.stdout), "before\n");
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn unreachable_host_fails_with_125_within_the_connect_timeout() {
    // A listener that accepts but never speaks SSH: the handshake can only time out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let (mut command, _) = host_run(&[
        "--host",
        &format!("spotrun@127.0.0.1:{port}"),
        "--connect-timeout",
        "2s",
        "--",
        "true",
    ]);
    let output = finish(&mut command);
    let elapsed = started.elapsed();
    drop(silent);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(stderr.contains("no SSH answer"), "stderr: {stderr}");
    assert!(
        elapsed < Duration::from_secs(15),
        "took {elapsed:?} with a 2 s connect timeout"
    );
}

#[test]
fn missing_image_flag_fails_with_125_and_a_hint() {
    let mut command = spotrun();
    command
        .args(["run", "--host", &cloud("LOCAL_CLOUD_HOST"), "--", "true"])
        .env_remove("SPOTRUN_IMAGE");
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(
        stderr.contains("hint: name one with --image"),
        "stderr: {stderr}"
    );
}

#[test]
fn timeout_stops_a_job_that_floods_stdout_without_stalling_the_stop() {
    // Every Docker call shares the SSH session with the attach; if the flood went unread while
    // the stop call waits for its answer, the stop would hang behind it.
    let (mut command, summary) = host_run(&[
        "--timeout",
        "2s",
        "--stop-grace",
        "1s",
        "--",
        "cat",
        "/dev/zero",
    ]);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let output = finish(&mut command);
    assert_exit(&output, 124);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the stop hung: {:?}",
        started.elapsed()
    );
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn output_that_starts_at_once_does_not_stall_the_start() {
    let (mut command, _) = host_run(&["--", "head", "-c", "30000000", "/dev/zero"]);
    command.stderr(Stdio::piped());
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(output.stdout.len(), 30_000_000);
    assert!(output.stdout.iter().all(|byte| *byte == 0));
}

/// The log driver of the run's one container, which `--keep-container` leaves behind; the
/// container is removed before returning.
fn log_driver_of_kept_container(extra: &[&str]) -> String {
    let mut args = vec!["--keep-container"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "echo", "kept"]);
    let (mut command, summary) = host_run(&args);
    let output = finish(&mut command);
    assert_exit(&output, 0);
    let containers = containers_of_run(&run_id(&summary));
    assert_eq!(containers.len(), 1, "--keep-container kept {containers:?}");
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.LogConfig.Type}}",
            &containers[0],
        ])
        .output()
        .unwrap();
    let removed = std::process::Command::new("docker")
        .args(["rm", "-f", &containers[0]])
        .output()
        .unwrap();
    assert!(removed.status.success());
    text(&inspect.stdout).trim().to_owned()
}

#[test]
fn containers_log_with_the_local_driver_unless_told_otherwise() {
    assert_eq!(log_driver_of_kept_container(&[]), "local");
    assert_eq!(
        log_driver_of_kept_container(&["--log-driver", "default"]),
        "json-file"
    );
}

#[test]
fn a_panic_after_the_start_still_removes_the_container_and_exits_125() {
    let (mut command, summary) = host_run(&["--stop-grace", "1s", "--", "sleep", "300"]);
    command.env("SPOTRUN_DEBUG_PANIC_AFTER_START", "1");
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(
        stderr.contains("internal error (panic)"),
        "stderr: {stderr}"
    );
    assert_nothing_left(&run_id(&summary));
}

#[test]
fn an_encrypted_identity_needs_its_passphrase() {
    let key = temp_path("id_ed25519");
    std::fs::copy(cloud("LOCAL_CLOUD_IDENTITY"), &key).unwrap();
    ssh_keygen(&["-q", "-p", "-N", "correct horse", "-f"], &key);

    let (mut command, _) = host_run(&["-i", key.to_str().unwrap(), "--", "true"]);
    command.env_remove("SPOTRUN_IDENTITY_PASSPHRASE");
    let output = finish(&mut command);
    let stderr = text(&output.stderr);
    assert_exit(&output, 125);
    assert!(
        stderr.contains("hint: an encrypted key needs SPOTRUN_IDENTITY_PASSPHRASE"),
        "stderr: {stderr}"
    );

    let (mut command, _) = host_run(&["-i", key.to_str().unwrap(), "--", "echo", "unlocked"]);
    command.env("SPOTRUN_IDENTITY_PASSPHRASE", "correct horse");
    let output = finish(&mut command);
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout), "unlocked\n");
}
