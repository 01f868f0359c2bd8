//! Which endpoint a request is for (pure): host names `<label>.<web domain>`, or the path
//! form `/web/<app>/<name>/...` for clients that cannot set a Host header; and the URLs
//! endpoints get.

/// The address of an endpoint in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebAddress {
    /// `<label>.<web domain>`; the whole path goes to the app.
    Host { label: String },
    /// `/web/<app>/<name>/rest`: `name` is the endpoint's label or its function's name;
    /// `/rest` goes to the app with `prefix` (`/web/<app>/<name>`) as its root path.
    Path { app: String, name: String, prefix: String, rest: String },
}

/// The prefix of the path form.
pub const PATH_PREFIX: &str = "/web/";

/// Whether `host` (a Host header, maybe with a port) names an endpoint under `domain`
/// (`localhost:7878`, `flare.example.com`): its label. A host equal to the domain, or one
/// with a port different from the domain's, is not an endpoint.
pub fn label_of_host<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let host = host.trim();
    let (dom_name, dom_port) = split_port(domain);
    let (name, port) = split_port(host);
    if dom_port.is_some() && port.is_some() && port != dom_port {
        return None;
    }
    let name_len = name.len().checked_sub(dom_name.len() + 1)?;
    let (label, rest) = name.split_at(name_len);
    if !rest.starts_with('.') || !rest[1..].eq_ignore_ascii_case(dom_name) {
        return None;
    }
    (!label.is_empty() && !label.contains('.')).then_some(label)
}

fn split_port(h: &str) -> (&str, Option<&str>) {
    match h.rsplit_once(':') {
        Some((n, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(']') => {
            (n, Some(p))
        }
        _ => (h, None),
    }
}

/// The endpoint a request names, if it names one.
pub fn parse(host: Option<&str>, path: &str, domain: &str) -> Option<WebAddress> {
    if let Some(label) = host.and_then(|h| label_of_host(h, domain)) {
        return Some(WebAddress::Host { label: label.to_ascii_lowercase() });
    }
    let tail = path.strip_prefix(PATH_PREFIX)?;
    let mut parts = tail.splitn(3, '/');
    let app = parts.next().filter(|s| !s.is_empty())?;
    let name = parts.next().filter(|s| !s.is_empty())?;
    let rest = format!("/{}", parts.next().unwrap_or(""));
    Some(WebAddress::Path {
        app: app.to_string(),
        name: name.to_string(),
        prefix: format!("{PATH_PREFIX}{app}/{name}"),
        rest,
    })
}

/// A host label from any name: lower case, runs of other characters as one `-`, at most
/// 63 characters (a longer one keeps 56 and a hash of the whole).
pub fn slug(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.len() > 63 {
        let h = blake3::hash(name.as_bytes()).to_hex();
        out.truncate(56);
        while out.ends_with('-') {
            out.pop();
        }
        out.push('-');
        out.push_str(&h[..6]);
    }
    if out.is_empty() {
        out.push_str("web");
    }
    out
}

/// The label of an endpoint: its own, else `<app>-<function>[-<method>]`.
pub fn label_for(app: &str, function: &str, method: Option<&str>, label: Option<&str>) -> String {
    match label {
        Some(l) => l.to_string(),
        None => slug(&match method {
            Some(m) => format!("{app}-{function}-{m}"),
            None => format!("{app}-{function}"),
        }),
    }
}

/// An endpoint's URL.
pub fn url(scheme: &str, domain: &str, label: &str) -> String {
    format!("{scheme}://{label}.{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_labels() {
        assert_eq!(label_of_host("hello-predict.localhost:7878", "localhost:7878"), Some("hello-predict"));
        assert_eq!(label_of_host("hello-predict.localhost", "localhost:7878"), Some("hello-predict"));
        assert_eq!(label_of_host("Hello.LOCALHOST:7878", "localhost:7878"), Some("Hello"));
        assert_eq!(label_of_host("localhost:7878", "localhost:7878"), None);
        assert_eq!(label_of_host("127.0.0.1:7878", "localhost:7878"), None);
        assert_eq!(label_of_host("a.b.localhost:7878", "localhost:7878"), None);
        assert_eq!(label_of_host("x.localhost:9999", "localhost:7878"), None);
        assert_eq!(label_of_host("api.flare.example.com", "flare.example.com"), Some("api"));
        assert_eq!(label_of_host("evilflare.example.com", "flare.example.com"), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse(Some("x.localhost:7878"), "/a/b", "localhost:7878"),
            Some(WebAddress::Host { label: "x".into() })
        );
        assert_eq!(
            parse(Some("127.0.0.1:7878"), "/web/hello/predict/items/1", "localhost:7878"),
            Some(WebAddress::Path {
                app: "hello".into(),
                name: "predict".into(),
                prefix: "/web/hello/predict".into(),
                rest: "/items/1".into()
            })
        );
        assert_eq!(
            parse(None, "/web/hello/predict", "localhost:7878"),
            Some(WebAddress::Path {
                app: "hello".into(),
                name: "predict".into(),
                prefix: "/web/hello/predict".into(),
                rest: "/".into()
            })
        );
        assert_eq!(parse(Some("127.0.0.1:7878"), "/v1/apps", "localhost:7878"), None);
        assert_eq!(parse(None, "/web/hello", "localhost:7878"), None);
    }

    #[test]
    fn labels() {
        assert_eq!(label_for("hello", "predict", None, None), "hello-predict");
        assert_eq!(label_for("my_app", "Model", Some("web"), None), "my-app-model-web");
        assert_eq!(label_for("a", "b", None, Some("custom")), "custom");
        let long = slug(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert!(flare_api::valid_web_label(&long));
        assert_eq!(slug("__"), "web");
        assert_eq!(url("http", "localhost:7878", "a"), "http://a.localhost:7878");
    }
}
