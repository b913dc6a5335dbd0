//! The HTTP API (warp): interactive queries, `/metrics`, health, the OpenAPI document and
//! the live screen.
//!
//! | route                                   | answer                                          |
//! |-----------------------------------------|-------------------------------------------------|
//! | `GET /api/v1/metrics`                   | every metric and derived metric                 |
//! | `GET /api/v1/metrics/{name}`            | rows per window and key (`key`, `from`, `to`, `limit`) |
//! | `GET /api/v1/metrics/{name}/span`       | one merged value per key over a span (`from`/`to` or `last`) |
//! | `GET /api/v1/metrics/{name}/top`        | top keys in a window (`n`, `at`, `aggregate`)   |
//! | `GET /openapi.json`                     | the API description                             |
//! | `GET /metrics`                          | Prometheus exposition                           |
//! | `GET /health`, `GET /ready`             | liveness; readiness (partitions assigned)       |
//! | `GET /`                                 | the live screen                                 |
//!
//! Errors are JSON `{"error": "...", "status": N}` with 400 for bad parameters, 401 without
//! the bearer token (`http.token`), 404 for unknown metrics or routes, 405 (with `Allow`) for
//! another method on a route's path, 409 for a refused metric, 410 for a span or top list
//! past a metric's retention, 414 for a query string over 8 KiB, 503 for partitions (or, at
//! start, brokers) not answering, and 503 with `Retry-After` for a query shed because the
//! replica has as many running and waiting as it takes ([`admission`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::config::parse_duration_ms;
use crate::health::Faults;
use crate::metrics::Metrics;
use crate::ownership::Ownership;
use crate::query::fetch::{self, FetchRequest, LocalFetch, Unavailable};
use crate::query::{parse_time, Ask, QueryEngine, QueryError, Range};
use crate::secret::{self, Secret};

/// The OpenAPI 3 description of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The live screen, served at `/`: one self-contained page, no external assets.
pub const SCREEN: &str = include_str!("screen.html");

/// Default and maximum number of rows per answer.
const DEFAULT_LIMIT: usize = 10_000;

pub mod admission;

pub use admission::{Admission, Admissions, Shed};

/// What the HTTP layer reads.
#[derive(Clone)]
pub struct ApiState {
    /// Answers queries (over the whole cluster).
    pub engine: QueryEngine,
    /// Reads this replica's partitions for the other replicas (`/internal/v1/partials`).
    pub local: LocalFetch,
    /// Exported metrics.
    pub metrics: Metrics,
    /// The partitions this replica owns; readiness.
    pub owned: Arc<Ownership>,
    /// The global tables: ready once loaded.
    pub tables: Arc<crate::table::Tables>,
    /// Exported metrics whose value could not be read at the last scrape (logged once per
    /// failing stretch: while partitions move, every scrape would fail again).
    pub export_failing: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// What fails now (brokers, flushes): shown by `/ready`.
    pub faults: Arc<Faults>,
    /// Who may ask what.
    pub access: Arc<Access>,
    /// How many queries run and wait at once.
    pub admission: Arc<Admissions>,
}

/// Who may ask what: the bearer token every request carries, but those to the open routes.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `None`: no authentication.
    pub token: Option<Secret>,
    /// Routes that need no token (see [`crate::config::HttpConfig::open`]).
    pub open: Vec<String>,
}

/// The longest query string taken (longer: 414).
const MAX_QUERY_BYTES: usize = 8 << 10;

/// Why a request was turned away before its route.
#[derive(Debug)]
enum Refused {
    /// No token, or another one.
    Unauthorized,
    /// A query string over [`MAX_QUERY_BYTES`].
    TooLong,
}

impl warp::reject::Reject for Refused {}

impl Access {
    /// From the HTTP config.
    pub fn of(http: &crate::config::HttpConfig) -> Access {
        Access { token: http.token.clone(), open: http.open.clone() }
    }

    fn allows(&self, path: &str, authorization: Option<&str>) -> bool {
        let Some(token) = &self.token else { return true };
        if self.open.iter().any(|o| o == path) {
            return true;
        }
        let given = authorization.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
        secret::same(given.as_bytes(), token.expose().as_bytes())
    }

