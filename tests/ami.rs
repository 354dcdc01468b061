//! Checks of the `ami/` folder: the Packer template, the files it installs and the provisioning
//! scripts. Every check runs a real program (shellcheck, python-hcl2, sshd, dockerd, cloud-init,
//! the scripts themselves in a Debian root); none of them needs Packer or AWS. A missing
//! prerequisite fails the test with the package to install: a check that skips itself quietly
//! would pass on a machine where it never ran.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

/// Where the scripts and files land on the build instance; the template says the same.
const FILES_ON_INSTANCE: &str = "/tmp/spotrun-ami-files";
fn ami_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ami")
}

fn install_hint(program: &str) -> String {
    format!("`{program}` is required by this test and was not found; run scripts/install-deps")
}

/// Finds a program on PATH or in the sbin directories, which a non-login root shell may lack.
fn require_program(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{}", install_hint(program)))
}

fn run(program: impl AsRef<OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("Failed to start `{}`: {error}", program.display()))
}

fn describe(output: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn run_ok(program: impl AsRef<OsStr>, args: &[&str]) -> Output {
    let name = program.as_ref().to_string_lossy().into_owned();
    let output = run(program, args);
    assert!(
        output.status.success(),
        "`{name} {}` failed\n{}",
        args.join(" "),
        describe(&output)
    );
    output
}

fn require_root() {
    let output = run("id", &["-u"]);
    let uid = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert_eq!(
        uid, "0",
        "this test must run as root: it uses chroot and namespaces"
    );
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("SPOTRUN_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            Path::new(&home).join(".cache/spotrun-venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "the Python virtualenv with python-hcl2 and PyYAML was not found at `{}`; run \
         scripts/install-deps or set SPOTRUN_VENV",
        python.display()
    );
    python
}

/// Runs a Python snippet in the virtualenv on one file and parses the JSON it prints.
fn python_json(snippet: &str, file: &Path) -> Value {
    let python = venv_python();
    let output = run_ok(&python, &["-c", snippet, file.to_str().unwrap()]);
    serde_json::from_slice(&output.stdout).expect("the Python helper printed invalid JSON")
}

fn template() -> &'static Value {
    static TEMPLATE: OnceLock<Value> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        python_json(
            "import hcl2, json, sys; print(json.dumps(hcl2.load(open(sys.argv[1]))))",
            &ami_dir().join("spotrun.pkr.hcl"),
        )
    })
}

/// python-hcl2 keeps the quotes of string literals and of block labels; this takes them off.
fn literal(value: &Value) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, found {value}"));
    text.strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or(text)
        .to_owned()
}

/// The body of the first block `kind "label"...` whose labels match, e.g. source amazon-ebs.
fn labelled_block<'a>(kind: &str, labels: &[&str]) -> &'a Value {
    let blocks = template()[kind]
        .as_array()
        .unwrap_or_else(|| panic!("no `{kind}` block"));
    blocks
        .iter()
        .find_map(|block| {
            labels
                .iter()
                .try_fold(block, |body, label| body.get(format!("\"{label}\"")))
        })
        .unwrap_or_else(|| panic!("no `{kind} {}` block in the template", labels.join(" ")))
}

fn variable_default(name: &str) -> &'static Value {
    &labelled_block("variable", &[name])["default"]
}

/// An attribute's value, with a bare `${var.NAME}` replaced by that variable's default.
fn resolved(value: &Value) -> Value {
    match value
        .as_str()
        .and_then(|text| text.strip_prefix("${var.")?.strip_suffix('}'))
    {
        Some(variable) => variable_default(variable).clone(),
        None => value.clone(),
    }
}

fn amazon_source() -> &'static Value {
    labelled_block("source", &["amazon-ebs", "spotrun"])
}

fn locals() -> &'static Value {
    &template()["locals"][0]
}

fn build_provisioners() -> &'static Vec<Value> {
    template()["build"][0]["provisioner"]
        .as_array()
        .expect("the build has no provisioners")
}

