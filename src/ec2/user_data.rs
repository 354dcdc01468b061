//! The cloud-config user-data of an instance: its SSH host key, the keys allowed to log in, and
//! the dead-man timer that powers it off at the run's maximum lifetime.
//!
//! The host key is chosen by spotrun and handed over here so that the SSH step can verify the
//! instance strictly from the first packet. This file only writes the document; it does not
//! generate keys (that is `ssh`'s job) and does not base64-encode (that is `launch`'s).

use std::fmt::Write as _;
use std::time::Duration;

/// The inputs of one instance's cloud-config.
#[derive(Clone, Debug)]
pub struct CloudConfig<'a> {
    pub host_key_private_openssh: &'a str,
    pub host_key_public: &'a str,
    pub authorized_keys: &'a [String],
    pub max_lifetime: Duration,
}

impl CloudConfig<'_> {
    /// A `#cloud-config` YAML document. It is written by hand: its shape is fixed and small, and
    /// the only free-form values (keys) are quoted whenever they could be misread as YAML.
    pub fn render(&self) -> String {
        let mut document = String::from("#cloud-config\n");

        // Without deletion and with no generated types, the given host key is the only one, so
        // a strict known-hosts check cannot be satisfied by any other key.
        document.push_str("ssh_deletekeys: true\nssh_genkeytypes: []\n");

        document.push_str("ssh_keys:\n  ed25519_private: |\n");
        for line in self.host_key_private_openssh.trim().lines() {
            let _ = writeln!(document, "    {}", line.trim_end());
        }
        let _ = writeln!(
            document,
            "  ed25519_public: {}",
            scalar(self.host_key_public.trim())
        );

        document.push_str("ssh_authorized_keys:\n");
        for key in self.authorized_keys {
            let _ = writeln!(document, "  - {}", scalar(key.trim()));
        }

        // The timer lives in the instance, so it fires even when spotrun is killed with SIGKILL
        // or loses its network; with InstanceInitiatedShutdownBehavior=terminate a power-off is a
        // termination. bootcmd runs before anything else, on every boot.
        let seconds = self.max_lifetime.as_secs().max(1);
        document.push_str("bootcmd:\n");
        let _ = writeln!(
            document,
            "  - [systemd-run, --unit=spotrun-dead-man, --on-active={seconds}s, \
             --timer-property=AccuracySec=1s, systemctl, poweroff]"
        );

        // Only for images without systemd. `shutdown +m` is not the first choice: it rounds to
        // whole minutes and, five minutes before the power-off, writes /run/nologin, which would
        // lock spotrun's SSH user out during the last minutes of a long job.
        let minutes = seconds.div_ceil(60);
        let _ = writeln!(
            document,
            "  - [sh, -c, 'command -v systemd-run >/dev/null || shutdown -P +{minutes}']"
        );
        document
    }
}

/// A key as a YAML scalar: plain when it is made only of characters that cannot start or end a
/// YAML construct (what OpenSSH writes, with a simple comment), single-quoted otherwise.
fn scalar(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " +/=@._-".contains(c))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric());
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
        b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
        QyNTUxOQAAACDgh0LzBOvN6bJYo5aefr1TlsYd8EtPJsk8gRNbI8Ew+Q==\n\
        -----END OPENSSH PRIVATE KEY-----\n";
    const HOST_PUBLIC: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOCHQvME spotrun-host";

    fn render(authorized_keys: &[String], max_lifetime: Duration) -> String {
        CloudConfig {
            host_key_private_openssh: PRIVATE_KEY,
            host_key_public: HOST_PUBLIC,
            authorized_keys,
            max_lifetime,
        }
        .render()
    }

    #[test]
    fn document_has_the_expected_shape() {
        let keys = vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient spotrun".to_owned()];
        let expected = "#cloud-config
ssh_deletekeys: true
ssh_genkeytypes: []
ssh_keys:
  ed25519_private: |
    -----BEGIN OPENSSH PRIVATE KEY-----
    b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
    QyNTUxOQAAACDgh0LzBOvN6bJYo5aefr1TlsYd8EtPJsk8gRNbI8Ew+Q==
    -----END OPENSSH PRIVATE KEY-----
  ed25519_public: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOCHQvME spotrun-host
ssh_authorized_keys:
  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient spotrun
bootcmd:
  - [systemd-run, --unit=spotrun-dead-man, --on-active=7200s, --timer-property=AccuracySec=1s, \
systemctl, poweroff]
  - [sh, -c, 'command -v systemd-run >/dev/null || shutdown -P +120']
";
        assert_eq!(render(&keys, Duration::from_secs(7200)), expected);
    }

    #[test]
    fn fallback_shutdown_rounds_the_lifetime_up_to_whole_minutes() {
        let document = render(&[], Duration::from_secs(61));
        assert!(document.contains("--on-active=61s"));
        assert!(document.contains("shutdown -P +2'"));
    }

    #[test]
    fn keys_with_yaml_special_characters_are_quoted() {
        assert_eq!(
            scalar("ssh-ed25519 AAAA user@host"),
            "ssh-ed25519 AAAA user@host"
        );
        assert_eq!(
            scalar("ssh-ed25519 AAAA a: b # c"),
            "'ssh-ed25519 AAAA a: b # c'"
        );
        assert_eq!(scalar("ssh-ed25519 AAAA it's"), "'ssh-ed25519 AAAA it''s'");
        assert_eq!(scalar(""), "''");
    }
}
