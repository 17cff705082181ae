//! bindery against hand-written clients with the same guarantees.
//!
//! ```text
//! scripts/with-brokers cargo run --release -p bindery-bench -- all
//! cargo run --release -p bindery-bench -- memory --n 1000000 --rounds 5
//! ```
//!
//! Each pipeline consumes JSON orders from an input destination, computes invoices, publishes
//! them to an output destination and acknowledges an order only after the broker confirmed its
//! invoice. Within one run the sides alternate (raw, bindery, raw, bindery, ...) so machine
//! noise hits both alike; the medians are reported as a table and written as JSON.

mod kafka;
mod measure;
mod memory;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
mod pipeline;
mod rabbit;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use serde::Serialize;

use measure::{median, Latency, Throughput};

/// The offered rate of the latency runs, as a share of the raw side's throughput: below
/// saturation of the whole machine (broker, producer, pipeline and reader share two cores).
const LATENCY_LOAD: f64 = 0.2;

/// Which implementation of the pipeline runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// Hand-written on the raw client (on memory: tokio channels).
    Raw,
    /// bindery with default settings.
    Bindery,
}

impl Side {
    fn name(self, pipeline: &str) -> &'static str {
        match (self, pipeline) {
            (Side::Raw, "kafka") => "rdkafka, hand-written",
            (Side::Raw, "rabbit") => "lapin, hand-written",
            (Side::Raw, _) => "tokio channels (floor)",
            (Side::Bindery, _) => "bindery, default settings",
        }
    }
}

struct Options {
    pipelines: Vec<&'static str>,
    n: Option<u64>,
    rounds: usize,
    latency_seconds: f64,
    soak: u64,
    max_rate: f64,
    json: String,
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        pipelines: Vec::new(),
        n: None,
        rounds: 3,
        latency_seconds: 5.0,
        soak: 5_000_000,
        max_rate: f64::INFINITY,
        json: "bench-results.json".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "kafka" => options.pipelines.push("kafka"),
            "rabbit" => options.pipelines.push("rabbit"),
            "memory" => options.pipelines.push("memory"),
            "all" => options.pipelines.extend(["memory", "rabbit", "kafka"]),
            "--n" => options.n = Some(number(&value("--n")?)?),
            "--rounds" => options.rounds = number(&value("--rounds")?)? as usize,
            "--latency-seconds" => {
                options.latency_seconds = number(&value("--latency-seconds")?)? as f64
            }
            "--soak" => options.soak = number(&value("--soak")?)?,
            "--json" => options.json = value("--json")?,
            "--smoke" => {
                options.n = Some(300);
                options.rounds = 1;
                options.latency_seconds = 1.0;
                options.soak = 20_000;
                options.max_rate = 500.0;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if options.pipelines.is_empty() {
        return Err("name a pipeline: kafka, rabbit, memory or all".to_owned());
    }
    options.rounds = options.rounds.max(1);
    Ok(options)
}

fn number(text: &str) -> Result<u64, String> {
    text.replace('_', "")
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))
}