/// The provisioning scripts in the order the template runs them, as paths in this checkout.
fn scripts_in_template_order() -> Vec<PathBuf> {
    let shell = build_provisioners()
        .iter()
        .filter_map(|provisioner| provisioner.get("\"shell\""))
        .find(|shell| shell.get("scripts").is_some())
        .expect("no shell provisioner runs the scripts");
    shell["scripts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|script| {
            let script = literal(script);
            let relative = script
                .strip_prefix("${path.root}/")
                .unwrap_or_else(|| panic!("`{script}` is not relative to the template"));
            ami_dir().join(relative)
        })
        .collect()
}

fn scripts_on_disk() -> Vec<PathBuf> {
    let mut scripts: Vec<PathBuf> = fs::read_dir(ami_dir().join("scripts"))
        .expect("ami/scripts is missing")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension() == Some(OsStr::new("sh")))
        .collect();
    scripts.sort();
    assert!(
        scripts.len() >= 5,
        "expected the provisioning scripts in ami/scripts"
    );
    scripts
}

/// `sshd -T` output as keyword → values (keywords such as hostkey repeat).
fn sshd_effective(config: &Path) -> BTreeMap<String, Vec<String>> {
    let sshd = require_program("sshd");
    // sshd checks for its privilege separation directory even when only testing a config.
    fs::create_dir_all("/run/sshd").expect("Failed to create /run/sshd");
    let output = run_ok(&sshd, &["-T", "-f", config.to_str().unwrap()]);
    let mut effective: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let (keyword, value) = line.split_once(' ').unwrap_or((line, ""));
        effective
            .entry(keyword.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    effective
}

fn assert_effective(effective: &BTreeMap<String, Vec<String>>, keyword: &str, expected: &str) {
    let values = effective
        .get(keyword)
        .map(Vec::as_slice)
        .unwrap_or_default();
    assert_eq!(values, [expected], "sshd -T reports {keyword} = {values:?}");
}

fn throwaway_host_key(dir: &Path) -> PathBuf {
    let key = dir.join("ssh_host_ed25519_key");
    let keygen = require_program("ssh-keygen");
    run_ok(
        keygen,
        &["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()],
    );
    key
}

#[test]
fn every_provisioning_script_passes_shellcheck() {
    let shellcheck = require_program("shellcheck");
    let scripts = scripts_on_disk();
    let mut args = vec!["--shell=bash", "--severity=style", "--format=gcc"];
    args.extend(scripts.iter().map(|script| script.to_str().unwrap()));
    run_ok(shellcheck, &args);
}

#[test]
fn every_provisioning_script_is_executable_and_stops_at_the_first_error() {
    use std::os::unix::fs::PermissionsExt;

    for script in scripts_on_disk() {
        let text = fs::read_to_string(&script).unwrap();
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{} lacks its shebang",
            script.display()
        );
        assert!(
            text.lines().any(|line| line == "set -euo pipefail"),
            "{} does not `set -euo pipefail`",
            script.display()
        );
        let mode = fs::metadata(&script).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", script.display());
    }
}

#[test]
fn template_requires_imdsv2_encrypts_the_volume_and_builds_on_spot() {
    let source = amazon_source();

    let metadata = &source["metadata_options"][0];
    assert_eq!(literal(&metadata["http_tokens"]), "required");
    assert_eq!(metadata["http_put_response_hop_limit"], 1);
    assert_eq!(literal(&source["imds_support"]), "v2.0");

    let root_volume = &source["launch_block_device_mappings"][0];
    assert_eq!(root_volume["encrypted"], true);
    assert_eq!(root_volume["delete_on_termination"], true);
    assert_eq!(literal(&root_volume["volume_type"]), "gp3");
    let size = resolved(&root_volume["volume_size"]);
    assert!(
        size.as_u64().is_some_and(|size| size >= 8),
        "volume size {size} is not a size"
    );

    assert_eq!(literal(&source["spot_price"]), "auto");
    let types = resolved(&source["spot_instance_types"]);
    let types = types.as_array().expect("spot_instance_types is not a list");
    assert!(
        types.len() >= 2,
        "the spot build should be able to fall back across types"
    );
    // Packer accepts spot_instance_types or instance_type, never both.
    assert!(source.get("instance_type").is_none());
    assert_eq!(literal(&source["shutdown_behavior"]), "terminate");

    let plugins = &template()["packer"][0]["required_plugins"][0]["amazon"];
    assert_eq!(literal(&plugins["source"]), "github.com/hashicorp/amazon");
    assert!(!literal(&plugins["version"]).is_empty());
}

#[test]
fn template_builds_from_ubuntu_24_04_by_default_and_offers_amazon_linux_2023() {
    assert_eq!(literal(variable_default("base_os")), "ubuntu-24.04");

    let bases = &locals()["bases"];
    let ubuntu = &bases["\"ubuntu-24.04\""];
    assert_eq!(literal(&ubuntu["owner"]), "099720109477");
    assert!(literal(&ubuntu["name"]).contains("ubuntu-noble-24.04"));
    assert_eq!(literal(&ubuntu["ssh_user"]), "ubuntu");
    let amazon_linux = &bases["\"al2023\""];
    assert!(literal(&amazon_linux["name"]).starts_with("al2023-ami-"));
    assert_eq!(literal(&amazon_linux["ssh_user"]), "ec2-user");

    let source = amazon_source();
    let filter = &source["source_ami_filter"][0];
    assert_eq!(filter["owners"][0], "${local.base.owner}");
    assert_eq!(filter["filters"]["name"], "${local.base.name}");
    assert_eq!(filter["most_recent"], true);
    assert_eq!(source["ssh_username"], "${local.base.ssh_user}");
    for tags in ["run_tags", "tags"] {
        assert!(source.get(tags).is_some(), "the template sets no {tags}");
    }
}

#[test]
fn template_runs_every_provisioning_script_in_order_with_the_ssh_user() {
    let in_template = scripts_in_template_order();
    assert_eq!(
        in_template,
        scripts_on_disk(),
        "the template and ami/scripts disagree"
    );
    let last = in_template
        .last()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        last.contains("strip"),
        "stripping the build's identity must come last, not {last}"
    );

    let shell = build_provisioners()
        .iter()
        .filter_map(|provisioner| provisioner.get("\"shell\""))
        .find(|shell| shell.get("scripts").is_some())
        .unwrap();
    assert!(
        literal(&shell["execute_command"]).contains("sudo"),
        "the scripts must run as root"
    );
    let environment: Vec<String> = shell["environment_vars"]
        .as_array()
        .unwrap()
        .iter()
        .map(literal)
        .collect();
    for expected in [
        "SPOTRUN_SSH_USER=${local.base.ssh_user}".to_owned(),
        format!("SPOTRUN_AMI_FILES={FILES_ON_INSTANCE}"),
    ] {
        assert!(
            environment.contains(&expected),
            "{expected} missing from {environment:?}"
        );
    }
    let prepull = environment
        .iter()
        .find(|var| var.starts_with("SPOTRUN_PREPULL_IMAGES="));
    assert!(
        prepull.is_some_and(|var| var.contains("var.prepull_images")),
        "the prepull_images variable does not reach the scripts: {environment:?}"
    );
    assert!(variable_default("prepull_images").is_array());

    let upload = build_provisioners()
        .iter()
        .find_map(|provisioner| provisioner.get("\"file\""))
        .expect("no file provisioner uploads ami/files");
    assert_eq!(literal(&upload["source"]), "${path.root}/files/");
    assert_eq!(literal(&upload["destination"]), FILES_ON_INSTANCE);
}

