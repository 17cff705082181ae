//! How a failed handling is described: what went wrong, and whether a retry can help.

use std::any::{type_name, Any};
use std::fmt;

/// Why handling a message failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    kind: FailureKind,
    type_name: String,
    message: String,
}

/// The kinds of [`Failure`]: they decide whether a retry can help.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The payload could not be decoded into the handler's argument: retrying cannot help.
    Decode,
    /// The handler returned an error.
    Handler,
    /// The handler panicked.
    Panic,
    /// The handler's return value could not be encoded: retrying cannot help.
    Encode,
    /// An output could not be sent or was not confirmed.
    Send,
}

impl Failure {
    /// A failure of `kind`, reported as `type_name` with `message`.
    pub fn new(
        kind: FailureKind,
        type_name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Failure {
            kind,
            type_name: type_name.into(),
            message: message.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error's type, as in the `x-exception-type` header.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The error's text, as in the `x-exception-message` header.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether handling the message again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            FailureKind::Decode | FailureKind::Encode => false,
            FailureKind::Handler | FailureKind::Panic | FailureKind::Send => true,
        }
    }

    pub(crate) fn panic(text: String) -> Self {
        Failure::new(FailureKind::Panic, "panic", text)
    }

    pub(crate) fn decode<T>(why: impl fmt::Display) -> Self {
        Failure::new(
            FailureKind::Decode,
            "bindery::DecodeError",
            format!("cannot decode the payload as `{}`: {why}", type_name::<T>()),
        )
    }

    pub(crate) fn encode<T>(why: impl fmt::Display) -> Self {
        Failure::new(
            FailureKind::Encode,
            "bindery::EncodeError",
            format!("cannot encode `{}`: {why}", type_name::<T>()),
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.type_name)
    }
}

/// The text of a panic's payload, for logs and the `x-exception-message` header.
pub(crate) fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        format!("handler panicked: {text}")
    } else if let Some(text) = panic.downcast_ref::<String>() {
        format!("handler panicked: {text}")
    } else {
        "handler panicked".to_owned()
    }
}
