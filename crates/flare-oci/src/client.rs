//! A small registry HTTP client: plain http for local registries, https (rustls, Mozilla
//! roots) for the rest, redirects, and the distribution spec's token auth.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, USER_AGENT, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::{OciError, Result};
use crate::reference::ImageRef;

#[cfg(feature = "https")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "https"))]
type Connector = HttpConnector;

const MAX_REDIRECTS: usize = 5;
const MAX_TOKEN_BODY: usize = 1 << 20;
const MAX_ERROR_BODY: usize = 4096;

/// A user name and password (or token) for a registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Registry client. Cheap to clone; clones share connections and settings.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<Connector, Empty<Bytes>>,
    credentials: Arc<HashMap<String, Credentials>>,
    plain_http: Arc<HashSet<String>>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("credentials_for", &self.credentials.keys().collect::<Vec<_>>())
            .field("plain_http", &self.plain_http)
            .finish_non_exhaustive()
    }
}

impl Default for Client {
    fn default() -> Client {
        Client::new()
    }
}

impl Client {
    /// A client with no credentials. Registries on loopback addresses (`localhost`,
    /// `127.*`, `[::1]`) are spoken to over plain http, like Docker's default insecure
    /// range; everything else over https (if built with the `https` feature).
    pub fn new() -> Client {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(30)));
        #[cfg(feature = "https")]
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        #[cfg(not(feature = "https"))]
        let connector = http;
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Client {
            http,
            credentials: Arc::default(),
            plain_http: Arc::default(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Use `credentials` for `registry` (as written in references, e.g. `docker.io`,
    /// `ghcr.io`, `localhost:5000`): sent to its token service, or as basic auth if the
    /// registry asks for that.
    pub fn with_credentials(mut self, registry: &str, credentials: Credentials) -> Client {
        Arc::make_mut(&mut self.credentials).insert(registry.to_owned(), credentials);
        self
    }

    /// Speak plain http to `registry` (host[:port]) even though it is not on loopback.
    pub fn with_plain_http(mut self, registry: &str) -> Client {
        Arc::make_mut(&mut self.plain_http).insert(registry.to_owned());
        self
    }

    /// How long to wait for response headers (and for each body read) before giving up.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Base URL of the registry API (`https://registry-1.docker.io`, `http://localhost:5000`).
    pub(crate) fn base_url(&self, registry: &str) -> String {
        let host =
            if registry == crate::reference::DEFAULT_REGISTRY { "registry-1.docker.io" } else { registry };
        let plain = self.plain_http.contains(registry) || is_loopback(registry);
        format!("{}://{host}", if plain { "http" } else { "https" })
    }

    /// A session for pulling from one repository: remembers the token it got.
    pub(crate) fn session(&self, image: &ImageRef) -> Session {
        Session {
            client: self.clone(),
            image: image.clone(),
            base: self.base_url(&image.registry),
            auth: Arc::new(Mutex::new(None)),
        }
    }

    async fn send(&self, uri: &Uri, accept: &str, auth: Option<&HeaderValue>) -> Result<Response<Incoming>> {
        let mut req = Request::get(uri.clone())
            .header(USER_AGENT, concat!("flare-oci/", env!("CARGO_PKG_VERSION")))
            .header(ACCEPT, accept);
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = req.body(Empty::new()).map_err(|e| transport(uri, e))?;
        match tokio::time::timeout(self.timeout, self.http.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(transport(uri, error_chain(&e))),
            Err(_) => Err(transport(uri, format!("no response within {:?}", self.timeout))),
        }
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, _)) if !registry.ends_with(']') => h,
        _ => registry,
    };
    host == "localhost" || host == "[::1]" || host.starts_with("127.")
}