#[derive(Debug, Default, Serialize)]
struct SideReport {
    side: String,
    throughput_runs: Vec<Throughput>,
    latency_runs: Vec<Latency>,
    messages_per_second: f64,
    cpu_seconds_per_million: f64,
    peak_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl SideReport {
    fn summarise(&mut self) {
        let t = &self.throughput_runs;
        self.messages_per_second = median(t.iter().map(|r| r.messages_per_second).collect());
        self.cpu_seconds_per_million =
            median(t.iter().map(|r| r.cpu_seconds_per_million).collect());
        self.peak_rss_mib = median(t.iter().map(|r| r.peak_rss_mib).collect());
        self.p50_ms = median(self.latency_runs.iter().map(|r| r.p50_ms).collect());
        self.p99_ms = median(self.latency_runs.iter().map(|r| r.p99_ms).collect());
    }
}

#[derive(Debug, Serialize)]
struct PipelineReport {
    pipeline: String,
    messages: u64,
    rounds: usize,
    raw: SideReport,
    bindery: SideReport,
    throughput_ratio: f64,
    cpu_ratio: f64,
    p99_ratio: f64,
    soak_rss_mib: Option<(f64, f64)>,
}

async fn run_pipeline(name: &'static str, options: &Options) -> Result<PipelineReport, String> {
    let n = options.n.unwrap_or(match name {
        "rabbit" => 50_000,
        _ => 200_000,
    });
    let kafka = match name {
        "kafka" => Some(kafka::Kafka::connect()?),
        _ => None,
    };
    let rabbit = match name {
        "rabbit" => Some(rabbit::Rabbit::connect().await?),
        _ => None,
    };
    let mut reports = BTreeMap::new();
    for side in [Side::Raw, Side::Bindery] {
        reports.insert(
            side.name(name),
            SideReport {
                side: side.name(name).to_owned(),
                ..SideReport::default()
            },
        );
    }
    for round in 1..=options.rounds {
        for side in [Side::Raw, Side::Bindery] {
            eprintln!(
                "{name}: round {round}/{}: {} draining {n}",
                options.rounds,
                side.name(name)
            );
            let result = match name {
                "kafka" => kafka.as_ref().expect("kafka").throughput(side, n).await,
                "rabbit" => rabbit.as_ref().expect("rabbit").throughput(side, n).await,
                _ => memory::throughput(side, n).await,
            }?;
            eprintln!("  {:.0} msg/s", result.messages_per_second);
            reports
                .get_mut(side.name(name))
                .expect("side")
                .throughput_runs
                .push(result);
        }
    }
    let raw_rate = median(
        reports[Side::Raw.name(name)]
            .throughput_runs
            .iter()
            .map(|r| r.messages_per_second)
            .collect(),
    );
    if name != "memory" {
        let rate = (raw_rate * LATENCY_LOAD).clamp(10.0, options.max_rate);
        for round in 1..=options.rounds {
            for side in [Side::Raw, Side::Bindery] {
                eprintln!(
                    "{name}: round {round}/{}: {} at {rate:.0} msg/s for latency",
                    options.rounds,
                    side.name(name)
                );
                let seconds = options.latency_seconds;
                let result = match name {
                    "kafka" => {
                        kafka
                            .as_ref()
                            .expect("kafka")
                            .latency(side, rate, seconds)
                            .await
                    }
                    _ => {
                        rabbit
                            .as_ref()
                            .expect("rabbit")
                            .latency(side, rate, seconds)
                            .await
                    }
                }?;
                reports
                    .get_mut(side.name(name))
                    .expect("side")
                    .latency_runs
                    .push(result);
            }
        }
    }
    let soak_rss_mib = match name {
        "memory" if options.soak > 0 => {
            eprintln!(
                "memory: {} messages through bindery, watching RSS",
                options.soak
            );
            Some(memory::soak(options.soak).await?)
        }
        _ => None,
    };
    let mut raw = reports.remove(Side::Raw.name(name)).expect("raw");
    let mut bindery = reports.remove(Side::Bindery.name(name)).expect("bindery");
    raw.summarise();
    bindery.summarise();
    Ok(PipelineReport {
        pipeline: name.to_owned(),
        messages: n,
        rounds: options.rounds,
        throughput_ratio: bindery.messages_per_second / raw.messages_per_second,
        cpu_ratio: bindery.cpu_seconds_per_million / raw.cpu_seconds_per_million,
        p99_ratio: bindery.p99_ms / raw.p99_ms,
        raw,
        bindery,
        soak_rss_mib,
    })
}

/// A pipeline running on a broker, until stopped.
pub(crate) enum Running {
    /// The hand-written pipeline, with the switch that stops it.
    Raw(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<Result<(), String>>,
    ),
    Bindery(bindery::RunningApplication),
}

impl Running {
    pub(crate) async fn stop(self) -> Result<(), String> {
        match self {
            Running::Raw(stop, task) => {
                stop.send_replace(true);
                task.await.map_err(|e| e.to_string())?
            }
            Running::Bindery(app) => app.shutdown().await.map_err(|e| e.to_string()),
        }
    }
}

/// Starts the `#[stream_function]` `bill` from `input` to `output` in `group` at default
/// settings, on a binder of `binder_type` whose `connection_key` (`brokers`, `uri`) is
/// `connection`.
pub(crate) async fn bindery_pipeline(
    binder_type: &str,
    connection_key: &str,
    connection: &str,
    (input, output, group): (&str, &str, &str),
) -> Result<bindery::RunningApplication, String> {
    let toml = format!(
        r#"
        [stream]
        default-binder = "{binder_type}"
        function.definition = "bill"
        [stream.binders.{binder_type}]
        type = "{binder_type}"
        {connection_key} = "{connection}"
        [stream.bindings.bill-in-0]
        destination = "{input}"
        group = "{group}"
        [stream.bindings.bill-out-0]
        destination = "{output}"
        "#
    );
    bindery_app(&toml).await
}

/// Starts the `#[stream_function]` `bill` with `toml` as its whole configuration.
async fn bindery_app(toml: &str) -> Result<bindery::RunningApplication, String> {
    bindery::application()
        .config_str("bench.toml", toml)
        .environment(Vec::<(String, String)>::new())
        .build()
        .map_err(|e| e.to_string())?
        .start()
        .await
        .map_err(|e| e.to_string())
}

fn verdict(holds: bool) -> &'static str {
    if holds {
        "holds"
    } else {
        "not met"
    }
}

