use std::fmt;

use crate::config::ConfigError;

/// A boxed error from a binder's broker client, kept as the source so callers can downcast it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in bindery, from configuration to shutdown.
///
/// `Debug` prints the same text as `Display`, so `fn main() -> Result<(), bindery::Error>`
/// shows a readable message rather than a struct dump.
#[non_exhaustive]
#[derive(thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; every problem found is listed with its file and key.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A binder could not connect, provision, subscribe or send.
    #[error("binder `{binder}`: {source}")]
    Binder {
        /// The binder's name in `[stream.binders]`, or its type.
        binder: String,
        /// The broker client's error.
        #[source]
        source: BoxError,
    },

    /// The broker refused a message for good (too large, not authorised, ...): sending it
    /// again cannot succeed, so the core dead-letters the input instead of retrying.
    #[error("binder `{binder}` refused the message: {source}")]
    Refused {
        /// The binder's name in `[stream.binders]`, or its type.
        binder: String,
        /// The broker client's error.
        #[source]
        source: BoxError,
    },

    /// A destination could not be used for a binding.
    #[error("binding `{binding}`: {message}")]
    Binding {
        /// The binding's name, such as `bill-in-0`.
        binding: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// A function registration is unusable (such as a supplier whose `poll` is not a duration).
    #[error("stream function `{function}`: {message}")]
    Function {
        /// The function's name.
        function: String,
        /// What went wrong and what to do.
        message: String,
    },

    /// A value could not be encoded for sending.
    #[error("could not encode the message for `{destination}`: {message}")]
    Encode {
        /// The destination or binding the value was meant for.
        destination: String,
        /// What went wrong.
        message: String,
    },

    /// The application is shutting down and no longer sends or receives.
    #[error("the application is shutting down; the message was not sent")]
    ShuttingDown,

    /// The management server could not start.
    #[error("management server: {message}")]
    Management {
        /// What went wrong and what to do.
        message: String,
    },

    /// Installing the Ctrl-C / SIGTERM handler failed.
    #[error("could not listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
}

impl Error {
    /// A send the broker refused for good; see [`Error::is_permanent`].
    pub fn refused(binder: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Refused {
            binder: binder.into(),
            source: source.into(),
        }
    }

    /// Whether sending the same message again cannot succeed. Every other send failure is
    /// retried by the core until it succeeds or the application stops.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Refused { .. } | Error::Encode { .. } => true,
            Error::Config(_)
            | Error::Binder { .. }
            | Error::Binding { .. }
            | Error::Function { .. }
            | Error::ShuttingDown
            | Error::Management { .. }
            | Error::Signal(_) => false,
        }
    }

    /// Wraps a binder's own error, naming the binder it came from.
    pub fn binder(binder: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Binder {
            binder: binder.into(),
            source: source.into(),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)?;
        let mut source = std::error::Error::source(self);
        // A transparent variant's source is itself; print only real causes.
        if matches!(self, Error::Config(_)) {
            source = None;
        }
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
