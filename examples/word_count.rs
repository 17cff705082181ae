//! The classic stream-processing example: sentences on `sentences` are split into words, one
//! message per word keyed by the word, on `words`; `count` keeps a count per word and publishes
//! each new count on `word-counts`, keyed by the word; `totals` prints what it reads there.
//!
//! ```text
//! cargo run --example word_count                      # every service in one process, on memory
//! BINDERY_PROFILE=rabbit cargo run --example word_count
//! BINDERY_PROFILE=kafka cargo run --example word_count
//! ```
//!
//! `count` handles four words at once (`concurrency = 4`): the words of one key are handled in
//! order, so each count is exact. Two instances of `count` in one group must never count one
//! word both: with `--counters 2` the splitter partitions `words` by word in two, and counter
//! `--instance 0` receives one partition, `--instance 1` the other. That is the same on every
//! binder (Kafka partitions; a RabbitMQ queue per partition, `words.counter-0` and
//! `words.counter-1`), so a word's count never splits between them.
//!
//! ```text
//! BINDERY_PROFILE=rabbit cargo run --example word_count -- --service totals
//! BINDERY_PROFILE=rabbit cargo run --example word_count -- --counters 2 --service split
//! BINDERY_PROFILE=rabbit cargo run --example word_count -- --counters 2 --service count --instance 0
//! BINDERY_PROFILE=rabbit cargo run --example word_count -- --counters 2 --service count --instance 1
//! BINDERY_PROFILE=rabbit cargo run --example word_count -- --service sentences --repeat 10
//! ```
//!
//! `--counters N` and `--instance I` only set configuration, as these environment variables
//! would: `BINDERY_STREAM__BINDINGS__SPLIT_OUT_0__PRODUCER__PARTITION_COUNT=N` and
//! `BINDERY_STREAM__BINDINGS__COUNT_IN_0__CONSUMER__PARTITIONED=true`, `..__INSTANCE_COUNT=N`,
//! `..__INSTANCE_INDEX=I`. The configuration is `examples/word_count.toml`, with
//! `word_count-kafka.toml` and `word_count-rabbit.toml` beside it.
//!
//! Each line a service prints says what it did: `count pid=4711 instance=1 word=cat count=3`.
//! The counts live in the counter's memory, so a counter that restarts counts from zero.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bindery::prelude::*;
use common::{definition, environment_with, log_to_stderr, Failed, Flags, Services};
use tokio::sync::Notify;

/// What the sentence service sends, `--repeat` times.
const TEXT: &[&str] = &[
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on the mat",
    "the dog chased the cat off the log",
    "the cat ran up a tree and the dog sat under it",
];

/// The count of each word, kept by this counter.
static COUNTS: LazyLock<Mutex<HashMap<String, u64>>> = LazyLock::new(Mutex::default);
/// The latest count `totals` read of each word, for the summary of a run in one process.
static TOTALS: LazyLock<Mutex<BTreeMap<String, u64>>> = LazyLock::new(Mutex::default);
static PROGRESS: LazyLock<Notify> = LazyLock::new(Notify::new);
/// Set when every service runs in this process, which then prints a summary.
static SUMMARY: AtomicBool = AtomicBool::new(false);
/// This counter's `--instance`, for its lines.
static INSTANCE: AtomicU32 = AtomicU32::new(0);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The words of a sentence, lower-cased.
fn words(sentence: &str) -> impl Iterator<Item = String> + '_ {
    sentence
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
}

/// One message per word, keyed by the word: the key decides the partition, so every
/// occurrence of a word reaches the same counter.
#[stream_function(input = "sentences", output = "words", group = "splitter")]
async fn split(sentence: String) -> Vec<Message<String>> {
    words(&sentence)
        .map(|word| Message::builder(word.clone()).key(word).build())
        .collect()
}

/// Counts a word and publishes its new count, keyed by the word.
#[stream_function(input = "words", output = "word-counts", group = "counter")]
async fn count(word: String) -> Message<String> {
    let count = {
        let mut counts = lock(&COUNTS);
        let count = counts.entry(word.clone()).or_default();
        *count += 1;
        *count
    };
    println!(
        "count pid={} instance={} word={word} count={count}",
        std::process::id(),
        INSTANCE.load(Ordering::Relaxed)
    );
    Message::builder(format!("{word}: {count}"))
        .key(word)
        .build()
}

/// Prints each count it reads.
#[stream_function(input = "word-counts", group = "totals")]
async fn totals(update: String) {
    let Some((word, count)) = update.split_once(": ") else {
        eprintln!("not a `word: count` update: {update:?}");
        return;
    };
    let Ok(count) = count.parse::<u64>() else {
        eprintln!("not a count: {update:?}");
        return;
    };
    println!(
        "totals pid={} word={word} count={count}",
        std::process::id()
    );
    if SUMMARY.load(Ordering::Relaxed) {
        let mut totals = lock(&TOTALS);
        let latest = totals.entry(word.to_owned()).or_default();
        *latest = (*latest).max(count);
        PROGRESS.notify_one();
    }
}

/// The services that consume, by function name.
const SERVICES: &[&str] = &["split", "count", "totals"];

