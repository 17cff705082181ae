//! Health over the management server while RabbitMQ closes the application's connections and
//! refuses new ones, and after it lets them in again. The test runs in a virtual host of its
//! own, since it limits that host's connections to none for a while.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bindery_core::testing::{host_port, isolated, require_broker};
use bindery_core::{Binder, Message, ProducerSpec, RunningApplication, StreamFunction};
use bindery_rabbit::{RabbitBinder, RabbitBinderProvider};
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

mod common;
use common::{can_control_server, rabbitmqctl, uri};

/// A virtual host made for one test, deleted when dropped.
struct OwnVhost {
    name: String,
}

impl OwnVhost {
    async fn create() -> Self {
        let name = format!(
            "bindery-health-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        rabbitmqctl(&["add_vhost", &name]).await;
        let vhost = OwnVhost { name };
        let user = user_of(&uri());
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &user,
            ".*",
            ".*",
            ".*",
        ])
        .await;
        vhost
    }

    /// `RABBIT_URI`, on this virtual host.
    fn uri(&self) -> String {
        let uri = uri();
        let (scheme, rest) = uri.split_once("://").expect("an amqp:// URI");
        let authority = rest.split('/').next().unwrap_or(rest);
        format!("{scheme}://{authority}/{}", self.name)
    }

    /// Closes every connection to this virtual host from the server's side; how many it closed.
    async fn close_connections(&self) -> usize {
        let listed = rabbitmqctl(&["list_connections", "--no-table-headers", "pid", "vhost"]).await;
        let pids: Vec<String> = listed
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(_, vhost)| vhost.trim() == self.name)
            .map(|(pid, _)| pid.to_owned())
            .collect();
        for pid in &pids {
            rabbitmqctl(&["close_connection", pid, "closed by a bindery test"]).await;
        }
        pids.len()
    }
}

impl Drop for OwnVhost {
    fn drop(&mut self) {
        // `timeout`, so that a server that does not answer cannot hang the test run.
        let _ = std::process::Command::new("timeout")
            .args(["30", "rabbitmqctl", "-q", "delete_vhost", &self.name])
            .status();
    }
}

fn user_of(uri: &str) -> String {
    uri.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(credentials, _)| credentials.split(':').next())
        .unwrap_or("guest")
        .to_owned()
}

async fn health(app: &RunningApplication) -> (u16, Value) {
    let address = app
        .management_address()
        .expect("the management server runs");
    let asked = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
        .get(format!("http://{address}/health"))
        .send()
        .await;
    match asked {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(error) => panic!("GET /health failed: {error}"),
    }
}

/// Asks for health until `wanted` holds, within `within`; the last answer.
async fn health_until(
    app: &RunningApplication,
    what: &str,
    within: Duration,
    wanted: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = health(app).await;
        if wanted(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; the last answer was {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_down_with_503_while_rabbitmq_refuses_connections_and_up_once_it_lets_them_in() {
    common::within_test_deadline(async {
        if !require_broker("RabbitMQ", &host_port(&uri(), 5672)) || !can_control_server() {
            return;
        }
        let vhost = OwnVhost::create().await;
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = StreamFunction::consumer("sink", {
            let seen = seen.clone();
            move |text: String| {
                let seen = seen.clone();
                async move { seen.lock().unwrap().push(text) }
            }
        });
        let toml = format!(
            r#"[management]
address = "127.0.0.1"
port = 0
[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
type = "rabbit"
uri = "{uri}"
connection-timeout = "2s"
[stream.bindings.sink-in-0]
destination = "health-in"
group = "g"
"#,
            uri = vhost.uri()
        );
        let app = isolated(sink, &toml)
            .binder_provider(RabbitBinderProvider)
            .build()
            .expect("configuration")
            .start()
            .await
            .expect("start");

        let (status, up) = health(&app).await;
        assert_eq!(status, 200, "{up}");
        let rabbit = &up["components"]["binders"]["components"]["rabbit"];
        assert_eq!(rabbit["status"], "UP", "{up}");
        assert!(
            !rabbit["details"]["uri"]
                .as_str()
                .unwrap_or("")
                .contains(":guest@"),
            "the password shows: {up}"
        );

        rabbitmqctl(&[
            "set_vhost_limits",
            "-p",
            &vhost.name,
            r#"{"max-connections": 0}"#,
        ])
        .await;
        assert!(
            vhost.close_connections().await >= 1,
            "the application had no connection to close"
        );
        let down = health_until(
            &app,
            "health is DOWN",
            Duration::from_secs(30),
            |status, _| status == 503,
        )
        .await;
        let rabbit = &down["components"]["binders"]["components"]["rabbit"];
        assert_eq!(rabbit["status"], "DOWN", "{down}");
        let error = rabbit["details"]["error"].as_str().unwrap_or("");
        assert!(
            error.contains("not reachable") && !error.contains(":guest@"),
            "{down}"
        );

        rabbitmqctl(&["clear_vhost_limits", "-p", &vhost.name]).await;
        let up = health_until(
            &app,
            "health is UP again",
            Duration::from_secs(60),
            |status, _| status == 200,
        )
        .await;
        assert_eq!(
            up["components"]["bindings"]["components"]["sink-in-0"]["status"], "UP",
            "the binding outlived the refusals: {up}"
        );

        // The binding consumes again once its subscription has reconnected.
        let sender = RabbitBinder::connect_uri(&vhost.uri())
            .await
            .expect("connect");
        let producer = sender
            .producer(&ProducerSpec::new("health-in"))
            .await
            .expect("producer");
        producer
            .send(Message::new(Bytes::from_static(b"after the refusals")))
            .await
            .expect("send");
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the binding did not consume after RabbitMQ let it in again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(*seen.lock().unwrap(), vec!["after the refusals".to_owned()]);
        sender.close().await.ok();
        app.shutdown().await.expect("shutdown");
    })
    .await
}
