//! Settings: flags and `SPOTRUN_*` variables (both parsed by clap), an optional `spotrun.toml`
//! profile, and defaults, merged once into plain values that the commands receive.
//!
//! This is the only module that reads the environment or the settings file; commands never do.
//! Precedence: flag or environment variable, then the chosen profile, then the file's top-level
//! keys, then the defaults below.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::cli::{
    AddressArg, AwsArgs, ContainerArgs, Ec2Args, HostKeyCheck, MarketArg, PullPolicy, RegistryAuth,
    RunArgs, SshArgs, parse_duration,
};
use crate::exit::HintExt;
use crate::ssh::SshTarget;

const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(2 * 3600);
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_INSTANCE_TYPE: &str = "t3.medium";
/// Docker's `local` driver keeps the log as raw bytes where `json-file` escapes every byte into
/// JSON, which costs the daemon more CPU than anything else in a chatty job; the log stays
/// readable, so output can still be resumed from it.
const DEFAULT_LOG_DRIVER: &str = "local";

/// Everything `spotrun run` needs, resolved.
#[derive(Debug)]
pub struct RunSettings {
    /// Some: run on this existing host; None: launch an instance.
    pub host: Option<SshTarget>,
    pub ssh: SshSettings,
    pub job: JobSettings,
    pub ec2: Ec2Settings,
    pub aws: AwsSettings,
    pub summary: Option<PathBuf>,
}

#[derive(Debug)]
pub struct SshSettings {
    pub identity: Option<PathBuf>,
    pub identity_passphrase: Option<String>,
    pub known_hosts: PathBuf,
    pub host_key: Option<String>,
    pub host_key_check: HostKeyCheck,
    pub connect_timeout: Duration,
    pub docker_socket: String,
}

#[derive(Debug)]
pub struct JobSettings {
    pub image: String,
    pub pull: PullPolicy,
    pub registry_auth: RegistryAuth,
    pub registry_login: Option<RegistryLogin>,
    pub docker_config: PathBuf,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub entrypoint: Option<String>,
    pub user: Option<String>,
    /// None: the daemon's configured driver.
    pub log_driver: Option<String>,
    pub keep_container: bool,
    pub timeout: Option<Duration>,
    pub stop_grace: Duration,
    pub command: Vec<String>,
    /// Debug builds only: panic once the container has started, so that tests can prove a
    /// panic still tears everything down. Release builds never set it.
    pub panic_after_start: bool,
}

#[derive(Clone)]
pub struct RegistryLogin {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryLogin({}, ****)", self.username)
    }
}

#[derive(Debug)]
pub struct Ec2Settings {
    pub ami: Option<String>,
    pub instance_types: Vec<String>,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub ssh_cidr: String,
    pub market: MarketArg,
    pub max_price: Option<String>,
    pub ssh_user: String,
    pub ssh_port: u16,
    pub volume_size: Option<i32>,
    pub iam_instance_profile: Option<String>,
    pub tags: Vec<(String, String)>,
    pub max_lifetime: Duration,
    pub boot_timeout: Duration,
    pub address: AddressArg,
    pub keep_on_failure: bool,
}

#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// One table of `spotrun.toml`: the same names as the long flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Profile {
    host: Option<String>,
    identity: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    host_key: Option<String>,
    host_key_check: Option<HostKeyCheck>,
    connect_timeout: Option<String>,
    docker_socket: Option<String>,
    image: Option<String>,
    pull: Option<PullPolicy>,
    registry_user: Option<String>,
    registry_auth: Option<RegistryAuth>,
    env: Option<Vec<String>>,
    workdir: Option<String>,
    container_user: Option<String>,
    log_driver: Option<String>,
    timeout: Option<String>,
    stop_grace: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    ami: Option<String>,
    instance_type: Option<Vec<String>>,
    subnet: Option<Vec<String>>,
    security_group: Option<Vec<String>>,
    ssh_cidr: Option<String>,
    market: Option<MarketArg>,
    max_price: Option<String>,
    ssh_user: Option<String>,
    ssh_port: Option<u16>,
    volume_size: Option<i32>,
    iam_instance_profile: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    max_lifetime: Option<String>,
    boot_timeout: Option<String>,
    address: Option<AddressArg>,
}

