//! What the multi-service examples share: the log on standard error, `--service` and the
//! other flags, and the configuration they stand for, given as environment variables.

#![allow(dead_code)] // each example uses its own part of this

use std::str::FromStr;

pub(crate) type Failed = Box<dyn std::error::Error>;

/// The log goes to standard error (`RUST_LOG`, default `warn`): standard output is what the
/// services did.
pub(crate) fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
}

/// The services a process runs: the consuming functions bound, and whether it also runs the
/// one that sends (orders, sentences), which is no function.
pub(crate) struct Services {
    pub(crate) functions: Vec<String>,
    pub(crate) sends: bool,
}

impl Services {
    /// Every service: the default, a first look in one process.
    pub(crate) fn all(functions: &[&str]) -> Self {
        Services {
            functions: functions.iter().map(|s| s.to_string()).collect(),
            sends: true,
        }
    }

    /// The services of `--service a,b`, among `functions` and the sender `sender`.
    pub(crate) fn chosen(list: &str, sender: &str, functions: &[&str]) -> Result<Self, String> {
        let mut chosen: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
        chosen.sort();
        chosen.dedup();
        if let Some(unknown) = chosen
            .iter()
            .find(|s| *s != sender && !functions.contains(&s.as_str()))
        {
            return Err(format!("no service is called `{unknown}`"));
        }
        Ok(Services {
            sends: chosen.iter().any(|s| s == sender),
            functions: chosen.into_iter().filter(|s| s != sender).collect(),
        })
    }

    /// Whether this process runs every service, and so can see a run through on its own.
    pub(crate) fn everything(&self, functions: &[&str]) -> bool {
        self.sends && self.functions.len() == functions.len()
    }
}

/// The flags of the command line, one at a time.
pub(crate) struct Flags {
    args: std::iter::Skip<std::env::Args>,
    usage: String,
}

impl Flags {
    /// The process's flags; `usage` is shown with every mistake.
    pub(crate) fn new(usage: String) -> Self {
        Flags {
            args: std::env::args().skip(1),
            usage,
        }
    }

    pub(crate) fn next_flag(&mut self) -> Option<String> {
        self.args.next()
    }

    /// The value after `flag`.
    pub(crate) fn value(&mut self, flag: &str) -> Result<String, Failed> {
        self.args
            .next()
            .ok_or_else(|| self.error(&format!("`{flag}` needs a value")))
    }

    /// The value after `flag`, parsed.
    pub(crate) fn parsed<T: FromStr>(&mut self, flag: &str) -> Result<T, Failed> {
        let value = self.value(flag)?;
        value
            .parse()
            .map_err(|_| self.error(&format!("`{flag}` takes a whole number, not `{value}`")))
    }

    /// A mistake on the command line, with the usage.
    pub(crate) fn error(&self, problem: &str) -> Failed {
        format!("{problem}; usage: {}", self.usage).into()
    }
}

/// The environment with `set` over it, as if those variables were set: each flag only stands
/// for configuration, so bindery checks it as it checks any setting.
pub(crate) fn environment_with(set: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut environment: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| !set.iter().any(|(own, _)| own.eq_ignore_ascii_case(name)))
        .collect();
    environment.extend(set);
    environment
}

/// The functions chosen are the ones bound: `stream.function.definition`.
pub(crate) fn definition(services: &Services) -> Vec<(String, String)> {
    match services.functions.is_empty() {
        true => Vec::new(),
        false => vec![(
            "BINDERY_STREAM__FUNCTION__DEFINITION".into(),
            services.functions.join(";"),
        )],
    }
}
