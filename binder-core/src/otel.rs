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
    headers: &Headers,
    lineage: Lineage,
) -> (tracing::Span, Lineage) {
    let span = tracing::info_span!(
        "bindery.handle",
        otel.kind = "consumer",
        function = function,
        message_id = headers.get_str(header::MESSAGE_ID).unwrap_or_default(),
    );
    let parent = headers
        .get(header::TRACEPARENT)
        .and_then(|parent| remote_context(parent, headers.get(header::TRACESTATE)));
    if let Some(parent) = &parent {
        // Fails only when no OpenTelemetry layer records the span: nothing to continue then.
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

/// The remote context a `traceparent` (`00-<trace id>-<parent id>-<flags>`) names; `None` for
/// one that is not version 00 in that form, or names the invalid trace or span.
fn remote_context(parent: &Bytes, state: Option<&Bytes>) -> Option<SpanContext> {
    let text = std::str::from_utf8(parent).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
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
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "not a traceparent",
        ] {
            assert!(remote_context(&Bytes::from(bad), None).is_none(), "{bad}");
        }
    }
}
