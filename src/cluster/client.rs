//! The HTTP client replicas ask each other's partials with: pooled keep-alive connections,
//! a timeout per call and one retry of a connection that failed before answering.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::query::fetch::{self, FetchRequest, PartitionReply};
use crate::secret::Secret;

/// Why a peer gave no partials.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("{0}")]
    Connect(String),
    /// It answered, but not with partials (its body is not passed on: it is another
    /// process's text).
    #[error("answered HTTP {status}")]
    Refused {
        /// HTTP status.
        status: u16,
    },
    /// Its answer did not decode.
    #[error("undecodable answer: {0}")]
    Garbled(String),
}

/// A pooled client to the other replicas' `/internal/v1/partials`.
#[derive(Clone)]
pub struct PeerClient {
    http: Client<HttpConnector, Full<Bytes>>,
    /// The bearer token every replica of the cluster takes (`http.token`).
    token: Option<Secret>,
}

impl Default for PeerClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        PeerClient { http: Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector), token: None }
    }
}

impl PeerClient {
    /// The same, sending `token` as the bearer token of every call.
    pub fn authenticated(self, token: Option<Secret>) -> PeerClient {
        PeerClient { token, ..self }
    }

    /// Asks the replica at `url` for `req`'s partials, within `timeout`.
    pub async fn partials(&self, url: &str, req: &FetchRequest, timeout: Duration) -> Result<Vec<PartitionReply>, PeerError> {
        let body = Bytes::from(fetch::encode(req));
        let call = async {
            // A pooled connection the peer closed meanwhile fails before any answer: once more.
            match self.call(url, body.clone()).await {
                Err(PeerError::Connect(_)) => self.call(url, body).await,
                other => other,
            }
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| PeerError::Timeout(timeout))?
    }

    async fn call(&self, url: &str, body: Bytes) -> Result<Vec<PartitionReply>, PeerError> {
        let mut request = hyper::Request::post(format!("{url}/internal/v1/partials")).header("content-type", "application/octet-stream");
        if let Some(t) = &self.token {
            request = request.header("authorization", format!("Bearer {}", t.expose()));
        }
        let request = request.body(Full::new(body)).map_err(|e| PeerError::Connect(format!("bad peer URL `{url}`: {e}")))?;
        let response = self.http.request(request).await.map_err(|e| PeerError::Connect(e.to_string()))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(PeerError::Refused { status });
        }
        // Bounded: a peer's answer is decoded within the same limit as a request.
        let body = http_body_util::Limited::new(response.into_body(), fetch::MAX_WIRE_BYTES);
        let bytes = body.collect().await.map_err(|e| PeerError::Garbled(e.to_string()))?.to_bytes();
        fetch::decode(&bytes).map_err(PeerError::Garbled)
    }
}
