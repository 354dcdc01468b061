//! Registry credentials for images in Amazon ECR, obtained on the caller's side.
//!
//! The instance never gets AWS credentials for the pull: spotrun asks ECR for a short-lived
//! registry login with the caller's credentials and hands it to Docker over the tunnel. This file
//! recognises ECR image references and fetches the login; it does not talk to Docker.

use anyhow::Context as _;
use base64::Engine as _;

use super::{AwsContext as _, config_region, load_config};

/// A Docker registry login from ECR, valid for twelve hours.
#[derive(Clone)]
pub struct RegistryLogin {
    pub username: String,
    pub password: String,
    /// `https://<account>.dkr.ecr.<region>.amazonaws.com`
    pub proxy_endpoint: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegistryLogin")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("proxy_endpoint", &self.proxy_endpoint)
            .finish()
    }
}

/// Asks ECR for a registry login; `region` and `endpoint_url` override the aws-config chain, as
/// for EC2. Pass the image's own region (`region_of`), which may differ from the instance's.
pub async fn registry_credentials(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> anyhow::Result<RegistryLogin> {
    let config = load_config(region, endpoint_url).await?;
    let region = config_region(&config)?;
    let client = aws_sdk_ecr::Client::new(&config);

    let output = client
        .get_authorization_token()
        .send()
        .await
        .aws_context(|| format!("Failed to get an ECR registry login in {region}"))?;
    let data = output
        .authorization_data()
        .first()
        .with_context(|| format!("ECR in {region} answered without authorization data"))?;

    let token = data
        .authorization_token()
        .context("ECR answered without an authorization token")?;
    let (username, password) = decode_token(token)?;
    Ok(RegistryLogin {
        username,
        password,
        proxy_endpoint: data.proxy_endpoint().unwrap_or_default().to_owned(),
    })
}

/// The token is base64 of `user:password`.
fn decode_token(token: &str) -> anyhow::Result<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .context("ECR authorization token is not base64")?;
    let decoded = String::from_utf8(decoded).context("ECR authorization token is not UTF-8")?;
    let (username, password) = decoded
        .split_once(':')
        .context("ECR authorization token is not of the form user:password")?;
    Ok((username.to_owned(), password.to_owned()))
}

/// Whether the image lives in a private ECR registry:
/// `<account>.dkr.ecr.<region>.amazonaws.com/<repository>[:tag]` (also `ecr-fips` and the
/// `.amazonaws.com.cn` partition).
pub fn is_ecr_image(image: &str) -> bool {
    region_of(image).is_some()
}

/// The region of an ECR image's registry, `None` for any other image.
pub fn region_of(image: &str) -> Option<String> {
    let (registry, repository) = image.split_once('/')?;
    if repository.is_empty() {
        return None;
    }
    let host = registry
        .strip_suffix(".amazonaws.com")
        .or_else(|| registry.strip_suffix(".amazonaws.com.cn"))?;

    let mut labels = host.split('.');
    let account = labels.next()?;
    let (dkr, ecr, region) = (labels.next()?, labels.next()?, labels.next()?);
    let well_formed = account.len() == 12
        && account.bytes().all(|byte| byte.is_ascii_digit())
        && dkr == "dkr"
        && (ecr == "ecr" || ecr == "ecr-fips")
        && !region.is_empty()
        && labels.next().is_none();
    well_formed.then(|| region.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_images_are_recognised_with_their_region() {
        let image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app:1.2";
        assert!(is_ecr_image(image));
        assert_eq!(region_of(image).as_deref(), Some("eu-west-1"));
        let china = "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/app";
        assert_eq!(region_of(china).as_deref(), Some("cn-north-1"));
        let fips = "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com/app@sha256:ab";
        assert_eq!(region_of(fips).as_deref(), Some("us-east-1"));
    }

    #[test]
    fn other_images_are_not_ecr() {
        for image in [
            "ubuntu:24.04",
            "docker.io/library/ubuntu",
            "127.0.0.1:5000/test:latest",
            "public.ecr.aws/docker/library/alpine",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/",
            "12345.dkr.ecr.us-east-1.amazonaws.com/app",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example/app",
        ] {
            assert!(!is_ecr_image(image), "{image}");
        }
    }

    #[test]
    fn token_decodes_to_user_and_password() {
        let token = base64::engine::general_purpose::STANDARD.encode("AWS:secret:with:colons");
        let (username, password) = decode_token(&token).unwrap();
        assert_eq!(username, "AWS");
        assert_eq!(password, "secret:with:colons");
        assert!(decode_token("bm8tY29sb24=").is_err());
    }
}
