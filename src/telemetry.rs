//! Logs and traces.
//!
//! Logging: human or JSON lines, filtered by RUST_LOG (default `info`). Lines are
//! written by a thread of their own (tracing-appender): a slow reader of stdout (a full
//! pipe, a stalled log shipper) must not block the runtime's workers, which write a
//! line per call. If it falls 128,000 lines behind, new lines are dropped rather than
//! calls delayed.
//!
//! Traces: every call's span joins the trace of the caller's W3C `traceparent` (or
//! starts one), log lines carry its `trace_id`, and jobs keep the `traceparent` of the
//! call that created them for their workers. With an OTLP endpoint the spans are
//! exported (batched, from a thread of the SDK's own); without one they still carry
//! ids but are dropped when they end.
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::span;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, Targets, filter_fn},
    fmt,
    layer::Context,
    prelude::*,
};

use crate::config::LogFormat;

mod otlp;
mod protobuf;

/// Flushes the lines and spans still queued when dropped: hold it until the process ends.
#[must_use = "dropping it stops logging"]
pub struct Telemetry {
    _log: Option<WorkerGuard>,
    traces: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take() {
            // Spans of the last calls go out before the process ends.
            let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// Installs the global subscriber; a second call (tests) is a no-op. `otlp_endpoint`:
/// where spans are exported (OTLP over gRPC, e.g. `http://collector:4317`). Must run
/// inside the Tokio runtime (the exporter's client lives on it).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    init_with(format, otlp_endpoint, logs)
}

/// [`init`] with the log lines filtered by `logs` (spans are traced whatever it says).
pub fn init_with(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    logs: EnvFilter,
) -> anyhow::Result<Telemetry> {
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name("mediaplane")
            .build(),
    );
    let exporting = otlp_endpoint.is_some();
    if let Some(endpoint) = otlp_endpoint {
        let exporter = otlp::Exporter::new(endpoint)
            .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    // Spans only, and only ours: each event as a span event, and every dependency's
    // span, would cost more than the calls they describe.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("mediaplane"))
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        // Busy and idle time per span: two clock reads on every poll of every call.
        .with_tracked_inactivity(false)
        // Nothing here reads OpenTelemetry's thread-local context (trace context comes
        // from the span itself), so making it current on each poll of a call is waste.
        .with_context_activation(false);
    // Spans of ours at INFO and above (the calls'), with a level hint on both halves of
    // the filter (`and` has none if either half has none): without one the process's
    // maximum level is TRACE, and every `log::trace!` of a dependency (tokio-postgres
    // logs each message it reads) is turned into a tracing event only to be dropped,
    // about 1.4% of the server's CPU in a profile of `cargo bench --bench telemetry`.
    let ours = Targets::new().with_target("mediaplane", tracing::Level::INFO);
    let spans = filter_fn(|m| m.is_span()).with_max_level_hint(tracing::Level::INFO);
    let traces = LogOnlyFields(traces).with_filter(ours.and(spans));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    // Each layer filters for itself: RUST_LOG=warn quietens the log, not the traces.
    let registry = tracing_subscriber::registry().with(traces);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer)
                    .with_filter(logs),
            )
            .try_init(),
        LogFormat::Human => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_writer(writer)
                    .with_filter(logs),
            )
            .try_init(),
    };
    let installed = installed.is_ok();
    Ok(Telemetry {
        _log: installed.then_some(guard),
        traces: (installed && exporting).then_some(provider),
    })
}

/// Makes `span` (a call's, not yet entered) a child of the caller's `traceparent`, if
/// any, and returns the trace id it belongs to (for its log lines).
pub fn join_caller(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let span_ref = context.span();
    let sc = span_ref.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The W3C `traceparent` of the current span (the caller's trace, this call's span),
/// or `None` outside any traced span.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = TraceParent(None);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.0
}

/// Renames the current call's span: a REST call's span is first named after its path
/// (with ids in it), then after the RPC it reaches, so trace views group calls by what
/// they do, whatever their door.
pub fn rename_current_span(name: String) {
    tracing::Span::current().context().span().update_name(name);
}

/// The trace id in a `traceparent`, when it is well formed (version 00).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (Some("00"), Some(trace_id), Some(span_id), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(trace_id, 32) && hex(span_id, 16) && hex(flags, 2)).then_some(trace_id)
}

/// The OpenTelemetry layer, minus the span fields that only log lines need: a span's
/// `trace_id` field repeats its own trace id, and exporting it again as an attribute
/// would cost bytes and allocations on every exported span (the exporter's share of
/// a call's CPU grows with them).
struct LogOnlyFields<L>(L);

impl<S, L> Layer<S> for LogOnlyFields<L>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.0.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        // `span.record("trace_id", …)` comes alone (see `edge::calls`).
        let mut only_log_fields = true;
        values.record(
            &mut |field: &tracing::field::Field, _: &dyn std::fmt::Debug| {
                only_log_fields &= LOG_ONLY_FIELDS.contains(&field.name());
            },
        );
        if !only_log_fields {
            self.0.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.0.on_follows_from(id, follows, ctx);
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        self.0.on_event(event, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }

    // `Span::context()` and `set_parent` find the OpenTelemetry layer by downcasting
    // the dispatcher: it must still be found through this wrapper.
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded unchanged; the inner layer answers for its own types.
        unsafe { self.0.downcast_raw(id) }
    }
}

/// Span fields written to log lines but not exported as span attributes.
const LOG_ONLY_FIELDS: &[&str] = &["trace_id"];

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct TraceParent(Option<String>);

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::trace_id_of;

    /// The only test of this binary that installs the global subscriber.
    #[tokio::test]
    async fn the_process_level_is_the_logs_and_the_traces_not_trace() {
        let filter = tracing_subscriber::EnvFilter::new("info");
        let telemetry = super::init_with(crate::config::LogFormat::Human, None, filter).unwrap();
        assert!(
            telemetry._log.is_some(),
            "another test installed a subscriber first"
        );
        // `log` records of dependencies below this level stop at the `log` crate's own
        // check instead of becoming tracing events that every layer then drops.
        assert_eq!(
            tracing::level_filters::LevelFilter::current(),
            tracing::level_filters::LevelFilter::INFO
        );
    }

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(good), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of("00-4bf92f35-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of(&format!("{good}-x")), None);
        assert_eq!(trace_id_of(""), None);
    }
}
