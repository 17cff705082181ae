//! What the end-to-end tests of the examples share: the example binaries run as the separate
//! processes of a deployment, their output read line by line, and the brokers they reach.

#![allow(dead_code)] // each test file uses its own part of this

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bindery::test::{host_port, require_broker};

/// A name for one run of a test, unique among the runs of every test on one broker: tests of
/// one broker run at once, and the counter tells apart runs of the same microsecond.
pub(crate) fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{now}-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// The example binary `name`, which `cargo test` builds beside the test binaries.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples; run it through cargo",
        binary.display()
    );
    binary
}

/// One line a process printed, with the process it came from.
pub(crate) struct Line {
    pub(crate) from: &'static str,
    pub(crate) text: String,
}

/// What a test makes of the lines a deployment prints.
pub(crate) trait Observer {
    fn note(&mut self, line: &Line);
}

/// The example's processes, their output merged into one channel, killed when dropped.
pub(crate) struct Deployment {
    example: &'static str,
    environment: Vec<(String, String)>,
    /// How many services said they were ready.
    ready: usize,
    children: Vec<(&'static str, Child)>,
    lines_tx: mpsc::Sender<Line>,
    lines: mpsc::Receiver<Line>,
}

impl Deployment {
    /// A deployment of the example binary `example`, its processes run with `environment`.
    pub(crate) fn new(example: &'static str, environment: Vec<(String, String)>) -> Self {
        let (lines_tx, lines) = mpsc::channel();
        Deployment {
            example,
            environment,
            ready: 0,
            children: Vec::new(),
            lines_tx,
            lines,
        }
    }

    /// Starts a service of the deployment, which runs until it is stopped.
    pub(crate) fn start(&mut self, name: &'static str, args: &[&str]) {
        let child = self.spawn(name, args);
        self.children.push((name, child));
    }

    /// Starts the example with `args`, its output read into the deployment's lines.
    pub(crate) fn spawn(&self, name: &'static str, args: &[&str]) -> Child {
        let mut child = Command::new(example_binary(self.example))
            .args(args)
            // Nothing but what the test sets chooses the configuration.
            .env_remove("BINDERY_CONFIG")
            .env_remove("BINDERY_PROFILE")
            .envs(self.environment.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the example starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = self.lines_tx.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(Line { from: name, text }).is_err() {
                    break;
                }
            }
        });
        child
    }

    /// The next line, or `None` once `deadline` has passed.
    pub(crate) fn next_line(&self, deadline: Instant) -> Option<Line> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.lines.recv_timeout(left).ok()
    }

    /// Waits for `count` more services to say they are ready, noting what they print.
    pub(crate) fn wait_until_ready(
        &mut self,
        count: usize,
        deadline: Instant,
        broker: &str,
        observer: &mut impl Observer,
    ) {
        let target = self.ready + count;
        while self.ready < target {
            if !self.watch(broker, deadline, observer) {
                panic!(
                    "{broker}: only {} of {count} services became ready in time",
                    count + self.ready - target
                );
            }
        }
    }

    /// Notes the next line a process prints, waiting a second at most, after checking that no
    /// service has exited; `false` once `deadline` has passed.
    pub(crate) fn watch(
        &mut self,
        broker: &str,
        deadline: Instant,
        observer: &mut impl Observer,
    ) -> bool {
        self.check_running(broker);
        let step = deadline.min(Instant::now() + Duration::from_secs(1));
        match self.next_line(step) {
            Some(line) => {
                self.ready += usize::from(line.text.starts_with("ready "));
                observer.note(&line);
                true
            }
            None => Instant::now() < deadline,
        }
    }

    /// Kills the process `name` with SIGKILL, as a crash or the OOM killer would.
    pub(crate) fn kill(&mut self, name: &str) {
        let index = self
            .children
            .iter()
            .position(|(n, _)| *n == name)
            .expect("a process of that name");
        let (_, mut child) = self.children.remove(index);
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// Fails the test when a service has exited: services run until they are stopped.
    pub(crate) fn check_running(&mut self, broker: &str) {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{broker}: {name} exited early with {status}");
            }
        }
    }

    /// Stops every process with SIGTERM, as a process manager does, and checks each exits
    /// cleanly within `within`.
    pub(crate) fn stop(&mut self, within: Duration) {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (name, child) in &mut self.children {
            let status = wait_within(child, within, name);
            assert!(status.success(), "{name} exited with {status}");
        }
        self.children.clear();
    }
}