    /// Passes the requests this access allows; turns the others away (see [`refusal`]).
    fn guard(self: Arc<Self>) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
        let query = warp::query::raw().or(warp::any().map(String::new)).unify();
        warp::path::full()
            .and(warp::header::optional::<String>("authorization"))
            .and(query)
            .and_then(move |path: warp::path::FullPath, auth: Option<String>, query: String| {
                let access = Arc::clone(&self);
                async move {
                    if query.len() > MAX_QUERY_BYTES {
                        return Err(warp::reject::custom(Refused::TooLong));
                    }
                    match access.allows(path.as_str(), auth.as_deref()) {
                        true => Ok(()),
                        false => Err(warp::reject::custom(Refused::Unauthorized)),
                    }
                }
            })
            .untuple_one()
    }
}

/// The methods a route path takes, if it is one.
fn methods_of(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["internal", "v1", "partials"] => Some("POST"),
        [""] | ["openapi.json"] | ["metrics"] | ["health"] | ["ready"] | ["api", "v1", "metrics"] => Some("GET"),
        ["api", "v1", "metrics", name] | ["api", "v1", "metrics", name, "span" | "top"] if !name.is_empty() => Some("GET"),
        _ => None,
    }
}

/// The answer to a request no route took: 405 with `Allow` on a route's path (another
/// method), else 404.
fn unrouted(path: &str) -> Response {
    match methods_of(path) {
        Some(allow) => {
            warp::reply::with_header(error(StatusCode::METHOD_NOT_ALLOWED, format!("this route takes {allow}")), "allow", allow).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such route; see /openapi.json"),
    }
}

/// The answer to a request turned away or routed nowhere.
fn refusal(rej: &warp::Rejection) -> Response {
    match rej.find::<Refused>() {
        Some(Refused::Unauthorized) => warp::reply::with_header(
            error(StatusCode::UNAUTHORIZED, "this route needs the bearer token (Authorization: Bearer …); see http.token"),
            "www-authenticate",
            "Bearer",
        )
        .into_response(),
        Some(Refused::TooLong) => error(StatusCode::URI_TOO_LONG, format!("the query string is over {MAX_QUERY_BYTES} bytes")),
        None => error(StatusCode::NOT_FOUND, "no such route; see /openapi.json"),
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let body = json!({ "error": msg.into(), "status": status.as_u16() });
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn query_reply(r: Result<serde_json::Value, QueryError>) -> Response {
    match r {
        Ok(v) => warp::reply::json(&v).into_response(),
        Err(e @ QueryError::UnknownMetric(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ QueryError::BadParam { .. }) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ QueryError::Expired { .. }) => error(StatusCode::GONE, e.to_string()),
        Err(e @ QueryError::Refused(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(ref e @ QueryError::Unavailable { ref missing, .. }) => {
            let list: Vec<serde_json::Value> =
                missing.iter().map(|(p, why)| json!({ "partition": p, "reason": why.reason(), "detail": why.to_string() })).collect();
            let mut body = json!({ "error": e.to_string(), "status": 503, "missing": list });
            let restoring: Vec<(i32, u64, u64)> = missing
                .iter()
                .filter_map(|(p, why)| match why {
                    Unavailable::Restoring { restored, total } => Some((*p, *restored, *total)),
                    _ => None,
                })
                .collect();
            if !restoring.is_empty() {
                body["restoring"] = json!({
                    "partitions": restoring.iter().map(|r| r.0).collect::<Vec<_>>(),
                    "restored": restoring.iter().map(|r| r.1).sum::<u64>(),
                    "total": restoring.iter().map(|r| r.2).sum::<u64>(),
                });
            }
            warp::reply::with_header(warp::reply::with_status(warp::reply::json(&body), StatusCode::SERVICE_UNAVAILABLE), "retry-after", "1")
                .into_response()
        }
        Err(e @ QueryError::Store(_)) => {
            tracing::error!(error = %e, "query failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

type Params = HashMap<String, String>;

fn check_params(p: &Params, allowed: &[&str]) -> Result<(), QueryError> {
    match p.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(QueryError::BadParam { param: "query", why: format!("unknown parameter `{k}`; allowed: {allowed:?}") }),
    }
}

fn range(p: &Params) -> Result<Range, QueryError> {
    let from = p.get("from").map(|v| parse_time("from", v)).transpose()?;
    let to = p.get("to").map(|v| parse_time("to", v)).transpose()?;
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(QueryError::BadParam { param: "to", why: format!("`to` ({t}) must be after `from` ({f})") });
        }
    }
    Ok(Range { from, to })
}

fn number(p: &Params, param: &'static str, default: usize, max: usize) -> Result<usize, QueryError> {
    match p.get(param) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| QueryError::BadParam { param, why: format!("`{v}` must be a whole number in 1..={max}") }),
    }
}

/// `sketch=canonical` adds each distinct aggregate's canonical sketch encoding (hex).
fn sketches(p: &Params) -> Result<bool, QueryError> {
    match p.get("sketch").map(String::as_str) {
        None => Ok(false),
        Some("canonical") => Ok(true),
        Some(other) => Err(QueryError::BadParam { param: "sketch", why: format!("`{other}`: the only encoding is `canonical`") }),
    }
}

/// Parameters every query takes: `partial=true` answers from the partitions that can be,
/// marked incomplete; `min_position` (a token) answers only from state at or past it.
const ASK_PARAMS: [&str; 2] = ["partial", "min_position"];

fn ask(p: &Params) -> Result<Ask, QueryError> {
    let partial = match p.get("partial").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(QueryError::BadParam { param: "partial", why: format!("`{other}`: give `true` or `false`") }),
    };
    Ok(Ask { partial, min_position: p.get("min_position").cloned() })
}

fn allowed<'a>(own: &[&'a str]) -> Vec<&'a str> {
    own.iter().copied().chain(ASK_PARAMS).collect()
}