/// What to run, from the command line.
struct Options {
    services: Services,
    repeat: u64,
    counters: u32,
    instance: u32,
}

fn options() -> Result<Options, Failed> {
    let usage = format!(
        "word_count [--service sentences|{}[,...]] [--repeat N] [--counters N] [--instance I]",
        SERVICES.join("|")
    );
    let mut flags = Flags::new(usage);
    let mut options = Options {
        services: Services::all(SERVICES),
        repeat: 1,
        counters: 1,
        instance: 0,
    };
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--service" => {
                let list = flags.value(&flag)?;
                options.services = Services::chosen(&list, "sentences", SERVICES)
                    .map_err(|problem| flags.error(&problem))?;
            }
            "--repeat" => options.repeat = flags.parsed(&flag)?,
            "--counters" => options.counters = flags.parsed(&flag)?,
            "--instance" => options.instance = flags.parsed(&flag)?,
            other => return Err(flags.error(&format!("unknown argument `{other}`"))),
        }
    }
    if options.counters == 0 {
        return Err(flags.error("`--counters` is at least 1"));
    }
    let one_process = options.services.everything(SERVICES);
    if one_process && (options.counters > 1 || options.instance > 0) {
        return Err(flags.error("one process runs one counter; `--counters` and `--instance` are for a deployment of several (`--service count` in each counter's process)"));
    }
    Ok(options)
}

/// The configuration the options stand for: the functions bound, and with more than one
/// counter, the partitions of `words`. bindery checks it as any configuration (an
/// `--instance` out of range is an error naming `instance-index`).
fn configuration(options: &Options) -> Vec<(String, String)> {
    let mut set = definition(&options.services);
    if options.counters > 1 || options.instance > 0 {
        let counters = options.counters.to_string();
        let consumer = "BINDERY_STREAM__BINDINGS__COUNT_IN_0__CONSUMER__";
        set.push((
            "BINDERY_STREAM__BINDINGS__SPLIT_OUT_0__PRODUCER__PARTITION_COUNT".into(),
            counters.clone(),
        ));
        set.push((format!("{consumer}PARTITIONED"), "true".into()));
        set.push((format!("{consumer}INSTANCE_COUNT"), counters));
        set.push((
            format!("{consumer}INSTANCE_INDEX"),
            options.instance.to_string(),
        ));
    }
    set
}

/// The count each word of the text must reach once it was sent `repeat` times.
fn expected_counts(repeat: u64) -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    for word in TEXT.iter().flat_map(|sentence| words(sentence)) {
        *expected.entry(word).or_default() += repeat;
    }
    expected
}

/// Sends the text `repeat` times, each sentence once the broker confirmed the one before, then
/// prints the count each word must reach.
async fn send_text(bridge: &StreamBridge, repeat: u64) -> Result<(), bindery::Error> {
    for round in 0..repeat {
        for sentence in TEXT {
            bridge.send("sentence-out-0", sentence.to_string()).await?;
        }
        println!(
            "sentences pid={} round={} sentences={}",
            std::process::id(),
            round + 1,
            TEXT.len()
        );
    }
    let expected = expected_counts(repeat);
    println!(
        "expected-words pid={} words={}",
        std::process::id(),
        expected.len()
    );
    for (word, count) in expected {
        println!(
            "expected pid={} word={word} count={count}",
            std::process::id()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Failed> {
    log_to_stderr();
    let options = options()?;
    let services = &options.services;
    let everything = services.everything(SERVICES);
    SUMMARY.store(everything, Ordering::Relaxed);
    INSTANCE.store(options.instance, Ordering::Relaxed);
    let mut builder = bindery::application()
        .config_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/word_count.toml"
        ))
        .environment(environment_with(configuration(&options)));
    if services.functions.is_empty() {
        builder = builder.without_registered_functions();
    }
    let app = builder.build()?.start().await?;

    if services.sends {
        if let Err(error) = send_text(&app.bridge(), options.repeat).await {
            app.shutdown().await.ok();
            return Err(error.into());
        }
        if services.functions.is_empty() {
            return Ok(app.shutdown().await?);
        }
    }
    if !everything {
        // Services of a deployment: they run until Ctrl-C or SIGTERM.
        println!(
            "ready pid={} services={}",
            std::process::id(),
            services.functions.join(",")
        );
        return Ok(app.run_until_signal().await?);
    }
    let expected = expected_counts(options.repeat);
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while *lock(&TOTALS) != expected {
            PROGRESS.notified().await;
        }
    })
    .await;
    let totals = lock(&TOTALS).clone();
    let listed: Vec<String> = totals
        .iter()
        .map(|(word, count)| format!("{word}={count}"))
        .collect();
    println!(
        "summary: {} words in {} sentences; {}",
        expected.values().sum::<u64>(),
        TEXT.len() as u64 * options.repeat,
        listed.join(" ")
    );
    app.shutdown().await?;
    match waited {
        Ok(()) => Ok(()),
        Err(_) => Err(format!("the counts did not reach what was sent within 60 s; expected {expected:?}; is another process of the same groups running (`--service ...`) and taking a share, or did the `counter` group's queue keep words from an earlier run (RabbitMQ keeps queues: `rabbitmqctl delete_queue words.counter`)?").into()),
    }
}
