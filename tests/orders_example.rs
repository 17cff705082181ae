//! The orders example, run as a deployment runs it: its services as separate processes of the
//! one example binary, on RabbitMQ and on Kafka, with nothing but environment variables
//! differing between the runs. Two `inventory` instances share their group's orders; every
//! order reaches every group; the failed payments are in the dead-letter destination with
//! their failure headers.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bindery::test::{host_port, require_broker};

/// Kafka group joins on a small broker can take tens of seconds.
const DEADLINE: Duration = Duration::from_secs(240);

/// The example binary, which `cargo test` builds beside the test binaries.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("examples").join("orders");
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples; run it through cargo",
        binary.display()
    );
    binary
}

/// One line a process printed, with the process it came from.
struct Line {
    from: &'static str,
    text: String,
}

/// The example's processes, their output merged into one channel, killed when dropped.
struct Deployment {
    environment: Vec<(String, String)>,
    children: Vec<(&'static str, Child)>,
    lines_tx: mpsc::Sender<Line>,
    lines: mpsc::Receiver<Line>,
}

impl Deployment {
    fn new(environment: Vec<(String, String)>) -> Self {
        let (lines_tx, lines) = mpsc::channel();
        Deployment {
            environment,
            children: Vec::new(),
            lines_tx,
            lines,
        }
    }