fn windows(engine: &QueryEngine, name: &str, p: &Params) -> Result<serde_json::Value, QueryError> {
    check_params(p, &allowed(&["key", "from", "to", "limit", "sketch"]))?;
    engine.windows(name, p.get("key").map(String::as_str), range(p)?, number(p, "limit", DEFAULT_LIMIT, DEFAULT_LIMIT)?, sketches(p)?, &ask(p)?)
}

fn span(engine: &QueryEngine, name: &str, p: &Params) -> Result<serde_json::Value, QueryError> {
    check_params(p, &allowed(&["key", "from", "to", "last", "sketch"]))?;
    let last = p
        .get("last")
        .map(|v| match parse_duration_ms(v) {
            Ok(ms) if ms <= crate::event::time::MAX_TIME_MS => Ok(ms),
            Ok(_) => Err(QueryError::BadParam { param: "last", why: format!("`{v}` is longer than event times reach") }),
            Err(why) => Err(QueryError::BadParam { param: "last", why }),
        })
        .transpose()?;
    if last.is_some() && (p.contains_key("from") || p.contains_key("to")) {
        return Err(QueryError::BadParam { param: "last", why: "give either `last` or `from`/`to`, not both".into() });
    }
    engine.span(name, p.get("key").map(String::as_str), range(p)?, last, sketches(p)?, &ask(p)?)
}

fn top(engine: &QueryEngine, name: &str, p: &Params) -> Result<serde_json::Value, QueryError> {
    check_params(p, &allowed(&["n", "at", "aggregate"]))?;
    let at = p.get("at").map(|v| parse_time("at", v)).transpose()?;
    engine.top(name, number(p, "n", 10, 10_000)?, at, p.get("aggregate").map(String::as_str), &ask(p)?)
}

