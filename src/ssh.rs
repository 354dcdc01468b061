//! The SSH session to a Docker host: connecting, verifying the host key, authenticating, and
//! keeping the link alive. Opening Docker channels over it belongs to `tunnel`.
//!
//! Host keys are always checked before any credential is offered: against known_hosts with
//! OpenSSH's rules, against a pinned key or fingerprint, or, for a launched instance, against the
//! key spotrun generated and handed to it, so there is no trust on first use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use russh::client;
use russh::keys::ssh_key::{HashAlg, PrivateKey, PublicKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use crate::cli::HostKeyCheck;
use crate::exit::HintExt;

/// Keepalives notice a dead link within about a minute even when no output flows.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 4;

/// `[USER@]HOST[:PORT]`, with `[v6::addr]:port` for IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl FromStr for SshTarget {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let (user, rest) = match text.rsplit_once('@') {
            Some((user, rest)) => (user.to_owned(), rest),
            None => (whoami(), text),
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .with_context(|| format!("`{text}`: unclosed `[`"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => bail!("`{text}`: expected `:PORT` after `]`"),
            };
            (host, port)
        } else if rest.matches(':').count() == 1 {
            let (host, port) = rest.split_once(':').expect("one colon");
            (host, Some(port))
        } else {
            (rest, None)
        };
        let port = match port {
            Some(port) => port
                .parse()
                .with_context(|| format!("`{text}`: bad port `{port}`"))?,
            None => 22,
        };
        if host.is_empty() || user.is_empty() {
            bail!("`{text}` is not [USER@]HOST[:PORT]");
        }
        Ok(SshTarget {
            user,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".to_owned())
}

/// What the server's host key must be.
#[derive(Clone, Debug)]
pub enum HostKeyPolicy {
    KnownHosts {
        path: PathBuf,
        check: HostKeyCheck,
    },
    /// A key, or a `SHA256:` fingerprint, given by the user or generated for an instance.
    Pinned(PinnedKey),
    Off,
}

#[derive(Clone, Debug)]
pub enum PinnedKey {
    Key(PublicKey),
    Fingerprint(String),
}

impl FromStr for PinnedKey {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.starts_with("SHA256:") {
            return Ok(PinnedKey::Fingerprint(text.to_owned()));
        }
        let key = PublicKey::from_openssh(text)
            .or_else(|_| russh::keys::parse_public_key_base64(text).map_err(|e| anyhow!(e)))
            .with_context(|| format!("`{text}` is neither `TYPE BASE64` nor `SHA256:…`"))?;
        Ok(PinnedKey::Key(key))
    }
}

impl PinnedKey {
    fn matches(&self, key: &PublicKey) -> bool {
        match self {
            PinnedKey::Key(pinned) => pinned.key_data() == key.key_data(),
            PinnedKey::Fingerprint(fingerprint) => {
                key.fingerprint(HashAlg::Sha256).to_string() == *fingerprint
            }
        }
    }
}

/// How the client proves who it is.
#[derive(Clone)]
pub enum Identity {
    Key(Arc<PrivateKey>),
    Agent,
}

impl Identity {
    pub fn load(path: &Path, passphrase: Option<&str>) -> Result<Identity> {
        let key = russh::keys::load_secret_key(path, passphrase)
            .with_context(|| format!("Failed to load the SSH key `{}`", path.display()))
            .hint("an encrypted key needs SPOTRUN_IDENTITY_PASSPHRASE")?;
        Ok(Identity::Key(Arc::new(key)))
    }
}

/// Why the handshake stopped; kept by the handler so the error says more than "rejected".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyVerdict {
    Accepted,
    Unknown { fingerprint: String },
    Changed { fingerprint: String },
}

struct Handler {
    target: SshTarget,
    policy: HostKeyPolicy,
    verdict: Arc<Mutex<Option<HostKeyVerdict>>>,
}

