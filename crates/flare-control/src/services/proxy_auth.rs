//! Proxy auth tokens: what a request to an endpoint with `requires_proxy_auth=True` must
//! carry (`Flare-Key: <token id>` and `Flare-Secret: <secret>`; Modal's `Modal-Key` /
//! `Modal-Secret` too). The secret is shown once, when the token is made; the control
//! plane keeps only its BLAKE3 hash, in `home/proxy-auth-tokens.json` (root-only).
//! Containers cannot make, list or delete tokens.

use std::path::PathBuf;
use std::sync::RwLock;

use axum::extract::{Path, State};
use axum::Json;
use flare_api::ApiError;
use serde::{Deserialize, Serialize};

use super::Service;
use crate::http::body::{ApiBody, Valid};
use crate::http::{HttpError, Route};
use crate::{new_id, now_ts, ControlPlane};

/// The service.
pub struct ProxyAuth;

impl Service for ProxyAuth {
    fn name(&self) -> &'static str {
        "proxy-auth-tokens"
    }

    fn routes(&self) -> Vec<Route> {
        vec![
            Route::post("/v1/proxy-auth-tokens", create),
            Route::get("/v1/proxy-auth-tokens", list),
            Route::delete("/v1/proxy-auth-tokens/{token_id}", delete),
        ]
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    token_id: String,
    name: String,
    created_at: f64,
    /// Hex BLAKE3 of the secret.
    secret_hash: String,
}

/// The tokens, in memory and on disk.
pub struct Tokens {
    path: PathBuf,
    tokens: RwLock<Vec<Stored>>,
}

impl Tokens {
    /// The tokens of the control plane whose data dir is `home` (none if the file is absent
    /// or unreadable: then every protected endpoint refuses every request).
    pub fn open(home: &std::path::Path) -> Self {
        let path = home.join("proxy-auth-tokens.json");
        let tokens =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Tokens { path, tokens: RwLock::new(tokens) }
    }

    /// Whether `key` / `secret` are a token's.
    pub fn check(&self, key: &str, secret: &str) -> bool {
        let hash = blake3::hash(secret.as_bytes()).to_hex();
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        tokens
            .iter()
            .any(|t| t.token_id == key && flare_api::same_secret(t.secret_hash.as_bytes(), hash.as_bytes()))
    }

    fn save(&self, tokens: &[Stored]) -> Result<(), ApiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(tokens).map_err(|e| ApiError::internal(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| ApiError::internal(format!("saving proxy auth tokens: {e}")))
    }
}

#[derive(Deserialize)]
struct CreateToken {
    #[serde(default)]
    name: String,
}

impl ApiBody for CreateToken {
    fn if_empty() -> Option<Self> {
        Some(CreateToken { name: String::new() })
    }

    fn validate(&self) -> Result<(), ApiError> {
        if self.name.len() > 128 || self.name.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "a token name is at most 128 characters, none of them control ones",
            ));
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Created {
    token_id: String,
    token_secret: String,
    name: String,
    created_at: f64,
}

#[derive(Serialize)]
struct Listed {
    token_id: String,
    name: String,
    created_at: f64,
}

#[derive(Serialize)]
struct TokenList {
    tokens: Vec<Listed>,
}

async fn create(
    State(cp): State<ControlPlane>,
    Valid(req): Valid<CreateToken>,
) -> Result<Json<Created>, HttpError> {
    use rand::Rng;
    let secret: u128 = rand::thread_rng().gen();
    let secret2: u128 = rand::thread_rng().gen();
    let token_secret = format!("ws-{secret:032x}{secret2:032x}");
    let stored = Stored {
        token_id: new_id("wk"),
        name: req.name,
        created_at: now_ts(),
        secret_hash: blake3::hash(token_secret.as_bytes()).to_hex().to_string(),
    };
    let t = cp.proxy_tokens();
    {
        let mut tokens = t.tokens.write().unwrap_or_else(|p| p.into_inner());
        let mut next = tokens.clone();
        next.push(stored.clone());
        t.save(&next)?;
        *tokens = next;
    }
    Ok(Json(Created {
        token_id: stored.token_id,
        token_secret,
        name: stored.name,
        created_at: stored.created_at,
    }))
}

async fn list(State(cp): State<ControlPlane>) -> Result<Json<TokenList>, HttpError> {
    let tokens = cp.proxy_tokens().tokens.read().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Json(TokenList {
        tokens: tokens
            .into_iter()
            .map(|t| Listed { token_id: t.token_id, name: t.name, created_at: t.created_at })
            .collect(),
    }))
}

async fn delete(
    State(cp): State<ControlPlane>,
    Path(token_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    let t = cp.proxy_tokens();
    let mut tokens = t.tokens.write().unwrap_or_else(|p| p.into_inner());
    if !tokens.iter().any(|x| x.token_id == token_id) {
        return Err(ApiError::not_found(format!("no proxy auth token {token_id}")).into());
    }
    let next: Vec<Stored> = tokens.iter().filter(|x| x.token_id != token_id).cloned().collect();
    t.save(&next)?;
    *tokens = next;
    Ok(Json(flare_api::Empty {}))
}
