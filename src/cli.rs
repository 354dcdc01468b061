//! Command-line definitions. Every flag also reads a `SPOTRUN_*` environment variable, because
//! Jenkins hands credentials and settings to a `sh` step that way.
//!
//! Values stay `Option` here when a profile in `spotrun.toml` may supply them; defaults are
//! applied once, in `settings`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "spotrun",
    version,
    about = "Run a Docker job on a fresh EC2 spot instance as if it ran locally"
)]
pub struct Cli {
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors and the closing summary on stderr.
    #[arg(short, long, global = true, env = "SPOTRUN_QUIET")]
    pub quiet: bool,

    /// Settings file (default: ./spotrun.toml, then ~/.config/spotrun/spotrun.toml).
    #[arg(long, global = true, env = "SPOTRUN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Profile of the settings file to use (a `[profiles.NAME]` table).
    #[arg(long, global = true, env = "SPOTRUN_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a container on a fresh EC2 instance (or, with --host, on an existing Docker host).
    Run(Box<RunArgs>),
    /// List spotrun's live instances.
    Ls(AwsArgs),
    /// Terminate spotrun instances whose `spotrun:expires-at` tag has passed.
    Reap(ReapArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub ssh: SshArgs,
    #[command(flatten)]
    pub container: ContainerArgs,
    #[command(flatten)]
    pub ec2: Ec2Args,
    #[command(flatten)]
    pub aws: AwsArgs,

    /// Write a JSON summary of the run (instance, market, wall time, cost, exit code) here.
    #[arg(long, env = "SPOTRUN_SUMMARY", value_name = "FILE")]
    pub summary: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "SSH")]
pub struct SshArgs {
    /// Run on this existing Docker host over SSH instead of launching an instance.
    #[arg(long, env = "SPOTRUN_HOST", value_name = "[USER@]HOST[:PORT]")]
    pub host: Option<String>,

    /// Private key (OpenSSH or PEM). Without it: ssh-agent for --host, a fresh key on EC2.
    #[arg(short = 'i', long, env = "SPOTRUN_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// known_hosts file to verify --host against (default ~/.ssh/known_hosts).
    #[arg(long, env = "SPOTRUN_KNOWN_HOSTS", value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,

    /// Pin the host key of --host: `ssh-ed25519 AAAA…` or a `SHA256:…` fingerprint.
    #[arg(long, env = "SPOTRUN_HOST_KEY", value_name = "KEY")]
    pub host_key: Option<String>,

    /// How to treat a host key not in known_hosts, as OpenSSH's StrictHostKeyChecking.
    #[arg(long, env = "SPOTRUN_HOST_KEY_CHECK", value_enum)]
    pub host_key_check: Option<HostKeyCheck>,

    /// Give up connecting after this long (per attempt for --host).
    #[arg(
        long,
        env = "SPOTRUN_CONNECT_TIMEOUT",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub connect_timeout: Option<Duration>,

    /// Docker's Unix socket on the remote side.
    #[arg(long, env = "SPOTRUN_DOCKER_SOCKET", value_name = "PATH")]
    pub docker_socket: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyCheck {
    /// Refuse unknown and changed keys.
    Strict,
    /// Record unknown keys in known_hosts, refuse changed ones.
    AcceptNew,
    /// Accept any key (insecure).
    Off,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Container")]
pub struct ContainerArgs {
    /// Image to run.
    #[arg(long, env = "SPOTRUN_IMAGE")]
    pub image: Option<String>,

    /// When to pull the image.
    #[arg(long, env = "SPOTRUN_PULL", value_enum)]
    pub pull: Option<PullPolicy>,

    /// Registry user name (with --registry-password-stdin or SPOTRUN_REGISTRY_PASSWORD).
    #[arg(long, env = "SPOTRUN_REGISTRY_USER", value_name = "USER")]
    pub registry_user: Option<String>,

    /// Read the registry password from stdin.
    #[arg(long, env = "SPOTRUN_REGISTRY_PASSWORD_STDIN")]
    pub registry_password_stdin: bool,

    /// Where registry credentials come from: docker config and flags, or ECR.
    #[arg(long, env = "SPOTRUN_REGISTRY_AUTH", value_enum)]
    pub registry_auth: Option<RegistryAuth>,

    /// Set an environment variable in the container (repeatable; KEY alone takes it from here).
    #[arg(
        short = 'e',
        long = "env",
        env = "SPOTRUN_ENV",
        value_delimiter = '\n',
        value_name = "KEY=VALUE"
    )]
    pub env: Vec<String>,

    /// Read environment variables for the container from a file (KEY=VALUE lines).
    #[arg(long, env = "SPOTRUN_ENV_FILE", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,

    /// Working directory inside the container.
    #[arg(short = 'w', long, env = "SPOTRUN_WORKDIR", value_name = "DIR")]
    pub workdir: Option<String>,

    /// Override the image's entrypoint.
    #[arg(long, env = "SPOTRUN_ENTRYPOINT", value_name = "COMMAND")]
    pub entrypoint: Option<String>,

    /// User (name or uid[:gid]) the container runs as.
    #[arg(long, env = "SPOTRUN_CONTAINER_USER", value_name = "USER")]
    pub container_user: Option<String>,