#[test]
fn sshd_accepts_the_hardened_configuration() {
    let sshd = require_program("sshd");
    let dir = tempfile::tempdir().unwrap();
    let host_key = throwaway_host_key(dir.path());
    let drop_in = ami_dir().join("files/sshd-spotrun.conf");
    let config = dir.path().join("sshd_config");
    fs::write(
        &config,
        format!(
            "HostKey {}\nInclude {}\n",
            host_key.display(),
            drop_in.display()
        ),
    )
    .unwrap();

    run_ok(&sshd, &["-t", "-f", config.to_str().unwrap()]);

    let effective = sshd_effective(&config);
    for (keyword, expected) in [
        ("passwordauthentication", "no"),
        ("kbdinteractiveauthentication", "no"),
        ("permitrootlogin", "no"),
        ("pubkeyauthentication", "yes"),
        ("authenticationmethods", "publickey"),
        // "local" admits the direct-streamlocal channels spotrun opens and nothing remote.
        ("allowstreamlocalforwarding", "local"),
        ("allowtcpforwarding", "no"),
        ("allowagentforwarding", "no"),
        ("x11forwarding", "no"),
        ("permittunnel", "no"),
        ("gatewayports", "no"),
        ("clientaliveinterval", "15"),
    ] {
        assert_effective(&effective, keyword, expected);
    }
    assert!(effective["hostkey"].contains(&"/etc/ssh/ssh_host_ed25519_key".to_owned()));

    // Control: the same check rejects a drop-in with a misspelt keyword, so the accepted one was
    // really read.
    let broken = dir.path().join("broken.conf");
    fs::write(&broken, "AllowStreamLocalForwardng local\n").unwrap();
    fs::write(
        &config,
        format!(
            "HostKey {}\nInclude {}\n",
            host_key.display(),
            broken.display()
        ),
    )
    .unwrap();
    let rejected = run(&sshd, &["-t", "-f", config.to_str().unwrap()]);
    assert!(
        !rejected.status.success(),
        "sshd accepted a broken drop-in\n{}",
        describe(&rejected)
    );
}

