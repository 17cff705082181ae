//! Test support, in the spirit of Spring's test binder: run the application in-process on the
//! memory binder, send to its input destinations, receive from its outputs and dead-letter
//! destinations with a deadline.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), bindery_core::Error> {
//! use std::time::Duration;
//! use bindery_core::{testing::TestApp, Application, StreamFunction};
//!
//! let shout = StreamFunction::function("shout", |text: String| async move { text.to_uppercase() });
//! let app = TestApp::start_with(
//!     Application::builder().without_registered_functions().function(shout),
//!     r#"[stream.bindings.shout-in-0]
//!        destination = "words""#,
//! )
//! .await?;
//! app.send("words", "hello").await?;
//! let reply = app.receive("shout-out-0", Duration::from_secs(5)).await.expect("a reply");
//! assert_eq!(&reply.payload()[..], b"HELLO");
//! app.shutdown().await
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::binder::{Binder, ConsumerSpec, ProducerSpec, Subscription};
use crate::handler::{IntoOutputs, Outputs, DEFAULT_CONTENT_TYPE};
use crate::{
    Application, ApplicationBuilder, Error, MemoryBinder, Message, RunningApplication, StreamBridge,
};

/// An application running in-process on one [`MemoryBinder`] that stands in for every binder.
#[derive(Debug)]
pub struct TestApp {
    binder: MemoryBinder,
    running: RunningApplication,
    captures: Mutex<HashMap<String, Box<dyn Subscription>>>,
}

impl TestApp {
    /// Starts the `#[stream_function]`s selected by `toml` (every one when it names none).
    /// The process environment and `application.toml` are not read.
    pub async fn start(toml: &str) -> Result<TestApp, Error> {
        Self::start_with(Application::builder(), toml).await
    }

    /// Starts an application configured by `builder`, with `toml` as its configuration.
    pub async fn start_with(builder: ApplicationBuilder, toml: &str) -> Result<TestApp, Error> {
        let binder = MemoryBinder::new();
        let application = builder
            .config_str("test configuration", toml)
            .environment(Vec::<(String, String)>::new())
            .replace_binders(Arc::new(binder.clone()))
            .build()?;
        // Capture outputs before anything can send, so no output is missed.
        let mut captures = HashMap::new();
        for destination in application.output_destinations() {
            let subscription = binder
                .subscribe(&ConsumerSpec::new(destination.clone(), None))
                .await?;
            captures.insert(destination, subscription);
        }
        let running = application.start().await?;
        Ok(TestApp {
            binder,
            running,
            captures: Mutex::new(captures),
        })
    }

    /// The memory binder every binding runs on.
    pub fn binder(&self) -> &MemoryBinder {
        &self.binder
    }

    /// The application's bridge.
    pub fn bridge(&self) -> StreamBridge {
        self.running.bridge()
    }

    /// Sends `value` to `destination`, encoded as a function's return value would be
    /// (plain values need [`crate::Encoded`]; strings and bytes are sent as they are).
    pub async fn send(&self, destination: &str, value: impl IntoOutputs) -> Result<(), Error> {
        let mut outputs = Outputs::new(DEFAULT_CONTENT_TYPE);
        value
            .into_outputs(&mut outputs)
            .map_err(|failure| Error::Encode {
                destination: destination.to_owned(),
                message: failure.to_string(),
            })?;
        let producer = self
            .binder
            .producer(&ProducerSpec::new(destination))
            .await?;
        for message in outputs.into_messages() {
            producer.send(message).await?;
        }
        Ok(())
    }

    /// Sends a JSON-encoded value to `destination`.
    pub async fn send_json<T: serde::Serialize + Send>(
        &self,
        destination: &str,
        value: T,
    ) -> Result<(), Error> {
        self.send(destination, crate::Encoded(value)).await
    }

    /// The next message sent to `destination` (a destination or an output binding's name), or
    /// `None` when none arrives within `timeout`. Destinations the application's functions
    /// send to are captured from the start; others from the first call on.
    pub async fn receive(&self, destination: &str, timeout: Duration) -> Option<Message> {
        let destination = self.resolve(destination);
        let mut captures = self.captures.lock().await;
        if !captures.contains_key(&destination) {
            let subscription = self
                .binder
                .subscribe(&ConsumerSpec::new(destination.clone(), None))
                .await
                .ok()?;
            captures.insert(destination.clone(), subscription);
        }
        let subscription = captures.get_mut(&destination)?;
        let delivery = tokio::time::timeout(timeout, subscription.next())
            .await
            .ok()??
            .ok()?;
        delivery.acknowledgement.ack().await.ok()?;
        Some(Arc::unwrap_or_clone(delivery.message))
    }

    /// The next message dead-lettered from `destination` by `group`, within `timeout`.
    pub async fn receive_dead_letter(
        &self,
        destination: &str,
        group: &str,
        timeout: Duration,
    ) -> Option<Message> {
        self.receive(&format!("{destination}.{group}.dlq"), timeout)
            .await
    }

    fn resolve(&self, destination: &str) -> String {
        self.running
            .output_destination(destination)
            .unwrap_or_else(|| destination.to_owned())
    }

    /// Shuts the application down gracefully.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.running.shutdown().await
    }
}

/// Whether broker tests may run against `address` (`host:port`) of the broker `name`.
///
/// When the broker does not answer: with `CI` or `BINDERY_REQUIRE_BROKERS` set (as
/// `scripts/test` does) this panics, so a missing broker fails the run; otherwise it prints a
/// loud notice and returns `false`, and the caller skips its test.
pub fn require_broker(name: &str, address: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let reachable = address
        .to_socket_addrs()
        .ok()
        .into_iter()
        .flatten()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if reachable {
        return true;
    }
    if broker_tests_required() {
        panic!("{name} does not answer at {address}, and broker tests are required here (CI or BINDERY_REQUIRE_BROKERS); start it, or run scripts/test which provisions it");
    }
    shout(&format!(
        "!!!!!!!! SKIPPING {name} TEST: nothing answers at {address}. Run scripts/test to provision the broker. !!!!!!!!"
    ));
    false
}

/// Whether a broker test that cannot run must fail rather than skip: with `CI` or
/// `BINDERY_REQUIRE_BROKERS` set (the test command sets it).
pub fn broker_tests_required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("BINDERY_REQUIRE_BROKERS").is_some()
}

/// Writes `notice` to the process's standard error itself: the test harness captures what
/// `eprintln!` prints, so a skipped test would otherwise look like a pass.
pub fn shout(notice: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "\n{notice}\n");
}

/// The `host:port` part of a broker URI such as `amqp://user:password@host:5672/vhost`.
///
/// ```
/// assert_eq!(bindery_core::testing::host_port("amqp://u:p@mq:5673/%2f", 5672), "mq:5673");
/// assert_eq!(bindery_core::testing::host_port("amqp://localhost", 5672), "localhost:5672");
/// ```
pub fn host_port(uri: &str, default_port: u16) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// A builder for an application of exactly `function`, configured by `toml` alone: no
/// registered functions, no `application.toml`, no environment variables. Add binder providers
/// or instances, then build.
pub fn isolated(function: crate::StreamFunction, toml: &str) -> ApplicationBuilder {
    Application::builder()
        .without_registered_functions()
        .function(function)
        .config_str("application.toml", toml)
        .environment(Vec::<(String, String)>::new())
}