fn transport(uri: &Uri, e: impl ToString) -> OciError {
    OciError::Transport { url: uri.to_string(), message: e.to_string() }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Talking to one repository of one registry.
#[derive(Clone)]
pub(crate) struct Session {
    client: Client,
    image: ImageRef,
    base: String,
    auth: Arc<Mutex<Option<HeaderValue>>>,
}

impl Session {
    pub(crate) fn image(&self) -> &ImageRef {
        &self.image
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.client.timeout()
    }

    /// GET `/v2/<repository>/<path>`: follows redirects, answers a 401 by getting a
    /// token (or using basic credentials) once and retrying. Returns the successful
    /// response; 404 is [`OciError::NotFound`], 401/403 after auth is
    /// [`OciError::AuthRefused`], anything else non-2xx is [`OciError::Http`].
    pub(crate) async fn get(&self, path: &str, accept: &str, what: &str) -> Result<Response<Incoming>> {
        let url = format!("{}/v2/{}/{path}", self.base, self.image.repository);
        let mut uri: Uri = url.parse().map_err(|e| OciError::Usage(format!("bad URL {url:?}: {e}")))?;
        let registry_authority = uri.authority().cloned();
        let mut tried_auth = false;
        let mut redirects = 0;
        loop {
            // Credentials go to the registry only, never to a storage backend it redirects to.
            let auth =
                if uri.authority() == registry_authority.as_ref() { self.current_auth() } else { None };
            let resp = self.client.send(&uri, accept, auth.as_ref()).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status.is_redirection() {
                redirects += 1;
                let Some(location) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) else {
                    return Err(http_error(&uri, resp).await);
                };
                if redirects > MAX_REDIRECTS {
                    return Err(OciError::Transport {
                        url: uri.to_string(),
                        message: "too many redirects".into(),
                    });
                }
                uri = resolve(&uri, location)?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED
                && !tried_auth
                && uri.authority() == registry_authority.as_ref()
            {
                tried_auth = true;
                let challenge =
                    resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let header = self.authenticate(challenge.as_deref()).await?;
                *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = Some(header);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let body = error_body(resp).await;
                return Err(OciError::AuthRefused {
                    registry: self.image.registry.clone(),
                    reference: self.image.to_string(),
                    detail: format!(
                        "HTTP {} for {what} after authenticating (the repository may also not exist): {body}",
                        status.as_u16()
                    ),
                });
            }
            if status == StatusCode::NOT_FOUND {
                let body = error_body(resp).await;
                return Err(OciError::NotFound {
                    reference: self.image.to_string(),
                    detail: format!("{what}: {body}"),
                });
            }
            return Err(http_error(&uri, resp).await);
        }
    }

    fn current_auth(&self) -> Option<HeaderValue> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refused(&self, detail: String) -> OciError {
        OciError::AuthRefused {
            registry: self.image.registry.clone(),
            reference: self.image.to_string(),
            detail,
        }
    }

    fn basic(&self) -> Option<HeaderValue> {
        let creds = self.client.credentials.get(&self.image.registry)?;
        let encoded = STANDARD.encode(format!("{}:{}", creds.username, creds.password));
        HeaderValue::from_str(&format!("Basic {encoded}")).ok()
    }

    /// Answer a `WWW-Authenticate` challenge with an `Authorization` header value.
    async fn authenticate(&self, challenge: Option<&str>) -> Result<HeaderValue> {
        let Some(challenge) = challenge else {
            return Err(self.refused("HTTP 401 without a WWW-Authenticate challenge".into()));
        };
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            return self.basic().ok_or_else(|| {
                self.refused("the registry wants basic auth and no credentials are configured".into())
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(self.refused(format!("unsupported auth scheme {scheme:?}")));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| self.refused(format!("Bearer challenge without realm: {challenge}")))?;
        let mut url = realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        let default_scope = format!("repository:{}:pull", self.image.repository);
        let scope = params.get("scope").unwrap_or(&default_scope);
        for (key, value) in [("service", params.get("service")), ("scope", Some(scope))] {
            if let Some(value) = value {
                url.push(sep);
                sep = '&';
                url.push_str(key);
                url.push('=');
                url.push_str(&percent_encode(value));
            }
        }
        let uri: Uri = url.parse().map_err(|e| self.refused(format!("bad token realm {realm:?}: {e}")))?;
        let basic = self.basic();
        let resp = self.client.send(&uri, "application/json", basic.as_ref()).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let body = error_body(resp).await;
            let who = if basic.is_some() { "the configured credentials" } else { "anonymous access" };
            return Err(self
                .refused(format!("token service {realm} refused {who} (HTTP {}): {body}", status.as_u16())));
        }
        if !status.is_success() {
            return Err(http_error(&uri, resp).await);
        }
        let body = read_limited(resp.into_body(), MAX_TOKEN_BODY, &uri).await?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| self.refused(format!("token service {realm} answered with invalid JSON: {e}")))?;
        let token = json
            .get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.refused(format!("token service {realm} returned no token")))?;
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| self.refused("token contains characters not allowed in a header".into()))
    }
}

/// Read a whole body, failing if it is larger than `limit`.
pub(crate) async fn read_limited(body: Incoming, limit: usize, uri: &Uri) -> Result<Bytes> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(transport(uri, format!("reading body: {e}"))),
    }
}

async fn error_body(resp: Response<Incoming>) -> String {
    match Limited::new(resp.into_body(), MAX_ERROR_BODY).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
        Err(_) => "(body too long or unreadable)".into(),
    }
}

async fn http_error(uri: &Uri, resp: Response<Incoming>) -> OciError {
    let status = resp.status().as_u16();
    OciError::Http { method: "GET", url: uri.to_string(), status, body: error_body(resp).await }
}

fn resolve(base: &Uri, location: &str) -> Result<Uri> {
    let bad = |e: String| OciError::Transport {
        url: base.to_string(),
        message: format!("bad redirect {location:?}: {e}"),
    };
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()));
    }
    if !location.starts_with('/') {
        return Err(bad("relative redirects are not supported".into()));
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    format!("{scheme}://{authority}{location}")
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))
}

/// `Bearer realm="x",service="y"` → ("Bearer", {realm: x, service: y}).
pub(crate) fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String =
            chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect::<String>().trim().to_owned();
        }
        params.insert(key, value);
    }
    (scheme.to_owned(), params)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/debian:pull,push");
        let (scheme, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(p["realm"], "Registry Realm");
    }

    #[test]
    fn urls() {
        let c = Client::new();
        assert_eq!(c.base_url("docker.io"), "https://registry-1.docker.io");
        assert_eq!(c.base_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(c.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base_url("ghcr.io"), "https://ghcr.io");
        let c = c.with_plain_http("reg.lan:5000");
        assert_eq!(c.base_url("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(percent_encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
        let base: Uri = "http://h:1/v2/x".parse().unwrap();
        assert_eq!(resolve(&base, "/blobs/y?z=1").unwrap().to_string(), "http://h:1/blobs/y?z=1");
    }
}