#[test]
fn sshd_drop_in_wins_over_looser_distribution_settings() {
    let dir = tempfile::tempdir().unwrap();
    let host_key = throwaway_host_key(dir.path());
    let drop_ins = dir.path().join("sshd_config.d");
    fs::create_dir(&drop_ins).unwrap();
    fs::copy(
        ami_dir().join("files/sshd-spotrun.conf"),
        drop_ins.join("00-spotrun.conf"),
    )
    .unwrap();
    // What a distribution or cloud-init may ship: drop-ins sorted later and settings in the main
    // file after its Include line.
    fs::write(
        drop_ins.join("50-distribution.conf"),
        "X11Forwarding yes\nUsePAM yes\n",
    )
    .unwrap();
    fs::write(
        drop_ins.join("50-cloud-init.conf"),
        "PasswordAuthentication yes\n",
    )
    .unwrap();
    let config = dir.path().join("sshd_config");
    fs::write(
        &config,
        format!(
            "Include {}/*.conf\nHostKey {}\nPermitRootLogin yes\nAllowTcpForwarding yes\n",
            drop_ins.display(),
            host_key.display()
        ),
    )
    .unwrap();

    let effective = sshd_effective(&config);
    assert_effective(&effective, "x11forwarding", "no");
    assert_effective(&effective, "passwordauthentication", "no");
    assert_effective(&effective, "permitrootlogin", "no");
    assert_effective(&effective, "allowtcpforwarding", "no");
}

fn daemon_json() -> Value {
    let text = fs::read_to_string(ami_dir().join("files/daemon.json")).unwrap();
    serde_json::from_str(&text).expect("ami/files/daemon.json is not JSON")
}

