//! Health over the management server when the Kafka broker goes away at runtime. The test
//! starts a private Tansu broker of its own (`BINDERY_TANSU`, which `scripts/with-brokers`
//! sets) and stops it under the running application.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bindery_core::testing::{isolated, shout};
use bindery_core::{Message, RunningApplication, StreamFunction};
use bindery_kafka::KafkaBinderProvider;
use serde_json::Value;
use tokio::time::Instant;

/// A Tansu broker of the test's own, on a free port; killed when dropped.
struct PrivateBroker {
    child: Child,
    address: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

impl PrivateBroker {
    /// Starts Tansu, or says why the test cannot run: `None` outside CI when no Tansu binary
    /// is named, a panic in CI.
    async fn start() -> Option<Self> {
        let Some(tansu) = std::env::var_os("BINDERY_TANSU") else {
            if bindery_core::testing::broker_tests_required() {
                panic!("BINDERY_TANSU names no Tansu binary, and broker tests are required here; run the tests with scripts/test, which installs it");
            }
            shout("!!!!!!!! SKIPPING A KAFKA HEALTH TEST: BINDERY_TANSU names no Tansu binary to stop under the application; scripts/test sets it !!!!!!!!");
            return None;
        };
        // A port free a moment ago may be taken by the time Tansu binds it: then another.
        for _ in 0..3 {
            if let Some(broker) = Self::start_on_a_free_port(&tansu).await {
                return Some(broker);
            }
        }
        panic!("the private Tansu did not start on any of three free ports");
    }

    async fn start_on_a_free_port(tansu: &std::ffi::OsStr) -> Option<Self> {
        let port = {
            let free = TcpListener::bind("127.0.0.1:0").expect("a free port");
            free.local_addr().expect("its address").port()
        };
        let address = format!("127.0.0.1:{port}");
        let dir = std::env::temp_dir().join(format!(
            "bindery-tansu-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("a directory for Tansu");
        let child = Command::new(tansu)
            .current_dir(&dir)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{address}"),
                "--advertised-listener-url",
                &format!("tcp://{address}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Tansu starts");
        let mut broker = PrivateBroker {
            child,
            address,
            _dir: TempDir(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(&broker.address)
            .await
            .is_err()
        {
            if broker.child.try_wait().expect("Tansu's status").is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the private Tansu did not listen on {} within 60s",
                broker.address
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(broker)
    }

    fn kill(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn health(app: &RunningApplication) -> (u16, Value) {
    let address = app
        .management_address()
        .expect("the management server runs");
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
        .get(format!("http://{address}/health"))
        .send()
        .await
        .expect("GET /health is answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_down_with_503_once_the_broker_is_gone() {
    let Some(mut broker) = PrivateBroker::start().await else {
        return;
    };
    let sink = StreamFunction::consumer("sink", |_: Message| async {});
    let toml = format!(
        r#"[management]
address = "127.0.0.1"
port = 0
[stream]
default-binder = "kafka"
shutdown-timeout = "3s"
[stream.binders.kafka]
type = "kafka"
brokers = "{brokers}"
connection-timeout = "3s"
[stream.bindings.sink-in-0]
destination = "health-in"
group = "g"
"#,
        brokers = broker.address
    );
    let app = tokio::time::timeout(
        Duration::from_secs(120),
        isolated(sink, &toml)
            .binder_provider(KafkaBinderProvider)
            .build()
            .expect("configuration")
            .start(),
    )
    .await
    .expect("started within 120s")
    .expect("start");

    let (status, up) = health(&app).await;
    assert_eq!(status, 200, "{up}");
    let kafka = &up["components"]["binders"]["components"]["kafka"];
    assert_eq!(kafka["status"], "UP", "{up}");
    assert_eq!(kafka["details"]["brokers"], broker.address.as_str(), "{up}");

    broker.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    let down = loop {
        let (status, body) = health(&app).await;
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "health did not go DOWN within 30s of the broker's end: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kafka = &down["components"]["binders"]["components"]["kafka"];
    assert_eq!(kafka["status"], "DOWN", "{down}");
    let error = kafka["details"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&broker.address) && error.contains("metadata"),
        "{down}"
    );

    // With the broker gone, shutdown still ends within its budget and a margin.
    let shutdown = tokio::time::timeout(Duration::from_secs(20), app.shutdown()).await;
    assert!(shutdown.is_ok(), "shutdown hung with the broker gone");
}