macro_rules! layer {
    ($profile:ident, $base:ident; $($field:ident),* $(,)?) => {
        Profile { $($field: $profile.$field.or($base.$field)),* }
    };
}

impl Profile {
    fn over(self, base: Profile) -> Profile {
        let profile = self;
        layer!(profile, base; host, identity, known_hosts, host_key, host_key_check,
            connect_timeout, docker_socket, image, pull, registry_user, registry_auth, env,
            workdir, container_user, log_driver, timeout, stop_grace, region, endpoint_url, ami,
            instance_type, subnet, security_group, ssh_cidr, market, max_price, ssh_user,
            ssh_port, volume_size, iam_instance_profile, tags, max_lifetime, boot_timeout,
            address)
    }
}

/// Reads the settings file: an explicit one must exist; the default locations may be absent.
fn load_profile(config: Option<&Path>, profile_name: Option<&str>) -> Result<Profile> {
    let path = match config {
        Some(path) => Some(path.to_path_buf()),
        None => [
            Some(PathBuf::from("spotrun.toml")),
            dirs::config_dir().map(|dir| dir.join("spotrun").join("spotrun.toml")),
        ]
        .into_iter()
        .flatten()
        .find(|path| path.is_file()),
    };
    let Some(path) = path else {
        if let Some(name) = profile_name {
            bail!("Profile `{name}` was asked for, but there is no spotrun.toml");
        }
        return Ok(Profile::default());
    };

    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("Failed to read the settings file `{}`", path.display()))?;
    parse_profile(&text, profile_name)
        .with_context(|| format!("Failed to read the settings file `{}`", path.display()))
}

fn parse_profile(text: &str, profile_name: Option<&str>) -> Result<Profile> {
    let mut table: toml::Table = toml::from_str(text)?;
    let profiles = table.remove("profiles");
    let base: Profile = table.try_into()?;

    let Some(name) = profile_name else {
        return Ok(base);
    };
    let chosen = profiles
        .and_then(|profiles| profiles.get(name).cloned())
        .with_context(|| format!("no `[profiles.{name}]` table"))?;
    let chosen: Profile = chosen
        .try_into()
        .with_context(|| format!("in `[profiles.{name}]`"))?;
    Ok(chosen.over(base))
}

fn duration_setting(name: &str, value: Option<String>) -> Result<Option<Duration>> {
    value
        .map(|text| parse_duration(&text).map_err(|error| anyhow::anyhow!("`{name}`: {error}")))
        .transpose()
}

pub fn aws_settings(
    args: &AwsArgs,
    config: Option<&Path>,
    profile: Option<&str>,
) -> Result<AwsSettings> {
    let file = load_profile(config, profile)?;
    Ok(AwsSettings {
        region: args.region.clone().or(file.region),
        endpoint_url: args.endpoint_url.clone().or(file.endpoint_url),
    })
}

pub fn run_settings(
    args: RunArgs,
    config: Option<&Path>,
    profile: Option<&str>,
) -> Result<RunSettings> {
    let file = load_profile(config, profile)?;
    let RunArgs {
        ssh,
        container,
        ec2,
        aws,
        summary,
    } = args;
    let aws = AwsSettings {
        region: aws.region.or(file.region.clone()),
        endpoint_url: aws.endpoint_url.or(file.endpoint_url.clone()),
    };

    let host = ssh
        .host
        .clone()
        .or(file.host.clone())
        .map(|text| text.parse::<SshTarget>())
        .transpose()?;
    let ssh = ssh_settings(ssh, &file)?;
    let job = job_settings(container, &file)?;
    let ec2 = ec2_settings(ec2, file)?;
    Ok(RunSettings {
        host,
        ssh,
        job,
        ec2,
        aws,
        summary,
    })
}

fn ssh_settings(args: SshArgs, file: &Profile) -> Result<SshSettings> {
    let known_hosts = match args.known_hosts.or(file.known_hosts.clone()) {
        Some(path) => path,
        None => dirs::home_dir()
            .context("Failed to find a home directory for ~/.ssh/known_hosts")
            .hint("name a known_hosts file with --known-hosts")?
            .join(".ssh")
            .join("known_hosts"),
    };
    Ok(SshSettings {
        identity: args.identity.or(file.identity.clone()),
        identity_passphrase: std::env::var("SPOTRUN_IDENTITY_PASSPHRASE").ok(),
        known_hosts,
        host_key: args.host_key.or(file.host_key.clone()),
        host_key_check: args
            .host_key_check
            .or(file.host_key_check)
            .unwrap_or(HostKeyCheck::Strict),
        connect_timeout: match args.connect_timeout {
            Some(timeout) => timeout,
            None => duration_setting("connect-timeout", file.connect_timeout.clone())?
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        },
        docker_socket: args
            .docker_socket
            .or(file.docker_socket.clone())
            .unwrap_or_else(|| "/var/run/docker.sock".to_owned()),
    })
}