/// A latency figure for the table: empty where none was measured (the memory pipeline).
fn cell(value: f64, unit: &str) -> String {
    match value.is_finite() {
        true => format!("{value:.1}{unit}"),
        false => String::new(),
    }
}

fn print(report: &PipelineReport) {
    println!(
        "\n## {} ({} messages, median of {} rounds)\n",
        report.pipeline, report.messages, report.rounds
    );
    println!("| side | msg/s | CPU s per 1M msg | peak RSS MiB | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for side in [&report.raw, &report.bindery] {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {} | {} |",
            side.side,
            side.messages_per_second,
            side.cpu_seconds_per_million,
            side.peak_rss_mib,
            cell(side.p50_ms, ""),
            cell(side.p99_ms, "")
        );
    }
    println!(
        "| bindery / {} | {:.1} % | {:.1} % | | | {} |",
        if report.pipeline == "memory" {
            "floor"
        } else {
            "raw"
        },
        report.throughput_ratio * 100.0,
        report.cpu_ratio * 100.0,
        cell(report.p99_ratio * 100.0, " %")
    );
    println!();
    if report.pipeline == "memory" {
        let rate = report.bindery.messages_per_second;
        println!(
            "- target ≥ 1,000,000 msg/s through a function: {} ({rate:.0})",
            verdict(rate >= 1e6)
        );
        println!(
            "- target ≥ 50 % of the tokio-channel floor: {} ({:.1} %)",
            verdict(report.throughput_ratio >= 0.5),
            report.throughput_ratio * 100.0
        );
        if let Some((warm, end)) = report.soak_rss_mib {
            let growth = (end - warm) / warm * 100.0;
            println!(
                "- target RSS grows < 10 % after warm-up: {} ({warm:.1} MiB → {end:.1} MiB, {growth:+.1} %)",
                verdict(growth < 10.0)
            );
        }
    } else {
        println!(
            "- target throughput ≥ 95 % of raw: {}",
            verdict(report.throughput_ratio >= 0.95)
        );
        println!(
            "- target CPU per message ≤ 110 % of raw: {}",
            verdict(report.cpu_ratio <= 1.10)
        );
        println!(
            "- target p99 latency ≤ 120 % of raw: {}",
            verdict(report.p99_ratio <= 1.20)
        );
    }
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let options = match parse() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("bindery-bench: {error}\nusage: bindery-bench kafka|rabbit|memory|all [--n N] [--rounds R] [--latency-seconds S] [--soak N] [--json PATH] [--smoke]");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let options = Arc::new(options);
    // On a worker thread like any service's code, not on the thread blocked in `block_on`.
    let run = options.clone();
    let reports = runtime
        .block_on(runtime.spawn(async move {
            let mut reports = Vec::new();
            for name in run.pipelines.clone() {
                reports.push(run_pipeline(name, &run).await?);
            }
            Ok::<_, String>(reports)
        }))
        .unwrap_or_else(|e| Err(e.to_string()));
    let reports = match reports {
        Ok(reports) => reports,
        Err(error) => {
            eprintln!("bindery-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "# bindery-bench, {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    for report in &reports {
        print(report);
    }
    match serde_json::to_string_pretty(&reports) {
        Ok(json) => {
            if let Err(error) = std::fs::write(&options.json, json) {
                eprintln!("bindery-bench: writing {}: {error}", options.json);
                return ExitCode::FAILURE;
            }
            println!("\nwritten to {}", options.json);
        }
        Err(error) => eprintln!("bindery-bench: {error}"),
    }
    ExitCode::SUCCESS
}