    /// Docker log driver for the container; `default` keeps the daemon's.
    #[arg(long, env = "SPOTRUN_LOG_DRIVER", value_name = "DRIVER")]
    pub log_driver: Option<String>,

    /// Leave the container on the host after it exits.
    #[arg(long, env = "SPOTRUN_KEEP_CONTAINER")]
    pub keep_container: bool,

    /// Stop the job after this long and exit 124 (e.g. 90s, 30m, 2h).
    #[arg(long, env = "SPOTRUN_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,

    /// Between SIGTERM and SIGKILL when the container is stopped.
    #[arg(long, env = "SPOTRUN_STOP_GRACE", value_parser = parse_duration, value_name = "DURATION")]
    pub stop_grace: Option<Duration>,

    /// Command and arguments for the container.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    Missing,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegistryAuth {
    /// ECR for ECR images, else flags and the docker config.
    Auto,
    /// GetAuthorizationToken on this side, for any registry.
    Ecr,
    /// Flags and the docker config only.
    Docker,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "AWS")]
pub struct AwsArgs {
    /// AWS region (default: the aws-config chain).
    #[arg(long, env = "SPOTRUN_REGION")]
    pub region: Option<String>,

    /// EC2 and ECR endpoint, for an emulator (AWS_ENDPOINT_URL works too).
    #[arg(long, env = "SPOTRUN_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "EC2")]
pub struct Ec2Args {
    /// AMI id of an image built from ami/.
    #[arg(long, env = "SPOTRUN_AMI", value_name = "AMI_ID")]
    pub ami: Option<String>,

    /// Instance type, repeatable, in order of preference.
    #[arg(
        long,
        env = "SPOTRUN_INSTANCE_TYPE",
        value_delimiter = ',',
        value_name = "TYPE"
    )]
    pub instance_type: Vec<String>,

    /// Subnet id, repeatable; each is tried for each instance type.
    #[arg(
        long,
        env = "SPOTRUN_SUBNET",
        value_delimiter = ',',
        value_name = "SUBNET_ID"
    )]
    pub subnet: Vec<String>,

    /// Security group id, repeatable (it must let the caller reach port 22); without one,
    /// spotrun uses a group of its own that admits SSH from --ssh-cidr.
    #[arg(
        long,
        env = "SPOTRUN_SECURITY_GROUP",
        value_delimiter = ',',
        value_name = "SG_ID"
    )]
    pub security_group: Vec<String>,

    /// Without --security-group: the IPv4 range spotrun's own group admits to SSH.
    #[arg(long, env = "SPOTRUN_SSH_CIDR", value_name = "CIDR")]
    pub ssh_cidr: Option<String>,

    /// Purchase option.
    #[arg(long, env = "SPOTRUN_MARKET", value_enum)]
    pub market: Option<MarketArg>,

    /// Highest spot price per hour in USD (default: the on-demand price).
    #[arg(long, env = "SPOTRUN_MAX_PRICE", value_name = "USD")]
    pub max_price: Option<String>,

    /// Login user of the AMI.
    #[arg(long, env = "SPOTRUN_SSH_USER", value_name = "USER")]
    pub ssh_user: Option<String>,

    /// SSH port of the instance.
    #[arg(long, env = "SPOTRUN_SSH_PORT", value_name = "PORT")]
    pub ssh_port: Option<u16>,

    /// Root volume size in GiB.
    #[arg(long, env = "SPOTRUN_VOLUME_SIZE", value_name = "GIB")]
    pub volume_size: Option<i32>,

    /// IAM instance profile name or ARN.
    #[arg(long, env = "SPOTRUN_IAM_INSTANCE_PROFILE", value_name = "NAME_OR_ARN")]
    pub iam_instance_profile: Option<String>,

    /// Extra instance tag, repeatable.
    #[arg(
        long,
        env = "SPOTRUN_TAG",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub tag: Vec<String>,

    /// The instance powers itself off after this long, even if spotrun is killed.
    #[arg(
        long,
        env = "SPOTRUN_MAX_LIFETIME",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub max_lifetime: Option<Duration>,

    /// Give up if the instance's sshd and Docker do not answer within this long.
    #[arg(
        long,
        env = "SPOTRUN_BOOT_TIMEOUT",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub boot_timeout: Option<Duration>,

    /// Which instance address to connect to.
    #[arg(long, env = "SPOTRUN_ADDRESS", value_enum)]
    pub address: Option<AddressArg>,

    /// Leave the instance running when the job fails (it still dies at --max-lifetime).
    #[arg(long, env = "SPOTRUN_KEEP_ON_FAILURE")]
    pub keep_on_failure: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MarketArg {
    Spot,
    OnDemand,
    SpotThenOnDemand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressArg {
    Public,
    Private,
}

#[derive(Debug, Args)]
pub struct ReapArgs {
    #[command(flatten)]
    pub aws: AwsArgs,

    /// Only list what would be terminated.
    #[arg(long, env = "SPOTRUN_DRY_RUN")]
    pub dry_run: bool,
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    // A bare number is seconds, as in `timeout 30`.
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|error| format!("{error} (try 90s, 30m or 2h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn command_after_double_dash_reaches_the_container() {
        let cli = Cli::parse_from(["spotrun", "run", "--image", "x", "--", "sh", "-c", "exit 3"]);
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.container.command, ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