/// `POST /internal/v1/partials`: another replica asks for this one's partials (wire format
/// of [`crate::query::fetch`]). A body that does not decode is a 400, never a panic.
fn partials(local: &LocalFetch, body: &[u8]) -> Response {
    let req: FetchRequest = match fetch::decode(body) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, format!("undecodable partials request: {why}")),
    };
    match local.read(&req) {
        Ok(replies) => warp::reply::with_header(fetch::encode(&replies), "content-type", "application/octet-stream").into_response(),
        Err(e @ QueryError::BadParam { .. }) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => {
            tracing::error!(error = %e, "reading partials for another replica failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// Refreshes `tally_metric_value` for the exported metrics, just before a scrape renders.
fn export_values(s: &ApiState) {
    let mut failing = s.export_failing.lock().unwrap_or_else(|e| e.into_inner());
    for name in s.engine.exported() {
        match s.engine.current_values(name) {
            Ok(values) => {
                for (aggregate, v) in values {
                    s.metrics.metric_value.with_label_values(&[name, &aggregate]).set(v);
                }
                if failing.remove(name) {
                    tracing::info!(metric = %name, "exporting the metric's value again");
                }
            }
            Err(e) if failing.insert(name.clone()) => {
                tracing::warn!(metric = %name, error = %e, "could not export metric value (not logged again until it can be)")
            }
            Err(e) => tracing::debug!(metric = %name, error = %e, "could not export metric value"),
        }
    }
}

/// Runs a query off the async threads: queries scan sled and merge sketches.
async fn blocking(f: impl FnOnce() -> Response + Send + 'static) -> Result<Response, Infallible> {
    Ok(tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("query panicked: {e}"))))
}

/// [`blocking`], once `pool` has a slot for it (held until it has run); a 503 with
/// `Retry-After` when the pool sheds it.
async fn admitted(pool: &Admission, f: impl FnOnce() -> Response + Send + 'static) -> Result<Response, Infallible> {
    match pool.admit().await {
        Ok(slot) => {
            blocking(move || {
                let _slot = slot;
                f()
            })
            .await
        }
        Err(shed) => Ok(warp::reply::with_header(error(StatusCode::SERVICE_UNAVAILABLE, shed.to_string()), "retry-after", "1").into_response()),
    }
}

/// Every route, instrumented.
pub fn routes(state: ApiState) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with = {
        let s = state.clone();
        warp::any().map(move || s.clone())
    };
    let api = warp::path!("api" / "v1" / "metrics" / ..);
    let list = api
        .and(warp::path::end())
        .and(with.clone())
        .map(|s: ApiState| warp::reply::json(&s.engine.list()).into_response())
        .map(|r| ("metrics_list", r));
    // `/api/v1/metrics/{name}`, `/{name}/span`, `/{name}/top`: one filter, dispatched on
    // the last segment.
    let query = api.and(warp::path::param::<String>()).and(warp::path::tail()).and(warp::query::<Params>()).and(with.clone()).and_then(
        |name: String, tail: warp::path::Tail, p: Params, s: ApiState| async move {
            type Query = fn(&QueryEngine, &str, &Params) -> Result<serde_json::Value, QueryError>;
            let (route, run): (&'static str, Query) = match tail.as_str() {
                "" => ("metric_windows", windows),
                "span" => ("metric_span", span),
                "top" => ("metric_top", top),
                _ => return Err(warp::reject::not_found()),
            };
            let admission = Arc::clone(&s.admission);
            Ok((route, admitted(&admission.queries, move || query_reply(run(&s.engine, &name, &p))).await.unwrap_or_else(|e| match e {})))
        },
    );
    let prom = warp::path!("metrics").and(with.clone()).and_then(|s: ApiState| {
        blocking(move || {
            export_values(&s);
            for m in s.local.refusals().all().keys() {
                s.metrics.metric_refused.with_label_values(&[m]).set(1);
            }
            warp::reply::with_header(s.metrics.render(), "content-type", "text/plain; version=0.0.4").into_response()
        })
    });
    let prom = prom.map(|r| ("prometheus", r));
    let openapi = warp::path!("openapi.json")
        .map(|| warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response())
        .map(|r| ("openapi", r));
    // Liveness: 503 once only a restart mends the replica (a supervisor then restarts it).
    let health = warp::path!("health")
        .and(with.clone())
        .map(|s: ApiState| match s.faults.restart_needed() {
            None => warp::reply::json(&json!({ "status": "ok" })).into_response(),
            Some(why) => warp::reply::with_status(warp::reply::json(&json!({ "status": "restart", "why": why })), StatusCode::SERVICE_UNAVAILABLE)
                .into_response(),
        })
        .map(|r| ("health", r));
    let ready = warp::path!("ready").and(with.clone()).map(|s: ApiState| {
        let loaded = s.tables.loaded();
        let ready = s.owned.ready() && loaded && !s.faults.failing(crate::health::Link::Disk);
        let (owned, restoring) = s.owned.counts();
        let standbys = s.owned.standbys();
        let queryable = standbys.iter().filter(|(_, c)| c.queryable).count();
        let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let tables: Vec<_> = s
            .tables
            .names()
            .iter()
            .zip(s.tables.metas())
            .map(|(name, m)| json!({ "name": name, "entries": m.entries, "position": m.next }))
            .collect();
        // A failing broker or flush leaves the replica ready: it still answers from its state
        // (as of its last flush, which the answers' positions say), and taking it out of
        // service would leave nobody to answer for its partitions.
        let body = json!({
            "ready": ready,
            "faults": s.faults.current(),
            "partitions": owned,
            "restoring": restoring,
            "standbys": standbys.len(),
            "standbys_queryable": queryable,
            // How far behind the changelog the furthest copy is, in records.
            "standby_lag_max": standbys.iter().map(|(_, c)| c.lag).max(),
            "tables_loaded": loaded,
            "tables": tables,
            "refused": s.local.refusals().all(),
        });
        warp::reply::with_status(warp::reply::json(&body), code).into_response()
    });
    let ready = ready.map(|r| ("ready", r));
    let screen = warp::path::end().map(|| warp::reply::html(SCREEN).into_response()).map(|r| ("screen", r));
    let internal = warp::post()
        .and(warp::path!("internal" / "v1" / "partials"))
        .and(warp::body::content_length_limit(fetch::MAX_WIRE_BYTES as u64))
        .and(warp::body::bytes())
        .and(with.clone())
        .and_then(|body: bytes::Bytes, s: ApiState| async move {
            let admission = Arc::clone(&s.admission);
            admitted(&admission.partials, move || partials(&s.local, &body)).await
        })
        .map(|r| ("internal_partials", r));

    let any = list.or(query).unify().or(prom).unify().or(openapi).unify().or(health).unify().or(ready).unify().or(screen).unify();
    let unrouted = warp::path::full().map(|path: warp::path::FullPath| ("unrouted", unrouted(path.as_str())));
    let get = warp::get().and(any).or(internal).unify().or(unrouted).unify();
    let metrics = state.metrics.clone();
    warp::any()
        .map(Instant::now)
        .and(Arc::clone(&state.access).guard())
        .and(get)
        .map(move |start: Instant, (route, resp): (&'static str, Response)| {
            let status = resp.status();
            metrics.http_requests.with_label_values(&[route, status.as_str()]).inc();
            metrics.http_duration.with_label_values(&[route]).observe(start.elapsed().as_secs_f64());
            resp
        })
        .recover(move |rej: warp::Rejection| async move { Ok::<_, Infallible>(refusal(&rej)) })
        .unify()
}