fn strings_in(value: &Value) -> Vec<String> {
    match value {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => items.iter().flat_map(strings_in).collect(),
        Value::Object(fields) => fields
            .iter()
            .flat_map(|(key, item)| [vec![key.clone()], strings_in(item)].concat())
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn daemon_json_names_no_tcp_host() {
    let daemon = daemon_json();
    assert_eq!(
        daemon["hosts"],
        serde_json::json!(["unix:///var/run/docker.sock"])
    );
    let tcp: Vec<String> = strings_in(&daemon)
        .into_iter()
        .filter(|text| text.contains("tcp://"))
        .collect();
    assert!(tcp.is_empty(), "daemon.json names a TCP address: {tcp:?}");
    assert!(daemon.get("tls").is_none() && daemon.get("tlsverify").is_none());
}

#[test]
fn daemon_json_keeps_containers_across_restarts_and_rotates_logs() {
    let daemon = daemon_json();
    assert_eq!(daemon["live-restore"], true);
    assert_eq!(daemon["log-driver"], "json-file");
    let options = &daemon["log-opts"];
    assert!(
        options["max-size"]
            .as_str()
            .is_some_and(|size| !size.is_empty())
    );
    assert!(
        options["max-file"]
            .as_str()
            .is_some_and(|count| count.parse::<u32>().is_ok())
    );
}

#[test]
fn dockerd_refuses_daemon_json_beside_a_host_flag() {
    // This is why 10-docker.sh rewrites the packaged ExecStart: its -H fd:// plus the hosts in
    // daemon.json stop dockerd before it does anything else.
    require_root();
    let dockerd = require_program("dockerd");
    let unshare = require_program("unshare");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let daemon_json = ami_dir().join("files/daemon.json");
    // A private /run keeps the running engine's socket out of reach, should this dockerd ever
    // get past its configuration check.
    let script = format!(
        "mount -t tmpfs tmpfs /run && exec timeout 30 {} -H unix://{state}/docker.sock \
         --config-file {} --data-root {state}/data --exec-root {state}/exec \
         --pidfile {state}/docker.pid",
        dockerd.display(),
        daemon_json.display()
    );
    let output = run(
        unshare,
        &["--mount", "--propagation", "private", "sh", "-c", &script],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "dockerd accepted both\n{}",
        describe(&output)
    );
    assert!(
        stderr.contains("specified both as a flag and in the configuration file")
            && stderr.contains("hosts"),
        "dockerd failed for another reason\n{}",
        describe(&output)
    );
}

#[test]
fn cloud_init_drop_in_parses_as_yaml_and_takes_keys_from_user_data() {
    let config = python_json(
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        &ami_dir().join("files/cloud-init-spotrun.cfg"),
    );
    assert_eq!(config["ssh_deletekeys"], true);
    assert_eq!(config["disable_root"], true);
    assert_eq!(config["ssh_pwauth"], false);
    let generated = config["ssh_genkeytypes"]
        .as_array()
        .expect("ssh_genkeytypes is not a list");
    assert!(
        generated.iter().all(|key_type| key_type == "ed25519"),
        "{generated:?}"
    );
    // The run's authorized key goes to the distribution's default user; overriding `users` here
    // would lose it.
    assert!(config.get("users").is_none());
}

#[test]
fn prepull_script_fails_the_build_when_an_image_cannot_be_pulled() {
    let docker = require_program("docker");
    let engine = run(&docker, &["version", "--format", "{{.Server.Version}}"]);
    assert!(
        engine.status.success(),
        "the Docker engine is not reachable\n{}",
        describe(&engine)
    );
    let script = ami_dir().join("scripts/40-prepull.sh");

    let nothing = Command::new(&script)
        .env("SPOTRUN_PREPULL_IMAGES", "")
        .output()
        .unwrap();
    assert!(nothing.status.success(), "{}", describe(&nothing));

    // Nothing listens on the discard port, so the pull fails at once without leaving loopback.
    let image = "127.0.0.1:9/spotrun-prepull-probe:missing";
    let failed = Command::new(&script)
        .env("SPOTRUN_PREPULL_IMAGES", image)
        .output()
        .unwrap();
    assert!(
        !failed.status.success(),
        "a failed pull passed\n{}",
        describe(&failed)
    );
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&format!("failed to pull {image}")),
        "{}",
        describe(&failed)
    );
}

/// The Debian root that `scripts/ami-test-root` builds once (with debootstrap, as setup: the
/// test itself downloads nothing), found through the same script.
fn cached_debian_root() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ami-test-root");
    let output = Command::new(&script).arg("--existing").output().unwrap();
    assert!(
        output.status.success(),
        "no Debian root for the provisioning scripts: run scripts/ami-test-root \
         (scripts/test does)\n{}",
        describe(&output)
    );
    let root = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        root.join(".spotrun-complete").is_file(),
        "{} is incomplete",
        root.display()
    );
    root
}

