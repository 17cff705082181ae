//! What the end-to-end tests of the examples share: the example binaries run as the separate
//! processes of a deployment, their output read line by line, and the brokers they reach.

#![allow(dead_code)] // each test file uses its own part of this

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
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
pub(crate) fn example_binary(name: &str) -> PathBuf {
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

/// Deployments of one test binary run at once, except one that runs `cargo`.
static TURNS: RwLock<()> = RwLock::new(());

enum Turn {
    Shared(RwLockReadGuard<'static, ()>),
    Alone(RwLockWriteGuard<'static, ()>),
}

/// The directory cargo builds into for this test: `<target>/<profile>/deps/<test>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test binary>")
        .to_owned()
}

/// A command line as the README writes it for a terminal: `NAME=value` settings, a program
/// and its arguments, separated by spaces (the README quotes nothing in these commands).
pub(crate) struct Typed {
    pub(crate) line: String,
    pub(crate) settings: Vec<(String, String)>,
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
}

impl Typed {
    fn parse(line: &str) -> Typed {
        assert!(
            !line.contains(['"', '\'', '\\', '$', '|', '&', ';', '#']),
            "README command `{line}` needs a shell; the tests run plain commands only"
        );
        let mut words = line.split_whitespace().peekable();
        let mut settings = Vec::new();
        while let Some((name, value)) = words.peek().and_then(|word| word.split_once('=')) {
            settings.push((name.to_owned(), value.to_owned()));
            words.next();
        }
        let program = words
            .next()
            .expect("a program after the settings")
            .to_owned();
        Typed {
            line: line.to_owned(),
            settings,
            program,
            args: words.map(str::to_owned).collect(),
        }
    }

    /// The example's own arguments: what follows `--`.
    pub(crate) fn example_args(&self) -> Vec<&str> {
        let mut args = self.args.iter().map(String::as_str);
        args.by_ref().find(|arg| *arg == "--");
        args.collect()
    }
}

/// The commands of the README's code block that follows the paragraph containing `intro`,
/// one per terminal.
pub(crate) fn readme_commands(intro: &str) -> Vec<Typed> {
    readme_lines(intro)
        .iter()
        .map(|line| Typed::parse(line))
        .collect()
}

/// The lines, blank ones left out, of the README's code block that follows the paragraph
/// containing `intro`.
pub(crate) fn readme_lines(intro: &str) -> Vec<String> {
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let text = std::fs::read_to_string(readme).expect("README.md");
    // The last paragraph's text, its lines joined; `ended` once a blank line closed it.
    let mut paragraph = String::new();
    let mut ended = false;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            if paragraph.contains(intro) {
                let commands: Vec<String> = lines
                    .by_ref()
                    .take_while(|line| !line.starts_with("```"))
                    .filter(|line| !line.trim().is_empty())
                    .map(str::to_owned)
                    .collect();
                assert!(
                    !commands.is_empty(),
                    "README.md: no commands after `{intro}`"
                );
                return commands;
            }
            // Skip the block: what it holds is no paragraph.
            lines.by_ref().find(|line| line.starts_with("```"));
            paragraph.clear();
        } else if line.trim().is_empty() {
            ended = true;
        } else {
            if std::mem::take(&mut ended) {
                paragraph.clear();
            }
            paragraph.push(' ');
            paragraph.push_str(line.trim());
        }
    }
    panic!("README.md has no code block after a paragraph with `{intro}`");
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
    /// Shared with the other deployments of the test binary, or held alone by one that runs
    /// `cargo`: a `cargo run` links the example binary anew, which the others run.
    _turn: Turn,
    /// How many services said they were ready.
    ready: usize,
    children: Vec<(&'static str, Child)>,
    lines_tx: mpsc::Sender<Line>,
    lines: mpsc::Receiver<Line>,
}

impl Deployment {
    /// A deployment of the example binary `example`, its processes run with `environment`.
    pub(crate) fn new(example: &'static str, environment: Vec<(String, String)>) -> Self {
        let turn = Turn::Shared(TURNS.read().unwrap_or_else(PoisonError::into_inner));
        Deployment::with_turn(example, environment, turn)
    }

    /// A deployment whose processes are commands as the README gives them, each run with
    /// `cargo run` in `environment`, where the commands' own settings choose the profile. The
    /// example is built first, before any deadline runs, and no other deployment of this test
    /// binary runs meanwhile.
    pub(crate) fn as_written(example: &'static str, environment: Vec<(String, String)>) -> Self {
        let turn = Turn::Alone(TURNS.write().unwrap_or_else(PoisonError::into_inner));
        let environment = environment
            .into_iter()
            .filter(|(name, _)| name != "BINDERY_PROFILE")
            .collect();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--example", example])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", target_dir())
            .spawn()
            .expect("cargo build starts");
        let status = wait_within(&mut build, Duration::from_secs(1800), "cargo build");
        assert!(status.success(), "cargo build --example {example} failed");
        Deployment::with_turn(example, environment, turn)
    }

    fn with_turn(example: &'static str, environment: Vec<(String, String)>, turn: Turn) -> Self {
        let (lines_tx, lines) = mpsc::channel();
        Deployment {
            example,
            environment,
            _turn: turn,
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
        let mut command = Command::new(example_binary(self.example));
        command.args(args);
        self.spawn_command(name, command, &[])
    }

    /// Starts a service with a command exactly as the README gives it (`cargo run --example
    /// ...`), which runs until it is stopped.
    pub(crate) fn start_as_written(&mut self, name: &'static str, command: &Typed) {
        let child = self.spawn_as_written(name, command);
        self.children.push((name, child));
    }

    /// Runs a command exactly as the README gives it, from the workspace's root, in the
    /// deployment's environment and then the command's own settings, as a shell would.
    pub(crate) fn spawn_as_written(&self, name: &'static str, typed: &Typed) -> Child {
        assert!(
            matches!(self._turn, Turn::Alone(_)),
            "a deployment of commands as written is made with `Deployment::as_written`"
        );
        assert!(
            typed
                .settings
                .iter()
                .any(|(name, _)| name == "BINDERY_PROFILE"),
            "`{}` chooses no profile: it would run on the memory binder",
            typed.line
        );
        assert!(
            typed
                .args
                .windows(2)
                .any(|w| w == ["--example", self.example]),
            "`{}` does not run the example {}",
            typed.line,
            self.example
        );
        let mut command = Command::new(&typed.program);
        command
            .args(&typed.args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            // The build this test runs in, where `as_written` built the example.
            .env("CARGO_TARGET_DIR", target_dir());
        self.spawn_command(name, command, &typed.settings)
    }

    /// Starts `command` in the deployment's environment and then `settings`, its output read
    /// into the deployment's lines.
    fn spawn_command(
        &self,
        name: &'static str,
        mut command: Command,
        settings: &[(String, String)],
    ) -> Child {
        let mut child = command
            // Nothing but what the test sets chooses the configuration.
            .env_remove("BINDERY_CONFIG")
            .env_remove("BINDERY_PROFILE")
            .envs(self.environment.iter().cloned())
            .envs(settings.iter().cloned())
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

    /// Stops every process as [`stop`](Self::stop) does, then notes the lines they printed
    /// that were not read yet: once they exited, their pipes are closed.
    pub(crate) fn stop_and_note(&mut self, within: Duration, observer: &mut impl Observer) {
        self.stop(within);
        while let Some(line) = self.next_line(Instant::now() + Duration::from_millis(100)) {
            observer.note(&line);
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

/// Where the Python package `requirement` (whose module is `module`) is installed for the
/// tests: a folder of the cache of its own, filled with pip the first time. `None`, said
/// loudly, when pip cannot install it outside CI (`test` is what is skipped then); in CI that
/// is a failure.
pub(crate) fn python_package(requirement: &str, module: &str, test: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    let dir = cache.join("bindery").join("python").join(requirement);
    if dir.join(module).join("__init__.py").is_file() {
        return Some(dir);
    }
    let install = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .arg(requirement)
        .spawn();
    let in_ci = std::env::var_os("CI").is_some();
    match install {
        Ok(mut pip) => {
            let what = format!("pip install {requirement}");
            match (
                wait_within(&mut pip, Duration::from_secs(600), &what).success(),
                in_ci,
            ) {
                (true, _) => Some(dir),
                (false, true) => panic!("{what} failed; CI runs {test} with it"),
                (false, false) => {
                    bindery::test::shout(&format!(
                        "!!!!!!!! SKIPPING {test}: {what} failed !!!!!!!!"
                    ));
                    None
                }
            }
        }
        Err(error) if !in_ci => {
            bindery::test::shout(&format!(
                "!!!!!!!! SKIPPING {test}: python3 does not run ({error}) !!!!!!!!"
            ));
            None
        }
        Err(error) => panic!("python3 does not run ({error}); CI runs {test}"),
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
