//! A small HTTP/1.1 client for the control plane's API: fetching mounts, and relaying
//! the API calls that code inside containers makes through its worker's socket.

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::WorkerError;

/// A client bound to one base URL (`http://host:port`).
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    client: Client<HttpConnector, Body>,
}

impl HttpClient {
    pub fn new(base: &str) -> Result<Self, WorkerError> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(WorkerError::ControlUrlScheme(base));
        }
        base.parse::<Uri>()
            .map_err(|e| WorkerError::ControlUrl { url: base.clone(), message: e.to_string() })?;
        Ok(HttpClient { base, client: Client::builder(TokioExecutor::new()).build_http() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn uri(&self, path_and_query: &str) -> Result<Uri, WorkerError> {
        format!("{}{}", self.base, path_and_query)
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| WorkerError::BadUrl(e.to_string()))
    }

    /// GET a path; the body of a 2xx answer, else an error with the status and body.
    pub async fn get(&self, path: &str) -> Result<Bytes, WorkerError> {
        let req = Request::get(self.uri(path)?)
            .body(Body::empty())
            .map_err(|e| WorkerError::Http(e.to_string()))?;
        self.send(req).await
    }

    /// A request with a body of `content_type` (empty: none) and a bearer token; the body
    /// of a 2xx answer, else an error with the status and body.
    pub async fn call(
        &self,
        method: axum::http::Method,
        path: &str,
        bearer: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Bytes, WorkerError> {
        let mut req = Request::builder()
            .method(method)
            .uri(self.uri(path)?)
            .header(axum::http::header::AUTHORIZATION, format!("Bearer {bearer}"));
        if !content_type.is_empty() {
            req = req.header(axum::http::header::CONTENT_TYPE, content_type);
        }
        let req = req.body(Body::from(body)).map_err(|e| WorkerError::Http(e.to_string()))?;
        self.send(req).await
    }

    async fn send(&self, req: Request<Body>) -> Result<Bytes, WorkerError> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| WorkerError::Unreachable { base: self.base.clone(), message: e.to_string() })?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| WorkerError::Http(e.to_string()))?.to_bytes();
        if !status.is_success() {
            return Err(WorkerError::HttpStatus {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(body)
    }

    /// Relays a request to the same path on the control plane and its answer back.
    pub async fn forward(&self, req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let Ok(uri) = self.uri(&pq) else {
            return error_response(StatusCode::BAD_REQUEST, "invalid_argument", "bad request path");
        };
        let mut out = Request::builder().method(parts.method).uri(uri);
        for name in [axum::http::header::CONTENT_TYPE.as_str(), flare_api::CALLER_CONTAINER_HEADER] {
            if let Some(v) = parts.headers.get(name) {
                out = out.header(name, v);
            }
        }
        let Ok(out) = out.body(body) else {
            return error_response(StatusCode::BAD_REQUEST, "invalid_argument", "bad request");
        };
        match self.client.request(out).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &format!("the control plane is unreachable from this worker: {e}"),
            ),
        }
    }
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    Response::builder()
        .status(status)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("static response")
}

/// The router served on containers' sockets by a remote worker: the calls containers may
/// make (`flare_api::container_may_call`) are relayed to the control plane; others are refused.
pub fn proxy_router(client: HttpClient) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let client = client.clone();
        async move {
            if flare_api::container_may_call(req.method().as_str(), req.uri().path()) {
                client.forward(req).await
            } else {
                error_response(StatusCode::NOT_FOUND, "not_found", "not available from inside a container")
            }
        }
    })
}
