//! Trace propagation (feature `otel`): each handler call runs in a `tracing` span whose
//! OpenTelemetry parent is the input's W3C `traceparent` (and `tracestate`); what the call
//! sends carries the span's own context, so the next service continues the trace from this
//! span. The span reaches OpenTelemetry through the application's `tracing-opentelemetry`
//! layer; without one, there is no new span to hand on and the input's context travels as it
//! came, as without the feature.

use std::str::FromStr;

use bytes::Bytes;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::bridge::Lineage;
use crate::message::{header, Headers};

/// The span of one handler call of `function` on the message with `headers`, and the lineage
/// its outputs get: the span's context where OpenTelemetry gave it one.
pub(crate) fn handler_span(
    function: &str,
    message_id: &str,
    headers: &Headers,
    lineage: Lineage,
) -> (tracing::Span, Lineage) {
    let span = tracing::info_span!(
        "bindery.handle",
        otel.kind = "consumer",
        function = function,
        message_id = message_id,
    );
    if span.is_disabled() {
        return (span, lineage);
    }
    let parent = match headers.get(header::TRACEPARENT) {
        Some(parent) => match remote_context(parent, headers.get(header::TRACESTATE)) {
            Some(parent) => Some(parent),
            // Unreadable: handed on as it came rather than replaced by a trace of our own.
            None => return (span, lineage),
        },
        None => None,
    };
    if let Some(parent) = &parent {
        // Fails when no OpenTelemetry layer records the span (none installed, or one that
        // `tracing-opentelemetry` 0.34 does not find): nothing to continue then.
        let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
    }
    let own = span.context().span().span_context().clone();
    let continued = own.is_valid()
        && parent
            .as_ref()
            .map_or(true, |parent| parent.span_id() != own.span_id());
    let lineage = match continued {
        true => lineage.with_trace(traceparent(&own), tracestate(&own)),
        false => lineage,
    };
    (span, lineage)
}

/// The remote context a `traceparent` (`<version>-<trace id>-<parent id>-<flags>`, in
/// lowercase hex) names, as W3C Trace Context reads it: version `00` has exactly these four
/// fields; a later version is read by its first four, and may have more after them; `ff` and
/// the invalid trace or span ids are refused.
fn remote_context(parent: &Bytes, state: Option<&Bytes>) -> Option<SpanContext> {
    let text = std::str::from_utf8(parent).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let more = parts.next().is_some();
    let hex = |field: &str, digits: usize| {
        field.len() == digits
            && field
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || (version == "00" && more) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = state
        .and_then(|state| std::str::from_utf8(state).ok())
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    let context = SpanContext::new(trace, span, TraceFlags::new(flags), true, state);
    context.is_valid().then_some(context)
}

fn traceparent(context: &SpanContext) -> Bytes {
    Bytes::from(format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    ))
}

fn tracestate(context: &SpanContext) -> Option<Bytes> {
    let state = context.trace_state().header();
    (!state.is_empty()).then(|| Bytes::from(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_in_w3c_form_only() {
        let good = Bytes::from_static(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let context = remote_context(&good, None).expect("a valid traceparent");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context.is_sampled() && context.is_remote());
        let later = Bytes::from_static(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
        );
        assert!(
            remote_context(&later, None).is_some(),
            "a later version is read by its first four fields"
        );
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "not a traceparent",
        ] {
            assert!(remote_context(&Bytes::from(bad), None).is_none(), "{bad}");
        }
    }
}
