//! Salesforce authentication as an [`AuthExtension`]: OAuth 2 with the username-password,
//! refresh-token, client-credentials or JWT bearer flow, against a configurable login host
//! (production, sandbox, My Domain). The token goes out as `Authorization: Bearer` on every
//! request; `authenticate` fetches a new one when the server rejects the old
//! (`401::Authentication invalid`, or `403::Handshake denied` for the same reason).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::json;

use super::error::Error;
use super::extension::{AuthExtension, Extension};
use super::message::Message;
use super::options::Tls;

/// Salesforce's production login host.
pub const LOGIN_PRODUCTION: &str = "https://login.salesforce.com";
/// Salesforce's sandbox login host.
pub const LOGIN_SANDBOX: &str = "https://test.salesforce.com";

/// How to obtain a token.
#[derive(Clone)]
pub enum SalesforceFlow {
    /// `grant_type=password`: a user's name and password (with its security token
    /// appended, if the org requires one).
    Password {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// `grant_type=refresh_token`.
    RefreshToken {
        /// The refresh token.
        refresh_token: String,
    },
    /// `grant_type=client_credentials`: the connected app's own run-as user.
    ClientCredentials,
    /// `urn:ietf:params:oauth:grant-type:jwt-bearer`: a JWT signed with the connected app's
    /// certificate key (RS256).
    JwtBearer {
        /// The user the token is for.
        username: String,
        /// The RSA private key, PEM (PKCS#8 or PKCS#1).
        private_key_pem: String,
    },
}

/// A connected app's credentials and the login host.
#[derive(Clone)]
pub struct SalesforceCredentials {
    /// `https://login.salesforce.com`, `https://test.salesforce.com`, or a My Domain URL.
    pub login_url: String,
    /// The connected app's consumer key.
    pub client_id: String,
    /// The connected app's consumer secret (not used by the JWT bearer flow).
    pub client_secret: Option<String>,
    /// The flow.
    pub flow: SalesforceFlow,
}

/// A token and where to use it. Its `Debug` output leaves the token out.
#[derive(Clone, Deserialize)]
pub struct SalesforceToken {
    /// The access token.
    pub access_token: String,
    /// The org's instance, e.g. `https://example.my.salesforce.com`.
    pub instance_url: String,
    /// Usually `Bearer`.
    #[serde(default = "bearer")]
    pub token_type: String,
}

impl std::fmt::Debug for SalesforceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesforceToken")
            .field("access_token", &"<redacted>")
            .field("instance_url", &self.instance_url)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// How long a token request may take, connecting included: it runs inside the client's
/// outgoing hooks, so a login host that never answers must not stall the session.
pub const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn bearer() -> String {
    "Bearer".into()
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

/// The auth extension. Log in first to learn the instance URL, then give it to the client:
///
/// ```no_run
/// use bayeux_client::{Client, ConnectionType, SalesforceAuth, SalesforceCredentials, SalesforceFlow, LOGIN_PRODUCTION};
///
/// # async fn example() -> Result<(), bayeux_client::Error> {
/// let auth = SalesforceAuth::new(SalesforceCredentials {
///     login_url: LOGIN_PRODUCTION.into(),
///     client_id: "3MVG9...".into(),
///     client_secret: Some("secret".into()),
///     flow: SalesforceFlow::RefreshToken { refresh_token: "5Aep...".into() },
/// })?;
/// let token = auth.login().await?;
/// let client = Client::builder(SalesforceAuth::cometd_url(&token.instance_url, "62.0"))
///     .connection_types([ConnectionType::LongPolling])
///     .auth(auth)
///     .build()?;
/// # Ok(()) }
/// ```
pub struct SalesforceAuth {
    credentials: SalesforceCredentials,
    token_url: Url,
    http: reqwest::Client,
    token: Mutex<Option<SalesforceToken>>,
}

impl SalesforceAuth {
    /// An auth extension for these credentials (no request is made yet).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a bad login URL or private key.
    pub fn new(credentials: SalesforceCredentials) -> Result<Self, Error> {
        Self::with_tls(credentials, &Tls::Verify)
    }

    /// As [`new`](Self::new), checking the login host's certificate as `tls` says.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a bad login URL, private key or TLS setting.
    pub fn with_tls(credentials: SalesforceCredentials, tls: &Tls) -> Result<Self, Error> {
        let invalid = |what: String| Error::InvalidOptions(format!("salesforce: {what}"));
        let login = Url::parse(&credentials.login_url)
            .map_err(|error| invalid(format!("login_url {:?}: {error}", credentials.login_url)))?;
        let token_url = login.join("/services/oauth2/token").map_err(|error| invalid(error.to_string()))?;
        if let SalesforceFlow::JwtBearer { private_key_pem, .. } = &credentials.flow {
            signing_key(private_key_pem).map_err(invalid)?;
        }
        let config = super::tls::client_config(tls)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*config).clone())
            .connect_timeout(LOGIN_TIMEOUT)
            .timeout(LOGIN_TIMEOUT)
            // Never followed: a 307 would post the password and the client secret again,
            // to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| invalid(format!("HTTP client: {error}")))?;
        Ok(SalesforceAuth { credentials, token_url, http, token: Mutex::new(None) })
    }

