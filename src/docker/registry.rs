//! Registry credentials for a pull: from flags, from the docker CLI's `config.json`, or from an
//! ECR login done on the caller's side. Nothing is written to the Docker host.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bollard::auth::DockerCredentials;
use serde::Deserialize;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// The registry host an image reference points at (`docker.io` for short names).
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => DOCKER_HUB,
    }
}

/// Splits `repo[:tag][@digest]` into what Docker's create-image call wants. Without a tag Docker
/// would pull every tag of the repository, so `latest` is filled in as `docker pull` does.
pub fn pull_reference(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_owned(), None);
    }
    let last_part = image.rsplit('/').next().unwrap_or(image);
    match last_part.rsplit_once(':') {
        Some((_, tag)) => {
            let repository = &image[..image.len() - tag.len() - 1];
            (repository.to_owned(), Some(tag.to_owned()))
        }
        None => (image.to_owned(), Some("latest".to_owned())),
    }
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Credentials for `image` from `config_dir/config.json`, if it has an `auths` entry for the
/// image's registry. A missing file is not an error: public images need nothing.
pub fn from_docker_config(config_dir: &Path, image: &str) -> Result<Option<DockerCredentials>> {
    let path = config_dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("Failed to read `{}`", path.display()));
        }
    };
    let config: DockerConfig = serde_json::from_str(&text)
        .with_context(|| format!("Failed to parse `{}`", path.display()))?;

    let registry = registry_of(image);
    let entry = config.auths.iter().find(|(key, _)| {
        let key = normalize_registry_key(key);
        key == registry
            || (registry == DOCKER_HUB && key == normalize_registry_key(DOCKER_HUB_CONFIG_KEY))
    });
    let Some((_, entry)) = entry else {
        if let Some(store) = &config.creds_store {
            tracing::debug!(store = %store, registry, "credential helpers are not consulted");
        }
        return Ok(None);
    };

    let (username, password) = match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let decoded = BASE64.decode(auth.trim()).with_context(|| {
                format!(
                    "`{}`: the auth for `{registry}` is not base64",
                    path.display()
                )
            })?;
            let decoded = String::from_utf8(decoded).context("registry auth is not UTF-8")?;
            let (username, password) = decoded.split_once(':').with_context(|| {
                format!(
                    "`{}`: the auth for `{registry}` is not user:password",
                    path.display()
                )
            })?;
            (Some(username.to_owned()), Some(password.to_owned()))
        }
        (_, username, password) => (username.clone(), password.clone()),
    };
    Ok(Some(DockerCredentials {
        username,
        password,
        identitytoken: entry.identitytoken.clone(),
        serveraddress: Some(registry.to_owned()),
        ..Default::default()
    }))
}

pub fn from_login(image: &str, username: &str, password: &str) -> DockerCredentials {
    DockerCredentials {
        username: Some(username.to_owned()),
        password: Some(password.to_owned()),
        serveraddress: Some(registry_of(image).to_owned()),
        ..Default::default()
    }
}

/// `https://host/v1/` and `host` name the same registry in config.json.
fn normalize_registry_key(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.split('/').next().unwrap_or(key);
    if key == "index.docker.io" || key == "registry-1.docker.io" {
        DOCKER_HUB
    } else {
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_the_first_component_only_when_it_looks_like_a_host() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(
            registry_of("127.0.0.1:5055/spotrun/busybox"),
            "127.0.0.1:5055"
        );
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(
            registry_of("1234.dkr.ecr.eu-west-1.amazonaws.com/app:7"),
            "1234.dkr.ecr.eu-west-1.amazonaws.com"
        );
    }

    #[test]
    fn pull_reference_fills_in_latest_and_keeps_ports_apart_from_tags() {
        assert_eq!(
            pull_reference("busybox"),
            ("busybox".into(), Some("latest".into()))
        );
        assert_eq!(
            pull_reference("127.0.0.1:5055/a/b"),
            ("127.0.0.1:5055/a/b".into(), Some("latest".into()))
        );
        assert_eq!(
            pull_reference("127.0.0.1:5055/a/b:v2"),
            ("127.0.0.1:5055/a/b".into(), Some("v2".into()))
        );
        assert_eq!(
            pull_reference("a/b@sha256:00"),
            ("a/b@sha256:00".into(), None)
        );
    }

    #[test]
    fn config_json_auth_is_decoded_for_the_images_registry() {
        let dir = tempfile::tempdir().unwrap();
        let auth = BASE64.encode("alice:s3cret:with:colons");
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"auths":{{"https://registry.example:5000/v1/":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let credentials = from_docker_config(dir.path(), "registry.example:5000/app")
            .unwrap()
            .unwrap();
        assert_eq!(credentials.username.as_deref(), Some("alice"));
        assert_eq!(credentials.password.as_deref(), Some("s3cret:with:colons"));
        assert!(
            from_docker_config(dir.path(), "other.example/app")
                .unwrap()
                .is_none()
        );
    }
}