fn write(root: &Path, path: &str, contents: &str) {
    let path = root.join(path.trim_start_matches('/'));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

fn exists(root: &Path, path: &str) -> bool {
    root.join(path.trim_start_matches('/'))
        .symlink_metadata()
        .is_ok()
}

fn read(root: &Path, path: &str) -> String {
    let path = root.join(path.trim_start_matches('/'));
    fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn chroot(root: &Path, command: &[&str]) -> Output {
    let mut args = vec![root.to_str().unwrap()];
    args.extend_from_slice(command);
    run(require_program("chroot"), &args)
}

/// Gives the copied root what a build instance has before provisioning: the login user with the
/// build's key, a booted cloud-init's state, shell history, package lists and caches.
fn seed_build_instance_state(root: &Path) {
    let added = chroot(
        root,
        &["useradd", "--create-home", "--shell", "/bin/bash", "ubuntu"],
    );
    assert!(added.status.success(), "{}", describe(&added));
    let build_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuildKeyOfTheBuild packer\n";
    write(root, "/home/ubuntu/.ssh/authorized_keys", build_key);
    write(root, "/root/.ssh/authorized_keys", build_key);
    write(root, "/home/ubuntu/.bash_history", "sudo -i\n");
    write(root, "/root/.bash_history", "cat /etc/shadow\n");
    write(
        root,
        "/etc/machine-id",
        "0123456789abcdef0123456789abcdef\n",
    );
    write(root, "/var/lib/systemd/random-seed", "seed");
    write(root, "/var/log/wtmp", "login of the build user");
    write(
        root,
        "/var/lib/cloud/instances/i-0123456789abcdef0/user-data.txt",
        "#cloud-config\n",
    );
    write(
        root,
        "/var/lib/cloud/data/instance-id",
        "i-0123456789abcdef0\n",
    );
    write(
        root,
        "/var/lib/cloud/seed/nocloud/user-data",
        "#cloud-config\n",
    );
    write(
        root,
        "/var/log/cloud-init.log",
        "first boot of the build instance\n",
    );
    write(
        root,
        "/var/log/cloud-init-output.log",
        "first boot of the build instance\n",
    );
    write(
        root,
        "/var/lib/apt/lists/archive_dists_bookworm_InRelease",
        "lists",
    );
    write(
        root,
        "/var/cache/apt/archives/docker.io_20.10_amd64.deb",
        "package",
    );
    write(root, "/var/cache/apt/pkgcache.bin", "cache");

    let host_keys = fs::read_dir(root.join("etc/ssh")).unwrap().filter(|entry| {
        entry
            .as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("ssh_host_")
    });
    assert!(
        host_keys.count() > 0,
        "openssh-server left no host keys to strip in the root"
    );
}

#[test]
fn install_script_runs_in_a_throwaway_root() {
    require_root();
    let cached = cached_debian_root();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    run_ok(
        "cp",
        &["-a", cached.to_str().unwrap(), root.to_str().unwrap()],
    );
    seed_build_instance_state(&root);

    // The same layout the template's provisioners produce: files uploaded, scripts executable.
    let files_dir = format!("{FILES_ON_INSTANCE}/");
    let files_src = format!("{}/files/.", ami_dir().display());
    fs::create_dir_all(root.join(FILES_ON_INSTANCE.trim_start_matches('/'))).unwrap();
    run_ok(
        "cp",
        &[
            "-a",
            &files_src,
            root.join(files_dir.trim_start_matches('/'))
                .to_str()
                .unwrap(),
        ],
    );
    fs::create_dir_all(root.join("tmp/spotrun-ami-scripts")).unwrap();

    for script in scripts_in_template_order() {
        let name = script.file_name().unwrap().to_string_lossy().into_owned();
        let inside = format!("/tmp/spotrun-ami-scripts/{name}");
        fs::copy(&script, root.join(inside.trim_start_matches('/'))).unwrap();
        // As Packer runs them: as root, by their shebang, with only the template's variables
        // plus the switch that skips package installs (the test has no Ubuntu archive).
        let output = chroot(
            &root,
            &[
                "/usr/bin/env",
                "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "LANG=C.UTF-8",
                "SPOTRUN_SSH_USER=ubuntu",
                &format!("SPOTRUN_AMI_FILES={FILES_ON_INSTANCE}"),
                "SPOTRUN_PREPULL_IMAGES=",
                "SPOTRUN_AMI_SKIP_PACKAGES=1",
                &inside,
            ],
        );
        assert!(
            output.status.success(),
            "{name} failed in the root\n{}",
            describe(&output)
        );
    }

    // Docker: the socket-only configuration, the unit without its host flag, enabled at boot.
    let daemon_json = fs::read_to_string(ami_dir().join("files/daemon.json")).unwrap();
    assert_eq!(read(&root, "/etc/docker/daemon.json"), daemon_json);
    let unit_drop_in = read(
        &root,
        "/etc/systemd/system/docker.service.d/10-spotrun-hosts.conf",
    );
    let exec_starts: Vec<&str> = unit_drop_in
        .lines()
        .filter_map(|line| line.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(exec_starts.len(), 2, "{unit_drop_in}");
    assert_eq!(
        exec_starts[0], "",
        "the packaged ExecStart is not cleared first"
    );
    let command = exec_starts[1];
    assert!(command.starts_with("/usr/sbin/dockerd "), "{command}");
    assert!(
        command.contains("--containerd=/run/containerd/containerd.sock"),
        "{command}"
    );
    assert!(
        !command.contains("-H") && !command.contains("fd://"),
        "{command}"
    );
    assert!(exists(
        &root,
        "/etc/systemd/system/multi-user.target.wants/docker.service"
    ));
    let docker_group = read(&root, "/etc/group")
        .lines()
        .find(|line| line.starts_with("docker:"))
        .expect("no docker group")
        .to_owned();
    assert!(
        docker_group
            .rsplit(':')
            .next()
            .unwrap()
            .split(',')
            .any(|user| user == "ubuntu")
    );

    // sshd and cloud-init policies in place (20-sshd.sh and 30-cloud-init.sh validated them
    // with the root's own sshd and cloud-init before this point).
    let sshd_policy = fs::read_to_string(ami_dir().join("files/sshd-spotrun.conf")).unwrap();
    assert_eq!(
        read(&root, "/etc/ssh/sshd_config.d/00-spotrun.conf"),
        sshd_policy
    );
    let cloud_policy = fs::read_to_string(ami_dir().join("files/cloud-init-spotrun.cfg")).unwrap();
    assert_eq!(
        read(&root, "/etc/cloud/cloud.cfg.d/99-spotrun.cfg"),
        cloud_policy
    );
    for timer in ["apt-daily.timer", "apt-daily-upgrade.timer"] {
        let link = fs::read_link(root.join("etc/systemd/system").join(timer));
        assert_eq!(
            link.ok(),
            Some(PathBuf::from("/dev/null")),
            "{timer} is not masked"
        );
    }

    // The build's identity is gone.
    let host_keys: Vec<String> = fs::read_dir(root.join("etc/ssh"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ssh_host_"))
        .collect();
    assert!(
        host_keys.is_empty(),
        "host keys left in the image: {host_keys:?}"
    );
    assert!(
        exists(&root, "/etc/machine-id"),
        "machine-id must be emptied, not removed"
    );
    assert_eq!(read(&root, "/etc/machine-id"), "");
    for path in [
        "/var/lib/cloud/instances/i-0123456789abcdef0",
        "/var/lib/cloud/data/instance-id",
        "/var/lib/cloud/seed/nocloud/user-data",
        "/var/log/cloud-init.log",
        "/var/log/cloud-init-output.log",
        "/var/lib/apt/lists/archive_dists_bookworm_InRelease",
        "/var/cache/apt/archives/docker.io_20.10_amd64.deb",
        "/var/cache/apt/pkgcache.bin",
        "/var/lib/systemd/random-seed",
        "/home/ubuntu/.ssh/authorized_keys",
        "/root/.ssh/authorized_keys",
        "/home/ubuntu/.bash_history",
        "/root/.bash_history",
        FILES_ON_INSTANCE,
    ] {
        assert!(!exists(&root, path), "{path} survived the strip");
    }
    assert_eq!(read(&root, "/var/log/wtmp"), "");
}