impl Handler {
    fn verify(&self, key: &PublicKey) -> Result<HostKeyVerdict> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        match &self.policy {
            HostKeyPolicy::Off => Ok(HostKeyVerdict::Accepted),
            HostKeyPolicy::Pinned(pinned) => Ok(if pinned.matches(key) {
                HostKeyVerdict::Accepted
            } else {
                HostKeyVerdict::Changed { fingerprint }
            }),
            HostKeyPolicy::KnownHosts { path, check } => {
                let known = russh::keys::known_hosts::known_host_keys_path(
                    &self.target.host,
                    self.target.port,
                    path,
                )
                .with_context(|| format!("Failed to read `{}`", path.display()))?;
                if known
                    .iter()
                    .any(|(_, recorded)| recorded.key_data() == key.key_data())
                {
                    return Ok(HostKeyVerdict::Accepted);
                }
                let same_algorithm = known
                    .iter()
                    .any(|(_, recorded)| recorded.algorithm() == key.algorithm());
                if same_algorithm && *check != HostKeyCheck::Off {
                    return Ok(HostKeyVerdict::Changed { fingerprint });
                }
                match check {
                    HostKeyCheck::Strict => Ok(HostKeyVerdict::Unknown { fingerprint }),
                    HostKeyCheck::Off => Ok(HostKeyVerdict::Accepted),
                    HostKeyCheck::AcceptNew => {
                        russh::keys::known_hosts::learn_known_hosts_path(
                            &self.target.host,
                            self.target.port,
                            key,
                            path,
                        )
                        .with_context(|| {
                            format!("Failed to add the host key to `{}`", path.display())
                        })?;
                        let host = &self.target.host;
                        let path = path.display();
                        tracing::warn!(%host, %fingerprint, %path, "added a new host key");
                        Ok(HostKeyVerdict::Accepted)
                    }
                }
            }
        }
    }
}

impl client::Handler for Handler {
    type Error = anyhow::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(certificate) => {
                PublicKey::new(certificate.public_key().clone(), "")
            }
        };
        let verdict = self.verify(&key)?;
        let accepted = verdict == HostKeyVerdict::Accepted;
        *self.verdict.lock().expect("verdict lock") = Some(verdict);
        Ok(accepted)
    }
}

/// A TCP stream that acknowledges short reads at once.
///
/// sshd leaves Nagle's algorithm on for non-interactive sessions, so when it answers a request
/// with several small packets (its `Remote:` debug lines, then a channel confirmation) the last
/// one waits for our ACK of the first, which the kernel delays by up to 40 ms because we have
/// nothing to send meanwhile. Quick ACKs remove that stall from every channel open, a large
/// share of a short job's run time.
struct QuickAck(tokio::net::TcpStream);

/// Only a read shorter than this can be the tail of a request's answer; during a bulk stream
/// the reads are full and their ACKs go out anyway, so the setsockopt is skipped there.
const SHORT_READ: usize = 4096;

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buffer.filled().len();
        let polled = std::pin::Pin::new(&mut self.0).poll_read(context, buffer);
        // A failure is harmless: it only brings the delayed ACK back.
        if polled.is_ready() && buffer.filled().len() - before < SHORT_READ {
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(context, buffer)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(context)
    }
}

/// Failure kinds that decide whether connecting again can help.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answered, or the handshake broke off: worth another try while an instance boots.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    /// The server proved to be someone else, or refused us: never retried.
    #[error("{0:#}")]
    Refused(anyhow::Error),
}

/// One authenticated SSH connection.
pub struct SshSession {
    handle: client::Handle<Handler>,
    pub target: SshTarget,
}