    fn start(&mut self, name: &'static str, args: &[&str]) {
        let mut child = Command::new(example_binary())
            .args(args)
            .envs(self.environment.iter().cloned())
            .env_remove("BINDERY_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the orders example starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = self.lines_tx.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(Line { from: name, text }).is_err() {
                    break;
                }
            }
        });
        self.children.push((name, child));
    }

    /// The next line, or `None` once `deadline` has passed.
    fn next_line(&self, deadline: Instant) -> Option<Line> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.lines.recv_timeout(left).ok()
    }

    /// Stops every process with SIGTERM, as a process manager does, and checks each exits
    /// cleanly within `within`.
    fn stop(&mut self, within: Duration) {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + within;
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait().expect("waiting for a service") {
                    Some(status) => {
                        assert!(status.success(), "{name} exited with {status}");
                        break;
                    }
                    None if Instant::now() > deadline => {
                        panic!("{name} did not stop within {within:?} of SIGTERM")
                    }
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
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

/// The `order=N` of a line, and the word it starts with (the service).
fn parse(text: &str) -> Option<(&str, u64)> {
    let service = text.split_whitespace().next()?;
    let order = text
        .split_whitespace()
        .find_map(|field| field.strip_prefix("order="))?
        .parse()
        .ok()?;
    Some((service, order))
}

/// What the services reported: per service, per process name, the orders handled.
#[derive(Default)]
struct Report {
    handled: BTreeMap<String, BTreeMap<&'static str, Vec<u64>>>,
    audit_lines: Vec<String>,
}

impl Report {
    fn note(&mut self, line: &Line) {
        if let Some((service, order)) = parse(&line.text) {
            if service == "audit" {
                self.audit_lines.push(line.text.clone());
            }
            self.handled
                .entry(service.to_owned())
                .or_default()
                .entry(line.from)
                .or_default()
                .push(order);
        }
    }

    fn seen(&self, service: &str) -> BTreeSet<u64> {
        self.handled
            .get(service)
            .map(|by| by.values().flatten().copied().collect())
            .unwrap_or_default()
    }

    fn count_by(&self, service: &str, process: &str) -> usize {
        self.handled
            .get(service)
            .and_then(|by| by.get(process))
            .map_or(0, Vec::len)
    }
}

/// Runs the example as five processes on the broker the environment selects, and checks what
/// each service did.
fn run_deployment(broker: &str, mut environment: Vec<(String, String)>) {
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    // Destinations of this run's own, set as any deployment would set them.
    let orders = format!("orders-example-{broker}-{run}");
    let payments = format!("payments-example-{broker}-{run}");
    for (binding, destination) in [
        ("PLACED_OUT_0", orders.clone()),
        ("INVENTORY_IN_0", orders.clone()),
        ("SHIPPING_IN_0", orders.clone()),
        ("NOTIFICATION_IN_0", orders.clone()),
        ("PAYMENT_IN_0", orders.clone()),
        ("PAYMENT_OUT_0", payments.clone()),
        ("LEDGER_IN_0", payments.clone()),
        ("AUDIT_IN_0", format!("{orders}.payment.dlq")),
    ] {
        environment.push((
            format!("BINDERY_STREAM__BINDINGS__{binding}__DESTINATION"),
            destination,
        ));
    }
    environment.push(("BINDERY_PROFILE".into(), broker.into()));
    environment.push(("RUST_LOG".into(), "warn".into()));
    let mut deployment = Deployment::new(environment);
    deployment.start("inventory-a", &["--service", "inventory"]);
    deployment.start("inventory-b", &["--service", "inventory"]);
    deployment.start(
        "the-rest",
        &["--service", "shipping,notification,payment,ledger,audit"],
    );
    let deadline = Instant::now() + DEADLINE;
    let mut report = Report::default();
    let mut ready = 0;
    while ready < 3 {
        let line = deployment
            .next_line(deadline)
            .unwrap_or_else(|| panic!("{broker}: only {ready} of 3 services became ready"));
        if line.text.starts_with("ready ") {
            ready += 1;
        }
        report.note(&line);
    }

    // Orders are placed in waves of ten until both inventory instances have a share: a
    // Kafka group hands out its partitions only once both members have joined.
    let mut placed = BTreeSet::new();
    let mut next_wave = Instant::now();
    let mut first = 1;
    loop {
        let shared = report.count_by("inventory", "inventory-a") > 0
            && report.count_by("inventory", "inventory-b") > 0;
        let all = |service: &str| placed.is_subset(&report.seen(service));
        let paid: BTreeSet<u64> = placed.iter().copied().filter(|id| id % 10 != 7).collect();
        let poison: BTreeSet<u64> = placed.difference(&paid).copied().collect();
        let done = shared
            && !placed.is_empty()
            && all("inventory")
            && all("shipping")
            && all("notification")
            && paid.is_subset(&report.seen("ledger"))
            && poison.is_subset(&report.seen("audit"));
        if done {
            break;
        }
        if !shared && Instant::now() >= next_wave {
            let status = Command::new(example_binary())
                .args(["--service", "orders", "--orders", "10"])
                .args(["--first", &first.to_string()])
                .envs(deployment.environment.iter().cloned())
                .stdout(Stdio::null())
                .status()
                .expect("the order service runs");
            assert!(status.success(), "{broker}: the order service failed");
            placed.extend(first..first + 10);
            first += 10;
            next_wave = Instant::now() + Duration::from_secs(5);
        }
        let wait = deadline.min(Instant::now() + Duration::from_secs(1));
        if let Some(line) = deployment.next_line(wait) {
            report.note(&line);
        } else if Instant::now() >= deadline {
            panic!(
                "{broker}: within {DEADLINE:?} of {} orders placed, inventory saw {} (instance a {}, b {}), shipping {}, notification {}, ledger {}, audit {}",
                placed.len(),
                report.seen("inventory").len(),
                report.count_by("inventory", "inventory-a"),
                report.count_by("inventory", "inventory-b"),
                report.seen("shipping").len(),
                report.seen("notification").len(),
                report.seen("ledger").len(),
                report.seen("audit").len(),
            );
        }
    }
    deployment.stop(Duration::from_secs(30));

    let poison: BTreeSet<u64> = placed.iter().copied().filter(|id| id % 10 == 7).collect();
    assert_eq!(
        report.seen("ledger"),
        placed.difference(&poison).copied().collect(),
        "{broker}: the ledger books exactly the payments that succeeded"
    );
    assert_eq!(report.seen("audit"), poison, "{broker}: the dead letters");
    for line in &report.audit_lines {
        assert!(
            line.contains("attempts=2")
                && line.contains(&format!("from={orders}"))
                && line.contains("negative amount"),
            "{broker}: a dead letter carries its failure headers: {line}"
        );
    }
    let a = report.count_by("inventory", "inventory-a");
    let b = report.count_by("inventory", "inventory-b");
    println!(
        "{broker}: {} orders; inventory instance a handled {a}, b {b} ({} duplicates)",
        placed.len(),
        a + b - report.seen("inventory").len()
    );
}

#[test]
fn the_orders_example_runs_as_separate_services_on_rabbitmq() {
    let uri = std::env::var("RABBIT_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    if !require_broker("RabbitMQ", &host_port(&uri, 5672)) {
        return;
    }
    run_deployment(
        "rabbit",
        vec![("BINDERY_STREAM__BINDERS__RABBIT__URI".into(), uri)],
    );
}

#[test]
fn the_orders_example_runs_as_separate_services_on_kafka() {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let first = brokers.split(',').next().unwrap_or_default().to_owned();
    if !require_broker("Kafka", &first) {
        return;
    }
    run_deployment(
        "kafka",
        vec![("BINDERY_STREAM__BINDERS__KAFKA__BROKERS".into(), brokers)],
    );
}