    /// The CometD endpoint of an instance for an API version: `{instance}/cometd/{version}`.
    pub fn cometd_url(instance_url: &str, api_version: &str) -> String {
        format!("{}/cometd/{api_version}", instance_url.trim_end_matches('/'))
    }

    /// Requests a token now and keeps it for the following requests.
    ///
    /// # Errors
    /// [`Error::Authentication`] when the login host refuses or cannot be reached.
    pub async fn login(&self) -> Result<SalesforceToken, Error> {
        let token = self.request_token().await?;
        *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token.clone());
        Ok(token)
    }

    fn current(&self) -> Option<SalesforceToken> {
        self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    async fn request_token(&self) -> Result<SalesforceToken, Error> {
        let credentials = &self.credentials;
        let mut form: Vec<(&str, String)> = vec![("client_id", credentials.client_id.clone())];
        if let Some(secret) = &credentials.client_secret {
            form.push(("client_secret", secret.clone()));
        }
        match &credentials.flow {
            SalesforceFlow::Password { username, password } => {
                form.extend([
                    ("grant_type", "password".into()),
                    ("username", username.clone()),
                    ("password", password.clone()),
                ]);
            }
            SalesforceFlow::RefreshToken { refresh_token } => {
                form.extend([
                    ("grant_type", "refresh_token".into()),
                    ("refresh_token", refresh_token.clone()),
                ]);
            }
            SalesforceFlow::ClientCredentials => form.push(("grant_type", "client_credentials".into())),
            SalesforceFlow::JwtBearer { username, private_key_pem } => {
                let assertion = self.jwt(username, private_key_pem)?;
                form = vec![
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
                    ("assertion", assertion),
                ];
            }
        }
        let body = form
            .iter()
            .map(|(name, value)| format!("{name}={}", percent_encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .http
            .post(self.token_url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|error| Error::Authentication {
                message: format!("cannot reach {}: {error}", self.token_url),
                retryable: true,
            })?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .unwrap_or_default();
            return Err(Error::Authentication {
                message: format!(
                    "the login host answered {status} redirecting to {:?}; redirects are not followed (use the final login URL)",
                    super::error::bounded(location, 1024)
                ),
                retryable: false,
            });
        }
        let bytes = response.bytes().await.map_err(|error| Error::Authentication {
            message: format!("reading the token response: {error}"),
            retryable: true,
        })?;
        if !status.is_success() {
            let reason = serde_json::from_slice::<OAuthError>(&bytes)
                .ok()
                .map(|error| {
                    format!(
                        "{}: {}",
                        error.error.unwrap_or_default(),
                        error.error_description.unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(Error::Authentication {
                message: format!("the login host refused ({status}): {reason}"),
                retryable: status.is_server_error(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|error| Error::Authentication {
            message: format!("unexpected token response: {error}"),
            retryable: false,
        })
    }

    /// A JWT bearer assertion: RS256 over `{iss, sub, aud, exp}`, valid three minutes.
    fn jwt(&self, username: &str, private_key_pem: &str) -> Result<String, Error> {
        let key = signing_key(private_key_pem)
            .map_err(|message| Error::Authentication { message, retryable: false })?;
        let expires = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + 180;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = json!({
            "iss": self.credentials.client_id,
            "sub": username,
            "aud": self.credentials.login_url.trim_end_matches('/'),
            "exp": expires,
        });
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signed.as_bytes(),
            &mut signature,
        )
        .map_err(|_| Error::Authentication { message: "could not sign the JWT".into(), retryable: false })?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// The RSA key of a PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
fn signing_key(pem: &str) -> Result<ring::signature::RsaKeyPair, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let key =
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|error| format!("private key: {error}"))?;
    match &key {
        PrivateKeyDer::Pkcs8(der) => ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(der) => ring::signature::RsaKeyPair::from_der(der.secret_pkcs1_der()),
        _ => return Err("the private key is not an RSA key".into()),
    }
    .map_err(|error| format!("private key: {error}"))
}

/// Form-encodes a value (`application/x-www-form-urlencoded`).
fn percent_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => encoded.push(byte as char),
            b' ' => encoded.push('+'),
            other => encoded.push_str(&format!("%{other:02X}")),
        }
    }
    encoded
}

#[async_trait]
impl Extension for SalesforceAuth {
    async fn outgoing(&self, _payload: &mut Vec<Message>, headers: &mut HeaderMap) -> Result<(), Error> {
        let token = match self.current() {
            Some(token) => token,
            None => self.login().await?,
        };
        let value =
            HeaderValue::from_str(&format!("{} {}", token.token_type, token.access_token)).map_err(|_| {
                Error::Authentication {
                    message: "the token is not a valid header value".into(),
                    retryable: false,
                }
            })?;
        headers.insert(AUTHORIZATION, value);
        Ok(())
    }
}

#[async_trait]
impl AuthExtension for SalesforceAuth {
    async fn authenticate(&self) -> Result<(), Error> {
        tracing::info!(login = %self.token_url, "requesting a new Salesforce token");
        self.login().await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_prints() {
        let token = SalesforceToken {
            access_token: "00Dxx!secret-token".into(),
            instance_url: "https://x.my.salesforce.com".into(),
            token_type: "Bearer".into(),
        };
        let printed = format!("{token:?} {token:#?}");
        assert!(!printed.contains("secret-token"), "{printed}");
        assert!(printed.contains("https://x.my.salesforce.com"), "{printed}");
    }

    #[test]
    fn form_values_are_encoded() {
        assert_eq!(percent_encode("a b&c=d+é"), "a+b%26c%3Dd%2B%C3%A9");
    }

    #[test]
    fn cometd_urls_are_built_from_the_instance() {
        assert_eq!(
            SalesforceAuth::cometd_url("https://x.my.salesforce.com/", "62.0"),
            "https://x.my.salesforce.com/cometd/62.0"
        );
    }

    #[test]
    fn bad_keys_and_urls_are_rejected_up_front() {
        let credentials = |flow| SalesforceCredentials {
            login_url: LOGIN_SANDBOX.into(),
            client_id: "id".into(),
            client_secret: None,
            flow,
        };
        let jwt = SalesforceFlow::JwtBearer { username: "u".into(), private_key_pem: "not a key".into() };
        assert!(SalesforceAuth::new(credentials(jwt)).is_err());
        let mut bad_url = credentials(SalesforceFlow::ClientCredentials);
        bad_url.login_url = "not a url".into();
        assert!(SalesforceAuth::new(bad_url).is_err());
    }
}
