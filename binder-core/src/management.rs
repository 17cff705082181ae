//! The management HTTP server (feature `management`): `GET /health`, and with the `bindings`
//! endpoint on, `GET /bindings`, `GET /bindings/{name}` and `POST /bindings/{name}`.

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
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ManagementServer {
    /// Stops listening; requests under way get a moment to finish.
    pub(crate) async fn stop(self) {
        self.stop.send(()).ok();
        let mut task = self.task;
        if tokio::time::timeout(FINISH_REQUESTS_WITHIN, &mut task)
            .await
            .is_err()
        {
            task.abort();
            task.await.ok();
        }
    }
}

/// Takes the management port, or says why not.
pub(crate) fn listen(settings: &ManagementSettings) -> Result<std::net::TcpListener, Error> {
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
    listener: std::net::TcpListener,
    settings: &ManagementSettings,
    controls: Controls,
) -> Result<ManagementServer, Error> {
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
    let router = router.with_state(controls);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the management server stopped");
        }
    });
    tracing::info!(%address, "management server listening");
    Ok(ManagementServer {
        address,
        stop,
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