fn job_settings(args: ContainerArgs, file: &Profile) -> Result<JobSettings> {
    let image = args
        .image
        .or(file.image.clone())
        .context("No image to run")
        .hint("name one with --image IMAGE (or SPOTRUN_IMAGE)")?;

    let registry_user = args.registry_user.or(file.registry_user.clone());
    let registry_login = match registry_user {
        Some(username) => {
            let password = if args.registry_password_stdin {
                let mut password = String::new();
                std::io::stdin()
                    .read_to_string(&mut password)
                    .context("Failed to read the registry password from stdin")?;
                password.trim_end_matches(['\r', '\n']).to_owned()
            } else {
                std::env::var("SPOTRUN_REGISTRY_PASSWORD")
                    .context("--registry-user needs a password")
                    .hint("pipe it to --registry-password-stdin or set SPOTRUN_REGISTRY_PASSWORD")?
            };
            Some(RegistryLogin { username, password })
        }
        None if args.registry_password_stdin => {
            bail!("--registry-password-stdin needs --registry-user")
        }
        None => None,
    };

    let mut env = file.env.clone().unwrap_or_default();
    for path in &args.env_file {
        env.extend(read_env_file(path)?);
    }
    env.extend(args.env);
    let env = env
        .into_iter()
        .map(resolve_env_entry)
        .collect::<Result<Vec<_>>>()?;

    let docker_config = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir),
        None => dirs::home_dir().unwrap_or_default().join(".docker"),
    };

    Ok(JobSettings {
        image,
        pull: args.pull.or(file.pull).unwrap_or(PullPolicy::Missing),
        registry_auth: args
            .registry_auth
            .or(file.registry_auth)
            .unwrap_or(RegistryAuth::Auto),
        registry_login,
        docker_config,
        env,
        workdir: args.workdir.or(file.workdir.clone()),
        entrypoint: args.entrypoint,
        user: args.container_user.or(file.container_user.clone()),
        log_driver: match args.log_driver.or(file.log_driver.clone()) {
            Some(driver) if driver == "default" => None,
            Some(driver) => Some(driver),
            None => Some(DEFAULT_LOG_DRIVER.to_owned()),
        },
        keep_container: args.keep_container,
        timeout: match args.timeout {
            Some(timeout) => Some(timeout),
            None => duration_setting("timeout", file.timeout.clone())?,
        },
        stop_grace: match args.stop_grace {
            Some(grace) => grace,
            None => duration_setting("stop-grace", file.stop_grace.clone())?
                .unwrap_or(DEFAULT_STOP_GRACE),
        },
        command: args.command,
        panic_after_start: cfg!(debug_assertions)
            && std::env::var_os("SPOTRUN_DEBUG_PANIC_AFTER_START").is_some(),
    })
}

/// `KEY=VALUE` passes as is; a bare `KEY` takes spotrun's own value, as `docker run -e KEY`.
fn resolve_env_entry(entry: String) -> Result<String> {
    if entry.contains('=') {
        return Ok(entry);
    }
    if entry.is_empty() {
        bail!("An empty --env entry");
    }
    match std::env::var(&entry) {
        Ok(value) => Ok(format!("{entry}={value}")),
        Err(_) => bail!("--env {entry} names a variable that is not set here"),
    }
}

