//! Dicts (`flare.Dict`): durable key-value maps of pickled keys and values, by name or
//! ephemeral, usable from clients and from containers.
//!
//! The entries live in the store only (tables `dicts` and `dict_entries`); nothing of
//! them is kept in memory. Every write goes through the store writer and its API call
//! answers after the commit, so an acknowledged write survives a crash. Operations on one
//! dict that read before they write (`put` with `skip_if_exists`, `pop`, delete) hold one
//! of a few striped locks across the read, the write and the commit, so they are atomic
//! with respect to the other writes of that dict; plain reads take no lock and see what
//! is committed.
//!
//! Limits: a key is at most [`MAX_KEY_BYTES`] pickled (400), a value at most
//! [`MAX_VALUE_BYTES`] (413); a `put` body at most [`flare_api::MAX_DICT_PUT_BODY`].

use axum::extract::{Path, Query, State};
use axum::Json;
use flare_api::{mib, ApiError, B64};
use flare_store::{DictRow, Write};
use serde::{Deserialize, Serialize};

use super::named::{check_create, commit, read};
use super::Service;
use crate::http::body::{ApiBody, Valid};
use crate::http::{HttpError, Route};
use crate::{new_id, now_ts, ControlPlane};

/// Largest pickled key.
pub const MAX_KEY_BYTES: usize = 64 << 10;
/// Largest pickled value.
pub const MAX_VALUE_BYTES: usize = 16 << 20;
/// Most entries one page of `GET /v1/dicts/{id}/items` has, and its default.
const MAX_PAGE_ITEMS: usize = 1000;
const DEFAULT_PAGE_ITEMS: usize = 100;
/// Most key and value bytes of one page (a page has at least one entry).
const MAX_PAGE_BYTES: usize = 32 << 20;

/// The service.
pub struct Dicts;

impl Service for Dicts {
    fn name(&self) -> &'static str {
        "dicts"
    }

    fn routes(&self) -> Vec<Route> {
        vec![
            Route::post("/v1/dicts", create).container(),
            Route::get("/v1/dicts", list).container(),
            Route::delete("/v1/dicts/{dict_id}", delete).container(),
            Route::post("/v1/dicts/{dict_id}/get", get).container(),
            Route::post("/v1/dicts/{dict_id}/contains", contains).container(),
            Route::post("/v1/dicts/{dict_id}/put", put).container(),
            Route::post("/v1/dicts/{dict_id}/pop", pop).container(),
            Route::get("/v1/dicts/{dict_id}/len", len).container(),
            Route::get("/v1/dicts/{dict_id}/items", items).container(),
            Route::post("/v1/dicts/{dict_id}/clear", clear).container(),
            Route::post("/v1/dicts/{dict_id}/heartbeat", heartbeat).container(),
        ]
    }
}

async fn existing(cp: &ControlPlane, dict_id: &str) -> Result<DictRow, ApiError> {
    let id = dict_id.to_string();
    read(cp, move |s| s.get_dict(&id)).await?.ok_or_else(|| ApiError::not_found(format!("no dict {dict_id}")))
}

