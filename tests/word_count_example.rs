//! The word_count example, run as a deployment runs it: the splitter, two counters of one
//! group on a destination partitioned in two, and the totals printer, as separate processes of
//! the one example binary, on RabbitMQ and on Kafka, with nothing but environment variables
//! differing. The processes are the README's five terminals: on RabbitMQ its commands run as
//! written, through `cargo run`; on Kafka the binary runs with the same flags. Every count is exact, each word is counted by the
//! one counter that owns its partition, and the counts of a word come out in order.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bindery::partition::partition_of_key;
use support::{
    field, on_kafka, on_rabbitmq, readme_commands, wait_within, Deployment, Line, Observer, Reaped,
    RunEnvironment, Typed,
};

/// Kafka group joins on a small broker can take tens of seconds.
const DEADLINE: Duration = Duration::from_secs(240);

/// What the services printed.
#[derive(Default)]
struct Counts {
    /// Per word, each count a counter printed, with the counter's process.
    counted: BTreeMap<String, Vec<(&'static str, u64)>>,
    /// Per word, each count `totals` read, in the order it read them.
    totals: BTreeMap<String, Vec<u64>>,
    /// The count each word must reach, as the sentence service printed it.
    expected: BTreeMap<String, u64>,
    /// How many words the sentence service announced before their counts.
    expected_words: Option<usize>,
}

impl Observer for Counts {
    fn note(&mut self, line: &Line) {
        let text = &line.text;
        if text.starts_with("expected-words ") {
            self.expected_words = field(text, "words").and_then(|n| n.parse().ok());
        }
        let (Some(word), Some(count)) = (field(text, "word"), field(text, "count")) else {
            return;
        };
        let Ok(count) = count.parse::<u64>() else {
            return;
        };
        let word = word.to_owned();
        match text.split_whitespace().next() {
            Some("count") => self
                .counted
                .entry(word)
                .or_default()
                .push((line.from, count)),
            Some("totals") => self.totals.entry(word).or_default().push(count),
            Some("expected") => {
                self.expected.insert(word, count);
            }
            _ => {}
        }
    }
}

impl Counts {
    /// Whether `totals` has read every word's final count.
    fn complete(&self) -> bool {
        self.expected_words == Some(self.expected.len())
            && self.expected.iter().all(|(word, expected)| {
                self.totals
                    .get(word)
                    .is_some_and(|seen| seen.contains(expected))
            })
    }
}

/// The environment of a deployment on `broker`, with destinations (and on Kafka groups) of this
/// run's own.
fn of_this_run(broker: &str, environment: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut run = RunEnvironment::new(broker, environment);
    let sentences = run.destination("sentences");
    let words = run.destination("words");
    let counts = run.destination("word-counts");
    run.output("SENTENCE_OUT_0", &sentences);
    run.output("SPLIT_OUT_0", &words);
    run.output("COUNT_OUT_0", &counts);
    for (binding, destination, group) in [
        ("SPLIT_IN_0", &sentences, "splitter"),
        ("COUNT_IN_0", &words, "counter"),
        ("TOTALS_IN_0", &counts, "totals"),
    ] {
        let group = run.group(group);
        run.input(binding, destination, &group);
    }
    run.finish()
}

/// The process a terminal of the README's word_count deployment runs, named as the test
/// reports it.
fn process_of(terminal: &Typed) -> &'static str {
    let args = terminal.example_args();
    let value = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    match (value("--service"), value("--instance")) {
        (Some("totals"), None) => "totals",
        (Some("split"), None) => "split",
        (Some("count"), Some("0")) => "counter-0",
        (Some("count"), Some("1")) => "counter-1",
        (Some("sentences"), None) => "sentences",
        _ => panic!(
            "README.md: a word_count terminal this test does not know: `{}`",
            terminal.line
        ),
    }
}

