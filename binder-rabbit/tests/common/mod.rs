//! What the RabbitMQ test binaries share: the server under test, and control of it through
//! `rabbitmqctl` (closing connections, raising alarms) for the tests that need that.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use bindery_core::testing::host_port;

/// The server under test: `RABBIT_URI`, else the local server with guest/guest.
pub(crate) fn uri() -> String {
    std::env::var("RABBIT_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Whether `rabbitmqctl` can reach the local server, as the tests that control it need. In CI
/// (or under `scripts/with-brokers`) it must.
pub(crate) fn can_control_server() -> bool {
    let local = host_port(&uri(), 5672).starts_with("127.0.0.1")
        || host_port(&uri(), 5672).starts_with("localhost");
    let works = local
        && std::process::Command::new("rabbitmqctl")
            .args(["-q", "status"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !works {
        if bindery_core::testing::broker_tests_required() {
            panic!("this test needs `rabbitmqctl` for the local RabbitMQ server");
        }
        bindery_core::testing::shout("!!!!!!!! SKIPPING A RabbitMQ TEST THAT CONTROLS THE SERVER: rabbitmqctl cannot reach a local server !!!!!!!!");
    }
    works
}

/// How long one test may take in all: no await on the broker can hang a run past it.
const TEST_DEADLINE: Duration = Duration::from_secs(300);

/// Runs a test's body, failing the test when it has not finished within [`TEST_DEADLINE`].
pub(crate) async fn within_test_deadline(body: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_DEADLINE, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {TEST_DEADLINE:?}"));
}

/// Runs `rabbitmqctl -q ARGS` within 30 seconds; its output, or a panic saying what failed.
pub(crate) async fn rabbitmqctl(args: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("rabbitmqctl")
            .arg("-q")
            .args(args)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} did not answer within 30s"))
    .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The virtual host of `RABBIT_URI`.
pub(crate) fn vhost() -> String {
    let path = uri()
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/').map(|(_, path)| path.to_owned()))
        .unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    match path {
        "" => "/".to_owned(),
        path => path.replace("%2f", "/").replace("%2F", "/"),
    }
}

/// A connection of the test's virtual host, as `rabbitmqctl list_connections` shows it.
struct ServerConnection {
    pid: String,
    state: String,
    /// The client properties, where the client-given name is quoted.
    properties: String,
}

/// The server's connections in the test's virtual host.
async fn server_connections() -> Vec<ServerConnection> {
    let listed = rabbitmqctl(&[
        "list_connections",
        "--no-table-headers",
        "pid",
        "vhost",
        "state",
        "client_properties",
    ])
    .await;
    let vhost = vhost();
    listed
        .lines()
        .filter_map(|line| {
            let mut columns = line.splitn(4, '\t');
            let (pid, host, state, properties) = (
                columns.next()?,
                columns.next()?,
                columns.next()?,
                columns.next()?,
            );
            (host == vhost).then(|| ServerConnection {
                pid: pid.to_owned(),
                state: state.to_owned(),
                properties: properties.to_owned(),
            })
        })
        .collect()
}

/// The process ids of the test's connections whose client-given name starts with `name`.
pub(crate) async fn connections_named(name: &str) -> BTreeSet<String> {
    let prefix = format!("\"{name}");
    server_connections()
        .await
        .into_iter()
        .filter(|c| c.properties.contains(&prefix))
        .map(|c| c.pid)
        .collect()
}

/// Closes, from the server's side, each connection in the test's virtual host whose name
/// starts with `name`; returns their process ids.
pub(crate) async fn close_connections_named(name: &str) -> BTreeSet<String> {
    let pids = connections_named(name).await;
    // All at once, so that none goes on working while another is closed.
    futures::future::join_all(pids.iter().map(|pid| async move {
        rabbitmqctl(&["close_connection", pid, "closed by a bindery test"]).await
    }))
    .await;
    pids
}

/// The states (`running`, `blocking`, `blocked`, ...) of the test's connections named exactly
/// `name`.
pub(crate) async fn connection_states(name: &str) -> Vec<String> {
    let exact = format!("\"{name}\"");
    server_connections()
        .await
        .into_iter()
        .filter(|c| c.properties.contains(&exact))
        .map(|c| c.state)
        .collect()
}

/// Each queue of the test's virtual host with its count of `what` (a `list_queues` column
/// such as `messages` or `messages_ready`).
async fn queue_counts(what: &str) -> Vec<(String, u64)> {
    let listed = rabbitmqctl(&[
        "list_queues",
        "-p",
        &vhost(),
        "--no-table-headers",
        "name",
        what,
    ])
    .await;
    listed
        .lines()
        .filter_map(|line| {
            let (name, count) = line.split_once('\t')?;
            Some((name.to_owned(), count.trim().parse().ok()?))
        })
        .collect()
}

/// The queues of the test's virtual host whose names start with `prefix`, with the messages
/// each has ready (not delivered to a consumer).
pub(crate) async fn ready_in_queues_named(prefix: &str) -> Vec<(String, u64)> {
    let mut queues = queue_counts("messages_ready").await;
    queues.retain(|(name, _)| name.starts_with(prefix));
    queues
}

/// Messages in `queue` of the test's virtual host, ready and unacknowledged together.
pub(crate) async fn queue_depth(queue: &str) -> Option<u64> {
    queue_counts("messages")
        .await
        .into_iter()
        .find_map(|(name, messages)| (name == queue).then_some(messages))
}