/// A process that is killed if the test lets go of it before it exited.
pub(crate) struct Reaped(pub(crate) Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The exit status of `child`, which must exit within `within` (it is killed otherwise).
pub(crate) fn wait_within(
    child: &mut Child,
    within: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a process") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of `name=` in a line, compared whole.
pub(crate) fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
}

/// How the example reaches RabbitMQ (`RABBIT_URI`): its binder `binder`'s URI, or `None` when
/// the broker tests are skipped here.
pub(crate) fn rabbitmq_as(binder: &str) -> Option<(String, String)> {
    let uri = std::env::var("RABBIT_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let name = format!("BINDERY_STREAM__BINDERS__{binder}__URI");
    require_broker("RabbitMQ", &host_port(&uri, 5672)).then_some((name, uri))
}

/// How the example reaches Kafka (`KAFKA_BROKERS`): its binder `binder`'s brokers, or `None`
/// when the broker tests are skipped here.
pub(crate) fn kafka_as(binder: &str) -> Option<(String, String)> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let first = brokers.split(',').next().unwrap_or_default().to_owned();
    let name = format!("BINDERY_STREAM__BINDERS__{binder}__BROKERS");
    require_broker("Kafka", &first).then_some((name, brokers))
}

/// How an example with the binder `rabbit` reaches RabbitMQ.
pub(crate) fn on_rabbitmq() -> Option<Vec<(String, String)>> {
    rabbitmq_as("RABBIT").map(|setting| vec![setting])
}

/// How an example with the binder `kafka` reaches Kafka.
pub(crate) fn on_kafka() -> Option<Vec<(String, String)>> {
    kafka_as("KAFKA").map(|setting| vec![setting])
}

/// The environment of one run of a deployment on `broker`: destinations of the run's own, set
/// as any deployment would set them (`BINDERY_STREAM__BINDINGS__<BINDING>__DESTINATION`). On
/// Kafka the groups are the run's own too (a Kafka group spans topics, so runs must not share
/// one); on RabbitMQ a queue is named after its destination and group, so it is the run's own
/// already, and the groups keep the names `required-groups` gives them.
pub(crate) struct RunEnvironment {
    broker: String,
    run: String,
    environment: Vec<(String, String)>,
}

impl RunEnvironment {
    pub(crate) fn new(broker: &str, environment: Vec<(String, String)>) -> Self {
        RunEnvironment {
            broker: broker.to_owned(),
            run: run_id(),
            environment,
        }
    }

    /// The run's own name for destination `name`.
    pub(crate) fn destination(&self, name: &str) -> String {
        format!("{name}-example-{}-{}", self.broker, self.run)
    }

    /// The run's name for group `name`.
    pub(crate) fn group(&self, name: &str) -> String {
        match self.broker.as_str() {
            "kafka" => format!("{name}-{}", self.run),
            _ => name.to_owned(),
        }
    }

    fn set(&mut self, binding: &str, key: &str, value: &str) {
        let name = format!("BINDERY_STREAM__BINDINGS__{binding}__{key}");
        self.environment.push((name, value.to_owned()));
    }

    /// An output binding (`PLACED_OUT_0`) sends to `destination`.
    pub(crate) fn output(&mut self, binding: &str, destination: &str) {
        self.set(binding, "DESTINATION", destination);
    }

    /// An input binding (`LEDGER_IN_0`) reads `destination` in `group`.
    pub(crate) fn input(&mut self, binding: &str, destination: &str, group: &str) {
        self.set(binding, "DESTINATION", destination);
        self.set(binding, "GROUP", group);
    }

    /// The environment, with the broker's profile, and each process's start and shutdown
    /// logged (to standard error, which the test shares).
    pub(crate) fn finish(mut self) -> Vec<(String, String)> {
        self.environment
            .push(("BINDERY_PROFILE".into(), self.broker.clone()));
        self.environment
            .push(("RUST_LOG".into(), "warn,bindery_core::runtime=info".into()));
        self.environment
    }
}
