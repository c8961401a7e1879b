//! Call metrics: every call that reaches the gRPC services, whatever its door.
use std::collections::HashMap;

use super::{CallLabels, HandledLabels, Metrics, Transport, TransportLabels};

/// One call's end, recorded once: when `finish` is called, else when dropped (the
/// client went away first: CANCELLED).
pub struct CallTimer {
    pub(super) metrics: Metrics,
    pub(super) labels: Option<CallLabels>,
    pub(super) start: std::time::Instant,
    /// A streaming call: counted open, and its messages counted.
    pub(super) streaming: bool,
}

impl CallTimer {
    pub fn finish(&mut self, code: &'static str) {
        let Some(labels) = self.labels.take() else {
            return;
        };
        let inner = &self.metrics.inner;
        if self.streaming {
            inner.streams_open.get_or_create(&labels).dec();
        }
        inner
            .handling
            .get_or_create(&labels)
            .observe(self.start.elapsed().as_secs_f64());
        inner
            .in_flight
            .get_or_create(&TransportLabels {
                transport: labels.transport,
            })
            .dec();
        inner
            .handled
            .get_or_create(&HandledLabels {
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                transport: labels.transport,
                grpc_code: code,
            })
            .inc();
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

/// Every `/package.Service/Method` in the descriptor sets, and whether it streams.
pub fn known_paths(sets: &[&prost_types::FileDescriptorSet]) -> HashMap<String, bool> {
    let mut out = HashMap::new();
    for set in sets {
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    out.insert(
                        format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                        method.server_streaming() || method.client_streaming(),
                    );
                }
            }
        }
    }
    out
}

/// Counts every call that reaches the gRPC services, whatever its door: it sits inside
/// tonic-web (grpc-web is gRPC by then) and the edge's REST calls come through it too;
/// the door is the [`Transport`] the per-call middleware or the edge put on the request.
pub async fn record_calls(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let transport = request
        .extensions()
        .get::<Transport>()
        .copied()
        .unwrap_or(Transport::Grpc);
    let mut timer = metrics.start(request.uri().path(), transport);
    let response = next.run(request).await;
    if let Some(code) = grpc_code(response.headers()) {
        timer.finish(code);
        return response;
    }
    let sent = timer.streaming.then(|| {
        let labels = timer.labels.clone();
        (
            metrics.messages_sent_counter(labels),
            crate::edge::frames::FramePrefixes::default(),
        )
    });
    response.map(|body| {
        axum::body::Body::new(TimedBody {
            inner: body,
            timer,
            sent,
        })
    })
}

fn grpc_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(crate::edge::errors::code_name(tonic::Code::from_i32(code)))
}

pin_project_lite::pin_project! {
    /// A response body that records its call's code from the trailers.
    struct TimedBody {
        #[pin]
        inner: axum::body::Body,
        timer: CallTimer,
        sent: Option<(
            prometheus_client::metrics::counter::Counter,
            crate::edge::frames::FramePrefixes,
        )>,
    }
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_code) {
                    this.timer.finish(code);
                }
                if let (Some(data), Some((counter, messages))) = (f.data_ref(), this.sent.as_mut())
                {
                    let n = messages.feed(data, |_| {});
                    if n > 0 {
                        counter.inc_by(n);
                    }
                }
            }
            // A body that ended without trailers is not a complete gRPC answer.
            None => this.timer.finish("UNKNOWN"),
            Some(Err(_)) => {}
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
