//! The management HTTP server (feature `management`): `GET /health`, and with the `bindings`
//! endpoint on, `GET /bindings`, `GET /bindings/{name}` and `POST /bindings/{name}`; with the
//! `metrics` endpoint (and feature), `GET /metrics` in Prometheus' text format; with the
//! `asyncapi` endpoint (and feature), `GET /asyncapi.json`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Endpoint, ManagementSettings};
use crate::runtime::Controls;
use crate::Error;

/// How long requests under way may take to finish once the application shuts down.
const FINISH_REQUESTS_WITHIN: Duration = Duration::from_secs(1);

/// A running management server.
#[derive(Debug)]
pub(crate) struct ManagementServer {
    pub(crate) address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ManagementServer {
    /// Stops listening; requests under way get a moment to finish.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if tokio::time::timeout(FINISH_REQUESTS_WITHIN, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            (&mut self.task).await.ok();
        }
    }
}

impl Drop for ManagementServer {
    /// An application dropped without a shutdown keeps no port open.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The port taken, and with `/metrics`, the recorder installed: what the server needs before
/// any binding registers its meters.
#[derive(Debug)]
pub(crate) struct Prepared {
    listener: std::net::TcpListener,
    #[cfg(feature = "metrics")]
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    #[cfg(feature = "asyncapi")]
    pub(crate) asyncapi: Option<Value>,
}

/// Takes the management port and installs the Prometheus recorder, or says why not.
pub(crate) fn prepare(settings: &ManagementSettings) -> Result<Prepared, Error> {
    let listener = listen(settings)?;
    #[cfg(feature = "metrics")]
    let prometheus = match settings.serves(Endpoint::Metrics) {
        true => Some(crate::runtime::prometheus().map_err(|why| Error::Management {
            message: format!(
                "cannot serve `/metrics`: {why}; remove \"metrics\" from `management.endpoints` in {}",
                settings.origin
            ),
        })?),
        false => None,
    };
    Ok(Prepared {
        listener,
        #[cfg(feature = "metrics")]
        prometheus,
        #[cfg(feature = "asyncapi")]
        asyncapi: None,
    })
}

/// How often histograms are folded into their buckets when nobody scrapes.
#[cfg(feature = "metrics")]
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Takes the management port, or says why not.
fn listen(settings: &ManagementSettings) -> Result<std::net::TcpListener, Error> {
    let address = SocketAddr::new(settings.address, settings.port);
    let fail = |e: std::io::Error| {
        Error::Management {
        message: format!(
            "could not listen on {address}: {e}; set another `management.port` (or `management.address`) in {}",
            settings.origin
        ),
    }
    };
    let listener = std::net::TcpListener::bind(address).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    Ok(listener)
}

/// Serves the configured endpoints on `listener` until stopped.
pub(crate) fn serve(
    prepared: Prepared,
    settings: &ManagementSettings,
    controls: Controls,
) -> Result<ManagementServer, Error> {
    let listener = prepared.listener;
    let fail = |e: std::io::Error| Error::Management {
        message: format!("could not serve the management endpoints: {e}"),
    };
    let address = listener.local_addr().map_err(fail)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(fail)?;
    let mut router = Router::new();
    if settings.serves(Endpoint::Health) {
        router = router.route("/health", get(health));
    }
    if settings.serves(Endpoint::Bindings) {
        router = router
            .route("/bindings", get(bindings))
            .route("/bindings/{name}", get(binding).post(change_binding));
    }
    #[cfg(feature = "metrics")]
    let prometheus = prepared.prometheus;
    #[cfg(feature = "metrics")]
    if let Some(prometheus) = prometheus.clone() {
        router = router.route(
            "/metrics",
            get(move |State(controls): State<Controls>| {
                let prometheus = prometheus.clone();
                async move {
                    let lags = controls.lags().await;
                    for status in controls.bindings() {
                        if let Some(lag) = lags.get(&status.binding.name) {
                            crate::runtime::record_lag(&status.binding, *lag);
                        }
                    }
                    prometheus.run_upkeep();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        prometheus.render(),
                    )
                }
            }),
        );
    }
    #[cfg(feature = "asyncapi")]
    if let (true, Some(document)) = (settings.serves(Endpoint::AsyncApi), prepared.asyncapi) {
        let document = std::sync::Arc::new(document);
        router = router.route(
            "/asyncapi.json",
            get(move || {
                let document = document.clone();
                async move { Json((*document).clone()) }
            }),
        );
    }
    let router = router.with_state(controls);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serving = axum::serve(listener, router).with_graceful_shutdown(async {
            stopped.await.ok();
        });
        // Histogram samples pile up until folded into buckets: fold them now and then, even
        // when nobody scrapes.
        let upkeep = async {
            #[cfg(feature = "metrics")]
            if let Some(prometheus) = &prometheus {
                loop {
                    tokio::time::sleep(UPKEEP_EVERY).await;
                    prometheus.run_upkeep();
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            served = serving => if let Err(error) = served {
                tracing::error!(%error, "the management server stopped");
            },
            () = upkeep => {}
        }
    });
    tracing::info!(%address, "management server listening");
    Ok(ManagementServer {
        address,
        stop: Some(stop),
        task,
    })
}

async fn health(State(controls): State<Controls>) -> Response {
    let health = controls.health().await;
    let status = match health.is_up() {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(health.to_json())).into_response()
}

async fn bindings(State(controls): State<Controls>) -> Json<Value> {
    Json(Value::Array(
        controls.bindings().iter().map(|b| b.to_json()).collect(),
    ))
}

async fn binding(State(controls): State<Controls>, Path(name): Path<String>) -> Response {
    match controls.binding(&name) {
        Some(binding) => Json(binding.to_json()).into_response(),
        None => unknown(&controls, &name),
    }
}

/// `{"state": "STOPPED" | "STARTED" | "PAUSED" | "RESUMED"}`, as Spring's bindings endpoint.
async fn change_binding(
    State(controls): State<Controls>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(binding) = controls.binding(&name) else {
        return unknown(&controls, &name);
    };
    if !binding.binding.input {
        return problem(
            StatusCode::BAD_REQUEST,
            format!(
                "binding `{name}` is an output: only input bindings stop, start, pause and resume"
            ),
        );
    }
    let wanted = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|body| body.get("state").and_then(Value::as_str).map(str::to_owned));
    let changed = match wanted.as_deref() {
        Some("STOPPED") => controls.stop_binding(&name).await,
        Some("STARTED") => controls.start_binding(&name).await,
        Some("PAUSED") => controls.pause_binding(&name).await,
        Some("RESUMED") => controls.resume_binding(&name).await,
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                r#"expected a body such as {"state": "PAUSED"}, with one of STOPPED, STARTED, PAUSED, RESUMED"#.to_owned(),
            )
        }
    };
    match changed {
        Ok(()) => match controls.binding(&name) {
            Some(binding) => Json(binding.to_json()).into_response(),
            None => unknown(&controls, &name),
        },
        Err(error) => problem(StatusCode::CONFLICT, error.to_string()),
    }
}

fn unknown(controls: &Controls, name: &str) -> Response {
    let names: Vec<String> = controls
        .bindings()
        .into_iter()
        .map(|b| b.binding.name)
        .collect();
    problem(
        StatusCode::NOT_FOUND,
        format!(
            "no binding is named `{name}`; the bindings are: {}",
            names.join(", ")
        ),
    )
}

fn problem(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}