fn check_key(key: &[u8]) -> Result<(), ApiError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::invalid(format!(
            "a dict key is at most {MAX_KEY_BYTES} bytes pickled; this one is {} bytes",
            key.len()
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct CreateDict {
    #[serde(default)]
    name: String,
    #[serde(default)]
    create_if_missing: bool,
    #[serde(default)]
    ephemeral: bool,
}

impl ApiBody for CreateDict {
    fn validate(&self) -> Result<(), ApiError> {
        check_create("dict", &self.name, self.ephemeral)
    }
}

#[derive(Serialize)]
struct DictInfo {
    dict_id: String,
    name: String,
    ephemeral: bool,
    created_at: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<u64>,
}

impl DictInfo {
    fn of(d: DictRow) -> Self {
        DictInfo {
            dict_id: d.dict_id,
            name: d.name,
            ephemeral: d.ephemeral,
            created_at: d.created_at,
            created: None,
            len: None,
        }
    }
}

async fn create(
    State(cp): State<ControlPlane>,
    Valid(req): Valid<CreateDict>,
) -> Result<Json<DictInfo>, HttpError> {
    let new = |name: String| DictRow {
        dict_id: new_id("di"),
        name,
        ephemeral: req.ephemeral,
        created_at: now_ts(),
    };
    if req.ephemeral {
        let d = new(String::new());
        cp.leases().touch(super::leases::Kind::Dict, &d.dict_id);
        commit(&cp, vec![Write::Dict(d.clone())]).await?;
        return Ok(Json(DictInfo { created: Some(true), ..DictInfo::of(d) }));
    }
    let _g = cp.dict_locks().lock(&format!("name:{}", req.name)).await;
    let name = req.name.clone();
    if let Some(d) = read(&cp, move |s| s.dict_by_name(&name)).await? {
        return Ok(Json(DictInfo { created: Some(false), ..DictInfo::of(d) }));
    }
    if !req.create_if_missing {
        return Err(ApiError::not_found(format!("no dict named {:?}", req.name)).into());
    }
    let d = new(req.name.clone());
    commit(&cp, vec![Write::Dict(d.clone())]).await?;
    tracing::info!(dict_id = %d.dict_id, name = %d.name, "dict created");
    Ok(Json(DictInfo { created: Some(true), ..DictInfo::of(d) }))
}

#[derive(Serialize)]
struct DictList {
    dicts: Vec<DictInfo>,
}

async fn list(State(cp): State<ControlPlane>) -> Result<Json<DictList>, HttpError> {
    let rows = read(&cp, |s| s.list_dicts()).await?;
    let dicts = rows.into_iter().map(|(d, n)| DictInfo { len: Some(n), ..DictInfo::of(d) }).collect();
    Ok(Json(DictList { dicts }))
}

async fn delete(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    let d = {
        let _g = cp.dict_locks().lock(&dict_id).await;
        let d = existing(&cp, &dict_id).await?;
        commit(&cp, vec![Write::DictDelete { dict_id: dict_id.clone() }]).await?;
        cp.leases().forget(&dict_id);
        d
    };
    tracing::info!(dict_id = %d.dict_id, name = %d.name, "dict deleted");
    Ok(Json(flare_api::Empty {}))
}

/// Deletes an ephemeral dict whose client went away (see [`super::leases`]).
pub(super) async fn delete_orphan(cp: &ControlPlane, dict_id: &str) -> Result<(), ApiError> {
    let _g = cp.dict_locks().lock(dict_id).await;
    commit(cp, vec![Write::DictDelete { dict_id: dict_id.to_string() }]).await?;
    tracing::info!(dict_id = %dict_id, "ephemeral dict deleted: no heartbeat from its client");
    Ok(())
}

/// The client of an ephemeral dict is still there (see [`super::leases`]).
async fn heartbeat(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    if existing(&cp, &dict_id).await?.ephemeral {
        cp.leases().touch(super::leases::Kind::Dict, &dict_id);
    }
    Ok(Json(flare_api::Empty {}))
}

#[derive(Deserialize)]
struct KeyReq {
    key: B64,
}

impl ApiBody for KeyReq {
    fn validate(&self) -> Result<(), ApiError> {
        check_key(&self.key.0)
    }
}

#[derive(Serialize)]
struct Found {
    found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<B64>,
}

async fn get(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
    Valid(req): Valid<KeyReq>,
) -> Result<Json<Found>, HttpError> {
    existing(&cp, &dict_id).await?;
    let value = read(&cp, move |s| s.dict_get(&dict_id, &req.key.0)).await?;
    Ok(Json(Found { found: value.is_some(), value: value.map(|v| B64(v.into())) }))
}

async fn contains(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
    Valid(req): Valid<KeyReq>,
) -> Result<Json<Found>, HttpError> {
    existing(&cp, &dict_id).await?;
    let found = read(&cp, move |s| s.dict_contains(&dict_id, &req.key.0)).await?;
    Ok(Json(Found { found, value: None }))
}

async fn pop(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
    Valid(req): Valid<KeyReq>,
) -> Result<Json<Found>, HttpError> {
    let _g = cp.dict_locks().lock(&dict_id).await;
    existing(&cp, &dict_id).await?;
    let (id, key) = (dict_id.clone(), req.key.0.clone());
    let value = read(&cp, move |s| s.dict_get(&id, &key)).await?;
    if value.is_some() {
        commit(&cp, vec![Write::DictRemove { dict_id, keys: vec![req.key.0.to_vec()] }]).await?;
    }
    Ok(Json(Found { found: value.is_some(), value: value.map(|v| B64(v.into())) }))
}

#[derive(Deserialize)]
struct Item {
    key: B64,
    value: B64,
}

#[derive(Deserialize)]
struct PutReq {
    items: Vec<Item>,
    #[serde(default)]
    skip_if_exists: bool,
}

impl ApiBody for PutReq {
    fn validate(&self) -> Result<(), ApiError> {
        for it in &self.items {
            check_key(&it.key.0)?;
            if it.value.0.len() > MAX_VALUE_BYTES {
                return Err(ApiError::too_large(format!(
                    "a dict value is at most {} pickled; this one is {}",
                    mib(MAX_VALUE_BYTES),
                    mib(it.value.0.len())
                )));
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Written {
    /// How many items were written (with `skip_if_exists`, those whose key was absent).
    written: usize,
}

async fn put(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
    Valid(req): Valid<PutReq>,
) -> Result<Json<Written>, HttpError> {
    let _g = cp.dict_locks().lock(&dict_id).await;
    existing(&cp, &dict_id).await?;
    let mut items: Vec<(Vec<u8>, Vec<u8>)> =
        req.items.into_iter().map(|it| (it.key.0.to_vec(), it.value.0.to_vec())).collect();
    if req.skip_if_exists {
        let id = dict_id.clone();
        items = read(&cp, move |s| {
            let mut keep: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for it in items {
                // The first of repeated keys wins, as if they were put one by one.
                if !keep.iter().any(|k| k.0 == it.0) && !s.dict_contains(&id, &it.0)? {
                    keep.push(it);
                }
            }
            Ok(keep)
        })
        .await?;
    }
    let written = items.len();
    if written > 0 {
        commit(&cp, vec![Write::DictPut { dict_id, items }]).await?;
    }
    Ok(Json(Written { written }))
}

#[derive(Serialize)]
struct Len {
    len: u64,
}

async fn len(State(cp): State<ControlPlane>, Path(dict_id): Path<String>) -> Result<Json<Len>, HttpError> {
    existing(&cp, &dict_id).await?;
    let len = read(&cp, move |s| s.dict_len(&dict_id)).await?;
    Ok(Json(Len { len }))
}

#[derive(Deserialize)]
struct PageQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    keys_only: bool,
}

#[derive(Serialize)]
struct Entry {
    key: B64,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<B64>,
}

#[derive(Serialize)]
struct Page {
    items: Vec<Entry>,
    /// The `after` of the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
}

async fn items(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<Page>, HttpError> {
    existing(&cp, &dict_id).await?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE_ITEMS).clamp(1, MAX_PAGE_ITEMS);
    let keys_only = q.keys_only;
    let id = dict_id.clone();
    let mut rows =
        read(&cp, move |s| s.dict_entries(&id, q.after, limit + 1, MAX_PAGE_BYTES, keys_only)).await?;
    let mut more = rows.len() > limit;
    rows.truncate(limit);
    if !more {
        // The page may have been cut by its byte budget: is there an entry after it?
        if let Some(last) = rows.last().map(|e| e.seq) {
            more = !read(&cp, move |s| s.dict_entries(&dict_id, last, 1, 0, true)).await?.is_empty();
        }
    }
    let next = if more { rows.last().map(|e| e.seq) } else { None };
    let items = rows
        .iter()
        .map(|e| Entry {
            key: B64(e.key.clone().into()),
            value: (!keys_only).then(|| B64(e.value.clone().into())),
        })
        .collect();
    Ok(Json(Page { items, next }))
}

async fn clear(
    State(cp): State<ControlPlane>,
    Path(dict_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    let _g = cp.dict_locks().lock(&dict_id).await;
    existing(&cp, &dict_id).await?;
    commit(&cp, vec![Write::DictClear { dict_id }]).await?;
    Ok(Json(flare_api::Empty {}))
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::{json, Value};

    use crate::http::{harden, router, SitePolicy};
    use crate::services::named::testing::*;

    fn item(k: &[u8], v: &[u8]) -> Value {
        json!({"key": b64(k), "value": b64(v)})
    }

    /// Every route, by name and ephemeral; a restarted control plane on the same store
    /// file has what was acknowledged.
    #[tokio::test]
    async fn dict_routes_round_trip_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let store = std::sync::Arc::new(flare_store::SqliteStore::open(&db).unwrap());
        let cp = crate::ControlPlane::new(store, dir.path()).unwrap();
        let api = harden(router(cp.clone()), &cp, SitePolicy::default());

        let (s, v) = call(&api, "POST", "/v1/dicts", Some(json!({"name": "cache"}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("cache"), "{v}");
        let (s, v) =
            call(&api, "POST", "/v1/dicts", Some(json!({"name": "cache", "create_if_missing": true}))).await;
        assert_eq!((s, &v["created"]), (StatusCode::OK, &json!(true)), "{v}");
        let id = v["dict_id"].as_str().unwrap().to_string();
        let (_, v) =
            call(&api, "POST", "/v1/dicts", Some(json!({"name": "cache", "create_if_missing": true}))).await;
        assert_eq!((v["dict_id"].as_str(), &v["created"]), (Some(id.as_str()), &json!(false)));
        let (s, _) = call(&api, "POST", "/v1/dicts", Some(json!({"name": "bad name"}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _) = call(&api, "POST", "/v1/dicts", Some(json!({"name": "x", "ephemeral": true}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);

        let p = |op: &str| format!("/v1/dicts/{id}/{op}");
        let (s, v) =
            call(&api, "POST", &p("put"), Some(json!({"items": [item(b"a", b"1"), item(b"b", b"2")]}))).await;
        assert_eq!((s, &v["written"]), (StatusCode::OK, &json!(2)), "{v}");
        let (_, v) = call(
            &api,
            "POST",
            &p("put"),
            Some(json!({"items": [item(b"a", b"9"), item(b"c", b"3"), item(b"c", b"4")], "skip_if_exists": true})),
        )
        .await;
        assert_eq!(v["written"], json!(1), "only c, once: {v}");
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"key": b64(b"a")}))).await;
        assert_eq!((&v["found"], unb64(&v["value"])), (&json!(true), b"1".to_vec()));
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"key": b64(b"c")}))).await;
        assert_eq!(unb64(&v["value"]), b"3");
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"key": b64(b"zz")}))).await;
        assert_eq!((&v["found"], v.get("value")), (&json!(false), None));
        let (_, v) = call(&api, "POST", &p("contains"), Some(json!({"key": b64(b"b")}))).await;
        assert_eq!(v["found"], json!(true));
        let (_, v) = call(&api, "GET", &p("len"), None).await;
        assert_eq!(v["len"], json!(3));
        let (_, v) = call(&api, "POST", &p("pop"), Some(json!({"key": b64(b"b")}))).await;
        assert_eq!((&v["found"], unb64(&v["value"])), (&json!(true), b"2".to_vec()));
        let (_, v) = call(&api, "POST", &p("pop"), Some(json!({"key": b64(b"b")}))).await;
        assert_eq!(v["found"], json!(false));

        // Pages in insertion order.
        let items: Vec<Value> = (0..5u8).map(|i| item(&[b'k', i], &[i])).collect();
        call(&api, "POST", &p("put"), Some(json!({ "items": items }))).await;
        let (mut keys, mut after) = (Vec::new(), 0i64);
        loop {
            let (s, v) = call(&api, "GET", &format!("{}?after={after}&limit=3", p("items")), None).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            for e in v["items"].as_array().unwrap() {
                keys.push(unb64(&e["key"]));
                assert!(e.get("value").is_some());
            }
            match v["next"].as_i64() {
                Some(n) => after = n,
                None => break,
            }
        }
        let want: Vec<Vec<u8>> =
            [b"a".to_vec(), b"c".to_vec()].into_iter().chain((0..5u8).map(|i| vec![b'k', i])).collect();
        assert_eq!(keys, want);
        let (_, v) = call(&api, "GET", &format!("{}?keys_only=true&limit=1000", p("items")), None).await;
        assert_eq!(v["items"].as_array().unwrap().len(), 7);
        assert!(v["items"][0].get("value").is_none() && v.get("next").is_none(), "{v}");

        // Limits: a key over 64 KiB is a 400 naming its size, a value over 16 MiB a 413.
        let big_key = vec![1u8; super::MAX_KEY_BYTES + 1];
        let (s, v) = call(&api, "POST", &p("get"), Some(json!({"key": b64(&big_key)}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("65537 bytes"), "{v}");
        let big_value = vec![1u8; super::MAX_VALUE_BYTES + 1];
        let (s, v) = call(&api, "POST", &p("put"), Some(json!({"items": [item(b"v", &big_value)]}))).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("16.0 MiB"), "{v}");
        let (_, v) = call(&api, "POST", &p("contains"), Some(json!({"key": b64(b"v")}))).await;
        assert_eq!(v["found"], json!(false), "nothing of a refused put is written");

        // Ephemeral dicts, listing, clear, delete.
        let (_, v) = call(&api, "POST", "/v1/dicts", Some(json!({"ephemeral": true}))).await;
        let eph = v["dict_id"].as_str().unwrap().to_string();
        assert_eq!((v["name"].as_str(), &v["ephemeral"]), (Some(""), &json!(true)));
        let (_, v) = call(&api, "GET", "/v1/dicts", None).await;
        let listed: Vec<(String, u64)> = v["dicts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["dict_id"].as_str().unwrap().to_string(), d["len"].as_u64().unwrap()))
            .collect();
        assert_eq!(listed, [(id.clone(), 7), (eph.clone(), 0)]);
        let (s, _) = call(&api, "DELETE", &format!("/v1/dicts/{eph}"), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&api, "GET", &format!("/v1/dicts/{eph}/len"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = call(&api, "POST", &format!("/v1/dicts/{eph}/put"), Some(json!({"items": []}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        drop(api);
        drop(cp);

        // What was acknowledged is in the store file.
        let store = std::sync::Arc::new(flare_store::SqliteStore::open(&db).unwrap());
        let cp = crate::ControlPlane::new(store, dir.path()).unwrap();
        let api = harden(router(cp.clone()), &cp, SitePolicy::default());
        let (_, v) = call(&api, "POST", "/v1/dicts", Some(json!({"name": "cache"}))).await;
        assert_eq!(v["dict_id"].as_str(), Some(id.as_str()));
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"key": b64(&[b'k', 4])}))).await;
        assert_eq!(unb64(&v["value"]), [4]);
        let (s, _) = call(&api, "POST", &p("clear"), Some(json!({}))).await;
        assert_eq!(s, StatusCode::OK);
        let (_, v) = call(&api, "GET", &p("len"), None).await;
        assert_eq!(v["len"], json!(0));
        let (s, _) = call(&api, "DELETE", &format!("/v1/dicts/{id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&api, "POST", "/v1/dicts", Some(json!({"name": "cache"}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}