/// Runs the README's five terminals of a word_count deployment on `broker`: `as_written`, the
/// commands exactly as the README gives them (`cargo run ...`); otherwise the example binary
/// with the same flags.
fn count_words_in_a_deployment(broker: &str, environment: Vec<(String, String)>, as_written: bool) {
    let environment = of_this_run(broker, environment);
    let mut deployment = match as_written {
        true => Deployment::as_written("word_count", environment),
        false => Deployment::new("word_count", environment),
    };
    let terminals = readme_commands("in five terminals:");
    assert_eq!(terminals.len(), 5, "README.md: five terminals");
    let (sentences, services) = terminals.split_last().expect("five terminals");
    assert_eq!(
        process_of(sentences),
        "sentences",
        "README.md: the last terminal sends"
    );
    let deadline = Instant::now() + DEADLINE;
    let mut counts = Counts::default();
    for terminal in services {
        let name = process_of(terminal);
        if as_written {
            deployment.start_as_written(name, terminal);
        } else {
            deployment.start(name, &terminal.example_args());
        }
    }
    deployment.wait_until_ready(services.len(), deadline, broker, &mut counts);

    let mut sending = Reaped(if as_written {
        deployment.spawn_as_written("sentences", sentences)
    } else {
        deployment.spawn("sentences", &sentences.example_args())
    });
    while !counts.complete() {
        if let Ok(Some(status)) = sending.0.try_wait() {
            assert!(status.success(), "{broker}: the sentence service failed");
        }
        if !deployment.watch(broker, deadline, &mut counts) {
            panic!(
                "{broker}: within {DEADLINE:?}, totals read {} of {} words' final counts (expected {:?}, read {:?})",
                counts
                    .expected
                    .iter()
                    .filter(|(word, n)| counts.totals.get(*word).is_some_and(|seen| seen.contains(n)))
                    .count(),
                counts.expected.len(),
                counts.expected,
                counts.totals,
            );
        }
    }
    let status = wait_within(
        &mut sending.0,
        Duration::from_secs(60),
        "the sentence service",
    );
    assert!(status.success(), "{broker}: the sentence service failed");
    deployment.stop_and_note(Duration::from_secs(30), &mut counts);

    let mut words_by_counter: BTreeMap<&str, usize> = BTreeMap::new();
    for (word, expected) in &counts.expected {
        let counted = counts
            .counted
            .get(word)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let owner = format!("counter-{}", partition_of_key(word.as_bytes(), 2));
        for (counter, count) in counted {
            assert_eq!(
                *counter, owner,
                "{broker}: `{word}` (count {count}) was counted by {counter}, but its partition belongs to {owner}"
            );
        }
        let Some((counter, _)) = counted.first() else {
            panic!("{broker}: no counter printed a count of `{word}`, yet totals read it");
        };
        *words_by_counter.entry(*counter).or_default() += 1;
        let numbers: Vec<u64> = counted.iter().map(|(_, count)| *count).collect();
        let exact: Vec<u64> = (1..=*expected).collect();
        assert_eq!(
            numbers, exact,
            "{broker}: the counts of `{word}`, each once and in order"
        );
        assert_eq!(
            counts.totals.get(word),
            Some(&exact),
            "{broker}: totals read the counts of `{word}` once each, in order"
        );
    }
    assert_eq!(
        words_by_counter.len(),
        2,
        "{broker}: both counters count a share of the words, got {words_by_counter:?}"
    );
    println!(
        "{broker}: {} words counted exactly; words per counter {words_by_counter:?}",
        counts.expected.values().sum::<u64>()
    );
}

#[test]
fn the_word_count_example_counts_exactly_in_one_process_on_memory() {
    let deployment = Deployment::new("word_count", vec![]);
    let mut run = Reaped(deployment.spawn("word_count", &["--repeat", "5"]));
    let status = wait_within(
        &mut run.0,
        Duration::from_secs(120),
        "the word_count example",
    );
    let mut summary = None;
    let mut counts = Counts::default();
    while let Some(line) = deployment.next_line(Instant::now() + Duration::from_secs(1)) {
        counts.note(&line);
        if line.text.starts_with("summary:") {
            summary = Some(line.text);
        }
    }
    assert!(status.success(), "the example failed: {summary:?}");
    let summary = summary.expect("the example prints a summary");
    assert!(
        counts
            .expected_words
            .is_some_and(|n| n > 0 && n == counts.expected.len()),
        "the example prints what it expects"
    );
    for (word, expected) in &counts.expected {
        assert!(
            summary
                .split_whitespace()
                .any(|count| count == format!("{word}={expected}")),
            "`{word}` must reach {expected}: {summary}"
        );
    }
}

/// The README's RabbitMQ commands, run exactly as written (with destinations of this run's own
/// in the environment).
#[test]
fn two_counters_count_each_word_once_on_rabbitmq_as_the_readme_runs_them() {
    if let Some(environment) = on_rabbitmq() {
        count_words_in_a_deployment("rabbit", environment, true);
    }
}

/// The README's deployment with the Kafka profile: the same flags, and the example binary.
#[test]
fn two_counters_count_each_word_once_on_kafka() {
    if let Some(environment) = on_kafka() {
        count_words_in_a_deployment("kafka", environment, false);
    }
}