/// The routes served while tally waits for the brokers at start: `/health` (up), `/ready`
/// (503, with what is awaited), `/metrics` and `/openapi.json`; anything else is a 503
/// saying why.
pub fn starting_routes(metrics: Metrics, faults: Arc<Faults>, access: Arc<Access>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let health = warp::path!("health").map(|| warp::reply::json(&json!({ "status": "ok" })).into_response());
    let ready = {
        let faults = Arc::clone(&faults);
        warp::path!("ready").map(move || {
            let body = json!({ "ready": false, "starting": true, "faults": faults.current() });
            warp::reply::with_status(warp::reply::json(&body), StatusCode::SERVICE_UNAVAILABLE).into_response()
        })
    };
    let prom =
        warp::path!("metrics").map(move || warp::reply::with_header(metrics.render(), "content-type", "text/plain; version=0.0.4").into_response());
    let openapi = warp::path!("openapi.json").map(|| warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response());
    let rest = warp::any().map(move || {
        let why = faults.current().first().map_or_else(|| "starting".to_string(), |f| f.detail.clone());
        let body = json!({ "error": format!("tally is starting: waiting for the brokers ({why})"), "status": 503, "starting": true });
        let resp = warp::reply::with_status(warp::reply::json(&body), StatusCode::SERVICE_UNAVAILABLE);
        warp::reply::with_header(resp, "retry-after", "1").into_response()
    });
    access
        .guard()
        .and(warp::get().and(health.or(ready).unify().or(prom).unify().or(openapi).unify()).or(rest).unify())
        .recover(|rej: warp::Rejection| async move { Ok::<_, Infallible>(refusal(&rej)) })
        .unify()
}

/// Serves [`starting_routes`] on `listener` until `shutdown` resolves.
pub fn serve_starting(
    metrics: Metrics,
    faults: Arc<Faults>,
    access: Arc<Access>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> {
    warp::serve(starting_routes(metrics, faults, access)).incoming(listener).graceful(shutdown).run()
}

/// Serves on `listener` until `shutdown` resolves.
pub fn serve(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> {
    warp::serve(routes(state)).incoming(listener).graceful(shutdown).run()
}
