//! The orders example, run as a deployment runs it: its services as separate processes of the
//! one example binary, on RabbitMQ and on Kafka, with nothing but environment variables
//! differing between the runs. Two `inventory` instances share their group's orders; every
//! order reaches every group; the failed payments are in the dead-letter destination with
//! their failure headers.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use support::{
    field, on_kafka, on_rabbitmq, readme_commands, readme_lines, wait_within, Deployment, Line,
    Observer, Reaped, RunEnvironment,
};

/// Kafka group joins on a small broker can take tens of seconds.
const DEADLINE: Duration = Duration::from_secs(240);

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

impl Observer for Report {
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
}

impl Report {
    fn seen(&self, service: &str) -> BTreeSet<u64> {
        self.handled
            .get(service)
            .map(|by| by.values().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// How many orders `service` handled, counting repeats.
    fn count(&self, service: &str) -> usize {
        self.handled
            .get(service)
            .map_or(0, |by| by.values().map(Vec::len).sum())
    }

    /// How many orders from `first` on `process` handled as `service`, counting repeats.
    fn count_from(&self, service: &str, process: &str, first: u64) -> usize {
        self.handled
            .get(service)
            .and_then(|by| by.get(process))
            .map_or(0, |orders| orders.iter().filter(|id| **id >= first).count())
    }

    /// Whether every group has had what it should of the orders `placed`: each order in
    /// inventory, shipping and notification, the successful payments in the ledger, the failed
    /// ones in audit.
    fn reached_every_group(&self, placed: &BTreeSet<u64>) -> bool {
        let (paid, poison): (BTreeSet<u64>, BTreeSet<u64>) =
            placed.iter().partition(|id| *id % 10 != 7);
        let all = |service: &str| placed.is_subset(&self.seen(service));
        all("inventory")
            && all("shipping")
            && all("notification")
            && paid.is_subset(&self.seen("ledger"))
            && poison.is_subset(&self.seen("audit"))
    }

    /// What each service has seen, for a failure's message.
    fn progress(&self) -> String {
        [
            "orders",
            "inventory",
            "shipping",
            "notification",
            "ledger",
            "audit",
        ]
        .map(|service| format!("{service} {}", self.seen(service).len()))
        .join(", ")
    }

    fn count_by(&self, service: &str, process: &str) -> usize {
        self.handled
            .get(service)
            .and_then(|by| by.get(process))
            .map_or(0, Vec::len)
    }
}

/// The order service placing orders `first..first + count`, a process of its own that exits
/// once the broker has confirmed them; it prints each order once it was confirmed.
fn start_placing(deployment: &Deployment, first: u64, count: u64) -> Child {
    let (count, first) = (count.to_string(), first.to_string());
    let args = ["--service", "orders", "--orders", &count, "--first", &first];
    deployment.spawn("orders", &args)
}

/// Places orders `first..first + 10`, waiting for the order service to finish.
fn place_wave(deployment: &Deployment, broker: &str, first: u64) {
    let mut placing = Reaped(start_placing(deployment, first, 10));
    let status = wait_within(&mut placing.0, Duration::from_secs(60), "the order service");
    assert!(status.success(), "{broker}: the order service failed");
}

/// The environment of a deployment on `broker`, with destinations (and on Kafka groups) of this
/// run's own; and the name of its orders destination.
fn of_this_run(
    broker: &str,
    environment: Vec<(String, String)>,
) -> (Vec<(String, String)>, String) {
    let mut run = RunEnvironment::new(broker, environment);
    let orders = run.destination("orders");
    let payments = run.destination("payments");
    let dead_letters = format!("{orders}.{}.dlq", run.group("payment"));
    run.output("PLACED_OUT_0", &orders);
    run.output("PAYMENT_OUT_0", &payments);
    for (binding, destination, group) in [
        ("INVENTORY_IN_0", &orders, "inventory"),
        ("SHIPPING_IN_0", &orders, "shipping"),
        ("NOTIFICATION_IN_0", &orders, "notification"),
        ("PAYMENT_IN_0", &orders, "payment"),
        ("LEDGER_IN_0", &payments, "ledger"),
        ("AUDIT_IN_0", &dead_letters, "audit"),
    ] {
        let group = run.group(group);
        run.input(binding, destination, &group);
    }
    (run.finish(), orders)
}

/// Runs the example as separate processes on the broker the environment selects, and checks
/// what each service did.
fn run_deployment(broker: &str, environment: Vec<(String, String)>) {
    let (environment, orders) = of_this_run(broker, environment);
    let mut deployment = Deployment::new("orders", environment);

    // `audit` starts first: on RabbitMQ a group of the dead-letter destination gets what is
    // dead-lettered once its queue exists. Then the order service, on a broker that has never
    // seen these destinations: its `required-groups` create the groups' subscriptions as their
    // services declare them (the payment queue with its dead-letter settings), and keep its
    // orders for them. Then the other services.
    let deadline = Instant::now() + DEADLINE;
    let mut report = Report::default();
    deployment.start("audit", &["--service", "audit"]);
    deployment.wait_until_ready(1, deadline, broker, &mut report);
    let mut placed: BTreeSet<u64> = (1..11).collect();
    place_wave(&deployment, broker, 1);
    deployment.start("inventory-a", &["--service", "inventory"]);
    deployment.start("inventory-b", &["--service", "inventory"]);
    deployment.start(
        "the-rest",
        &["--service", "shipping,notification,payment,ledger"],
    );
    deployment.wait_until_ready(3, deadline, broker, &mut report);

    // More orders are placed, in waves of ten, until both inventory instances have a share: a
    // Kafka group hands out its partitions only once both members have joined, and on
    // RabbitMQ the first instance to start may take all of the first wave.
    let mut next_wave = Instant::now() + Duration::from_secs(5);
    let mut first = 11;
    loop {
        let shared = report.count_by("inventory", "inventory-a") > 0
            && report.count_by("inventory", "inventory-b") > 0;
        if shared && report.reached_every_group(&placed) {
            break;
        }
        if !shared && Instant::now() >= next_wave {
            place_wave(&deployment, broker, first);
            placed.extend(first..first + 10);
            first += 10;
            next_wave = Instant::now() + Duration::from_secs(5);
        }
        if !deployment.watch(broker, deadline, &mut report) {
            panic!(
                "{broker}: within {DEADLINE:?} of {} orders placed, inventory instance a saw {}, b {}; in all: {}",
                placed.len(),
                report.count_by("inventory", "inventory-a"),
                report.count_by("inventory", "inventory-b"),
                report.progress(),
            );
        }
    }
    stop_a_clean_run(
        broker,
        deployment,
        report,
        &placed,
        &orders,
        ["inventory-a", "inventory-b"],
    );
}

/// Stops a run that stopped no process mid-way, and checks what it must show for the orders
/// `placed` on the destination `orders`, with the group `inventory` shared by the two
/// processes `inventory`.
fn stop_a_clean_run(
    broker: &str,
    mut deployment: Deployment,
    mut report: Report,
    placed: &BTreeSet<u64>,
    orders: &str,
    inventory: [&str; 2],
) {
    deployment.stop_and_note(Duration::from_secs(30), &mut report);
    let poison: BTreeSet<u64> = placed.iter().copied().filter(|id| id % 10 == 7).collect();
    assert_eq!(
        report.seen("ledger"),
        placed.difference(&poison).copied().collect(),
        "{broker}: the ledger books exactly the payments that succeeded"
    );
    assert_eq!(report.seen("audit"), poison, "{broker}: the dead letters");
    for line in &report.audit_lines {
        assert_eq!(field(line, "attempts"), Some("2"), "{broker}: {line}");
        assert_eq!(field(line, "from"), Some(orders), "{broker}: {line}");
        assert!(line.contains("negative amount"), "{broker}: {line}");
    }
    // A clean run handles each order once in a group with one member; on RabbitMQ also in the
    // group of two, which shares one queue. On Kafka the second member's join moves
    // partitions, and what was handled but not yet committed comes again: duplicates are
    // allowed there, and counted.
    let mut once = vec!["shipping", "notification", "ledger", "audit"];
    if broker == "rabbit" {
        once.push("inventory");
    }
    for service in once {
        assert_eq!(
            report.count(service),
            report.seen(service).len(),
            "{broker}: {service} handled an order twice on a clean run"
        );
    }
    let [a, b] = inventory.map(|process| report.count_by("inventory", process));
    println!(
        "{broker}: {} orders; inventory {} handled {a}, {} {b} ({} duplicates)",
        placed.len(),
        inventory[0],
        inventory[1],
        a + b - report.seen("inventory").len()
    );
}

/// The README's four terminals of a RabbitMQ deployment, run exactly as written (`cargo run
/// ...`), with destinations of this run's own in the environment: the order service's orders
/// each reach every group once, the two inventory terminals together name each order once,
/// and the failed payments reach `audit`.
fn run_the_readme_deployment(broker: &str, environment: Vec<(String, String)>) {
    let (environment, orders) = of_this_run(broker, environment);
    let mut deployment = Deployment::as_written("orders", environment);
    let terminals = readme_commands("in four terminals:");
    let names = ["inventory-1", "inventory-2", "the-rest", "orders"];
    assert_eq!(terminals.len(), names.len(), "README.md: four terminals");
    let services: Vec<&str> = terminals
        .iter()
        .map(|terminal| {
            let args = terminal.example_args();
            let service = args.windows(2).find(|w| w[0] == "--service").map(|w| w[1]);
            service.expect("README.md: each terminal names its `--service`")
        })
        .collect();
    assert_eq!(
        [services[0], services[1], services[3]],
        ["inventory", "inventory", "orders"],
        "README.md: two inventory terminals, and the order service last"
    );
    for service in ["shipping", "notification", "payment", "ledger", "audit"] {
        assert!(
            services[2].split(',').any(|s| s == service),
            "README.md: the third terminal runs {service}"
        );
    }
    let deadline = Instant::now() + DEADLINE;
    let mut report = Report::default();
    for (name, terminal) in names.into_iter().zip(&terminals).take(3) {
        deployment.start_as_written(name, terminal);
    }
    deployment.wait_until_ready(3, deadline, broker, &mut report);

    let order_service = &terminals[3];
    let args = order_service.example_args();
    let count: u64 = args
        .windows(2)
        .find(|w| w[0] == "--orders")
        .and_then(|w| w[1].parse().ok())
        .expect("README.md: the last terminal places `--orders N`");
    let mut placing = Reaped(deployment.spawn_as_written("orders", order_service));
    let placed: BTreeSet<u64> = (1..=count).collect();
    let mut placing_done = false;
    loop {
        if !placing_done {
            if let Some(status) = placing.0.try_wait().expect("the order service") {
                assert!(status.success(), "{broker}: the order service failed");
                placing_done = true;
            }
        }
        let confirmed = placed.is_subset(&report.seen("orders"));
        if placing_done && confirmed && report.reached_every_group(&placed) {
            break;
        }
        if !deployment.watch(broker, deadline, &mut report) {
            panic!(
                "{broker}: within {DEADLINE:?} of {count} orders: {}",
                report.progress(),
            );
        }
    }
    stop_a_clean_run(
        broker,
        deployment,
        report,
        &placed,
        &orders,
        ["inventory-1", "inventory-2"],
    );
}

/// Two `inventory` instances share a long run of orders, and one is killed with SIGKILL while
/// they flow; a process manager starts a new instance in its place. No order is lost: what the
/// killed one had received but not acknowledged goes to the others (RabbitMQ redelivers it; on
/// Kafka the group hands the partition on from its last committed offset). What it had handled
/// but not yet acknowledged comes again: those duplicates are counted and printed.
///
/// The new instance matters on Kafka-compatible Tansu 0.6.0: when the killed member led the
/// group, Tansu keeps it as leader and the group never settles until a new member joins (with
/// Apache Kafka the survivor takes over once the killed member's session times out). The
/// order service waits for each order's confirm before sending the next, so every record is a
/// batch of its own, and no member fetches from inside a batch (which Tansu cannot serve).
fn kill_an_inventory_instance_mid_run(broker: &str, environment: Vec<(String, String)>) {
    let (environment, _) = of_this_run(broker, environment);
    let mut deployment = Deployment::new("orders", environment);
    let deadline = Instant::now() + DEADLINE;
    let mut report = Report::default();
    deployment.start("inventory-a", &["--service", "inventory"]);
    deployment.start("inventory-b", &["--service", "inventory"]);
    deployment.wait_until_ready(2, deadline, broker, &mut report);

    // Waves of ten until both instances have a share: both are members of the group.
    let mut placed = BTreeSet::new();
    let mut first = 1;
    while report.count_by("inventory", "inventory-a") == 0
        || report.count_by("inventory", "inventory-b") == 0
    {
        assert!(
            Instant::now() < deadline,
            "{broker}: the two inventory instances never shared the orders"
        );
        place_wave(&deployment, broker, first);
        placed.extend(first..first + 10);
        first += 10;
        let wave_end = deadline.min(Instant::now() + Duration::from_secs(5));
        while deployment.watch(broker, wave_end, &mut report) {}
    }

    const LONG_RUN: u64 = 400;
    let long_run = first;
    let mut placing = Reaped(start_placing(&deployment, long_run, LONG_RUN));
    placed.extend(long_run..long_run + LONG_RUN);
    while report.count_from("inventory", "inventory-a", long_run) < 20 {
        if let Ok(Some(status)) = placing.0.try_wait() {
            assert!(status.success(), "{broker}: the order service failed");
        }
        if !deployment.watch(broker, deadline, &mut report) {
            panic!("{broker}: inventory-a did not handle 20 orders of the long run in time")
        }
    }
    let confirmed_at_kill = report.count_from("orders", "orders", long_run);
    deployment.kill("inventory-a");
    deployment.start("inventory-c", &["--service", "inventory"]);
    assert!(
        confirmed_at_kill < LONG_RUN as usize,
        "{broker}: the kill came after the order service had placed all its orders ({confirmed_at_kill}), not while they flowed"
    );

    while !placed.is_subset(&report.seen("inventory")) {
        if !deployment.watch(broker, deadline, &mut report) {
            panic!(
                "{broker}: after inventory-a was killed, {} of {} orders never reached inventory ({} placed and confirmed so far)",
                placed.difference(&report.seen("inventory")).count(),
                placed.len(),
                report.seen("orders").len(),
            );
        }
    }
    let status = wait_within(
        &mut placing.0,
        Duration::from_secs(120),
        "the order service",
    );
    assert!(status.success(), "{broker}: the order service failed");
    deployment.stop(Duration::from_secs(30));

    let a = report.count_by("inventory", "inventory-a");
    let b = report.count_by("inventory", "inventory-b");
    let c = report.count_by("inventory", "inventory-c");
    println!(
        "{broker}: {} orders, inventory-a killed after {a} (with {confirmed_at_kill} of the long run's {LONG_RUN} placed); inventory-b handled {b}, the new inventory-c {c}; none lost, {} duplicates",
        placed.len(),
        a + b + c - report.seen("inventory").len()
    );
}

/// The README's management session: the inventory service started as written, then each
/// `curl` line run as written by a shell, each answer checked.
fn run_the_readme_management_session(broker: &str, environment: Vec<(String, String)>) {
    let (environment, _) = of_this_run(broker, environment);
    let mut deployment = Deployment::as_written("orders", environment);
    let service = readme_commands("start its inventory service on a port you choose");
    assert_eq!(service.len(), 1, "README.md: one terminal runs the service");
    let session = readme_lines("watch and steer it from another terminal");
    let deadline = Instant::now() + DEADLINE;
    let mut report = Report::default();
    deployment.start_as_written("inventory", &service[0]);
    deployment.wait_until_ready(1, deadline, broker, &mut report);
    let expected = [
        ("curl -s localhost:8081/health", r#""status":"UP""#),
        ("bindings/inventory-in-0 -H", r#""state":"paused""#),
        (
            "curl -s localhost:8081/bindings/inventory-in-0",
            r#""state":"paused""#,
        ),
        ("RESUMED", r#""state":"started""#),
        (
            "curl -s localhost:8081/metrics",
            r#"bindery_messages_received_total{binding="inventory-in-0""#,
        ),
    ];
    assert_eq!(
        session.len(),
        expected.len(),
        "README.md: the session's lines"
    );
    for (line, (part, answer)) in session.iter().zip(expected) {
        assert!(
            line.contains(part),
            "README.md: `{line}` should contain `{part}`"
        );
        let mut curl = std::process::Command::new("sh")
            .args(["-c", line])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let status = wait_within(&mut curl, Duration::from_secs(60), line);
        let mut printed = String::new();
        std::io::Read::read_to_string(curl.stdout.as_mut().expect("stdout"), &mut printed)
            .expect("the answer");
        assert!(status.success(), "`{line}` failed: {printed}");
        assert!(
            printed.contains(answer),
            "`{line}` answered without `{answer}`: {printed}"
        );
    }
}

#[test]
fn the_readmes_management_session_runs_as_written_on_rabbitmq() {
    if let Some(environment) = on_rabbitmq() {
        run_the_readme_management_session("rabbit", environment);
    }
}

#[test]
fn the_orders_example_runs_as_separate_services_on_rabbitmq() {
    if let Some(environment) = on_rabbitmq() {
        run_deployment("rabbit", environment);
    }
}

#[test]
fn the_readmes_four_terminals_run_as_written_on_rabbitmq() {
    if let Some(environment) = on_rabbitmq() {
        run_the_readme_deployment("rabbit", environment);
    }
}

#[test]
fn the_orders_example_runs_as_separate_services_on_kafka() {
    if let Some(environment) = on_kafka() {
        run_deployment("kafka", environment);
    }
}

#[test]
fn no_order_is_lost_when_an_instance_is_killed_on_rabbitmq() {
    if let Some(environment) = on_rabbitmq() {
        kill_an_inventory_instance_mid_run("rabbit", environment);
    }
}

#[test]
fn no_order_is_lost_when_an_instance_is_killed_on_kafka() {
    if let Some(environment) = on_kafka() {
        kill_an_inventory_instance_mid_run("kafka", environment);
    }
}