fn read_env_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Failed to read the env file `{}`", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn ec2_settings(args: Ec2Args, file: Profile) -> Result<Ec2Settings> {
    let mut tags: Vec<(String, String)> = file.tags.unwrap_or_default().into_iter().collect();
    for tag in args.tag {
        let (key, value) = tag
            .split_once('=')
            .with_context(|| format!("--tag `{tag}` is not KEY=VALUE"))?;
        if key.starts_with("spotrun:") || key.starts_with("aws:") {
            bail!("--tag `{key}`: the `spotrun:` and `aws:` prefixes are reserved");
        }
        tags.push((key.to_owned(), value.to_owned()));
    }

    let instance_types = non_empty(args.instance_type)
        .or(file.instance_type)
        .unwrap_or_else(|| vec![DEFAULT_INSTANCE_TYPE.to_owned()]);
    Ok(Ec2Settings {
        ami: args.ami.or(file.ami),
        instance_types,
        subnets: non_empty(args.subnet).or(file.subnet).unwrap_or_default(),
        security_groups: non_empty(args.security_group)
            .or(file.security_group)
            .unwrap_or_default(),
        ssh_cidr: ipv4_cidr(
            args.ssh_cidr
                .or(file.ssh_cidr)
                .as_deref()
                .unwrap_or("0.0.0.0/0"),
        )?,
        market: args.market.or(file.market).unwrap_or(MarketArg::Spot),
        max_price: args.max_price.or(file.max_price),
        ssh_user: args
            .ssh_user
            .or(file.ssh_user)
            .unwrap_or_else(|| "ubuntu".to_owned()),
        ssh_port: args.ssh_port.or(file.ssh_port).unwrap_or(22),
        volume_size: args.volume_size.or(file.volume_size),
        iam_instance_profile: args.iam_instance_profile.or(file.iam_instance_profile),
        tags,
        max_lifetime: match args.max_lifetime {
            Some(lifetime) => lifetime,
            None => {
                duration_setting("max-lifetime", file.max_lifetime)?.unwrap_or(DEFAULT_MAX_LIFETIME)
            }
        },
        boot_timeout: match args.boot_timeout {
            Some(timeout) => timeout,
            None => {
                duration_setting("boot-timeout", file.boot_timeout)?.unwrap_or(DEFAULT_BOOT_TIMEOUT)
            }
        },
        address: args.address.or(file.address).unwrap_or(AddressArg::Public),
        keep_on_failure: args.keep_on_failure,
    })
}

/// An IPv4 range as EC2 security group rules take it.
fn ipv4_cidr(text: &str) -> Result<String> {
    let valid = text.split_once('/').is_some_and(|(address, prefix)| {
        address.parse::<std::net::Ipv4Addr>().is_ok()
            && prefix.parse::<u8>().is_ok_and(|prefix| prefix <= 32)
    });
    if !valid {
        bail!("--ssh-cidr `{text}` is not an IPv4 range like 203.0.113.0/24");
    }
    Ok(text.to_owned())
}

fn non_empty(values: Vec<String>) -> Option<Vec<String>> {
    let values: Vec<String> = values
        .into_iter()
        .filter(|value| !value.is_empty())
        .collect();
    (!values.is_empty()).then_some(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        region = "eu-west-1"
        instance-type = ["c6i.large"]
        max-lifetime = "1h"

        [profiles.big]
        instance-type = ["c6i.4xlarge", "c5.4xlarge"]
    "#;

    #[test]
    fn profile_overrides_the_top_level_keys() {
        let profile = parse_profile(FILE, Some("big")).unwrap();
        assert_eq!(profile.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            profile.instance_type.unwrap(),
            ["c6i.4xlarge", "c5.4xlarge"]
        );
        assert_eq!(profile.max_lifetime.as_deref(), Some("1h"));
    }

    #[test]
    fn unknown_keys_and_profiles_are_errors() {
        assert!(parse_profile("regoin = \"x\"", None).is_err());
        assert!(parse_profile(FILE, Some("small")).is_err());
    }

    #[test]
    fn ssh_cidr_must_be_an_ipv4_range() {
        assert_eq!(ipv4_cidr("203.0.113.7/32").unwrap(), "203.0.113.7/32");
        assert!(ipv4_cidr("203.0.113.7").is_err());
        assert!(ipv4_cidr("203.0.113.7/33").is_err());
        assert!(ipv4_cidr("2001:db8::/32").is_err());
    }

    #[test]
    fn bare_env_key_takes_the_callers_value() {
        assert_eq!(resolve_env_entry("A=b=c".into()).unwrap(), "A=b=c");
        assert!(resolve_env_entry("SPOTRUN_SURELY_UNSET_VARIABLE".into()).is_err());
    }
}