impl SshSession {
    pub async fn connect(
        target: &SshTarget,
        identity: &Identity,
        policy: &HostKeyPolicy,
        timeout: Duration,
    ) -> Result<SshSession, ConnectError> {
        let config = Arc::new(client::Config {
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            inactivity_timeout: None,
            nodelay: true,
            // A large window keeps a fast stream from stalling on window updates.
            window_size: 8 * 1024 * 1024,
            // AES-GCM runs on the CPU's AES instructions at both ends and costs a fraction of
            // ChaCha20-Poly1305 per byte; on a small instance every cycle saved goes to the job.
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_128_GCM,
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                ]),
                ..Default::default()
            },
            ..Default::default()
        });
        let verdict = Arc::new(Mutex::new(None));
        let handler = Handler {
            target: target.clone(),
            policy: policy.clone(),
            verdict: verdict.clone(),
        };

        let address = (target.host.as_str(), target.port);
        let connecting = async {
            let stream = tokio::net::TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            client::connect_stream(config, QuickAck(stream), handler).await
        };
        let handle = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                return Err(ConnectError::Unreachable(anyhow!(
                    "no SSH answer from `{target}` within {}",
                    humantime::format_duration(timeout)
                )));
            }
            Ok(Ok(handle)) => handle,
            Ok(Err(error)) => {
                let verdict = verdict.lock().expect("verdict lock").clone();
                return Err(match verdict {
                    Some(HostKeyVerdict::Changed { fingerprint }) => {
                        ConnectError::Refused(anyhow!(
                            "`{target}` presented host key {fingerprint}, which is not the \
                             expected one: refusing to connect (possible man-in-the-middle)"
                        ))
                    }
                    Some(HostKeyVerdict::Unknown { fingerprint }) => {
                        ConnectError::Refused(anyhow!(
                            "`{target}` presented host key {fingerprint}, which is not in \
                             known_hosts: refusing to connect; hint: add it to known_hosts, pin \
                             it with --host-key, or use --host-key-check accept-new"
                        ))
                    }
                    _ => ConnectError::Unreachable(error.context(format!("SSH to `{target}`"))),
                });
            }
        };

        let mut session = SshSession {
            handle,
            target: target.clone(),
        };
        session
            .authenticate(identity)
            .await
            .map_err(ConnectError::Refused)?;
        tracing::debug!(target = %target, "SSH session authenticated");
        Ok(session)
    }

    async fn authenticate(&mut self, identity: &Identity) -> Result<()> {
        let user = self.target.user.clone();
        let accepted = match identity {
            Identity::Key(key) => {
                let hash_alg = self.handle.best_supported_rsa_hash().await?.flatten();
                let key = PrivateKeyWithHashAlg::new(key.clone(), hash_alg);
                self.handle
                    .authenticate_publickey(&user, key)
                    .await?
                    .success()
            }
            Identity::Agent => self.authenticate_with_agent(&user).await?,
        };
        if !accepted {
            let hint = match identity {
                Identity::Key(_) => {
                    "check that the key's public half is in the user's authorized_keys"
                }
                Identity::Agent => "no agent key was accepted; name a key with -i/--identity",
            };
            return Err(anyhow!(
                "`{}` refused the SSH key for user `{user}`",
                self.target
            ))
            .hint(hint);
        }
        Ok(())
    }

    async fn authenticate_with_agent(&mut self, user: &str) -> Result<bool> {
        let mut agent = russh::keys::agent::client::AgentClient::connect_env()
            .await
            .context("No SSH identity given and no ssh-agent at SSH_AUTH_SOCK")
            .hint("name a key with -i/--identity (or SPOTRUN_IDENTITY)")?;
        let identities = agent
            .request_identities()
            .await
            .context("Failed to list the ssh-agent's keys")?;
        let hash_alg = self.handle.best_supported_rsa_hash().await?.flatten();
        for identity in identities {
            let key = identity.public_key().into_owned();
            match self
                .handle
                .authenticate_publickey_with(user, key, hash_alg, &mut agent)
                .await
            {
                Ok(result) if result.success() => return Ok(true),
                Ok(_) => continue,
                Err(error) => tracing::debug!(error = %error, "agent key not usable"),
            }
        }
        Ok(false)
    }

    /// A bidirectional byte stream to a Unix socket on the server.
    pub async fn open_socket(&self, path: &str) -> Result<russh::ChannelStream<client::Msg>> {
        let channel = self
            .handle
            .channel_open_direct_streamlocal(path)
            .await
            .with_context(|| format!("Failed to open `{path}` on `{}` over SSH", self.target))?;
        Ok(channel.into_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_like_ssh_destinations() {
        let target: SshTarget = "ci@build.example:2222".parse().unwrap();
        assert_eq!(
            (target.user.as_str(), target.host.as_str(), target.port),
            ("ci", "build.example", 2222)
        );
        let target: SshTarget = "ci@[::1]:2200".parse().unwrap();
        assert_eq!((target.host.as_str(), target.port), ("::1", 2200));
        let target: SshTarget = "ci@10.0.0.5".parse().unwrap();
        assert_eq!(target.port, 22);
        assert!("ci@host:notaport".parse::<SshTarget>().is_err());
        assert!("ci@".parse::<SshTarget>().is_err());
    }

    #[test]
    fn pinned_key_compares_key_data_not_the_comment() {
        let key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
        let mut public = key.public_key().clone();
        let line = public.to_openssh().unwrap();
        public.set_comment("someone@else");
        let pinned: PinnedKey = line.parse().unwrap();
        assert!(pinned.matches(&public));
        let fingerprint: PinnedKey = public
            .fingerprint(HashAlg::Sha256)
            .to_string()
            .parse()
            .unwrap();
        assert!(fingerprint.matches(&public));
        let other = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
        assert!(!pinned.matches(other.public_key()));
    }
}
