//! Call metrics: every call that reaches the gRPC services, whatever its door.
use std::{collections::HashMap, sync::OnceLock};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use tonic::Code;

use super::{CallLabels, HandledLabels, Metrics, Transport, TransportLabels};

/// One method's series on one door, taken from their families at its first call and
/// kept: a call then counts itself with a few atomic adds, where looking each series
/// up would hash its labels into five families under their locks (most of what the
/// call metrics cost per call, in `cargo bench --bench telemetry`). Taken lazily so a
/// method never called exports no series.
#[derive(Default)]
pub(super) struct CallSeries {
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    streams_open: OnceLock<Gauge>,
    messages_sent: OnceLock<Counter>,
    /// By gRPC code (0-16).
    handled: [OnceLock<Counter>; 17],
}

/// One call's end, recorded once: when `finish` is called, else when dropped (the
/// client went away first: CANCELLED).
pub struct CallTimer {
    metrics: Metrics,
    /// Index of the call's method in `Inner::paths`.
    path: usize,
    transport: Transport,
    start: std::time::Instant,
    /// A streaming call: counted open, and its messages counted.
    streaming: bool,
    finished: bool,
}

impl Metrics {
    /// A call starts; the returned value records its end when told or dropped.
    pub fn start(&self, path: &str, transport: Transport) -> CallTimer {
        let inner = &self.inner;
        let index = inner
            .by_path
            .get(path)
            .copied()
            .unwrap_or(inner.paths.len() - 1);
        let streaming = inner.paths[index].streaming;
        let series = self.series(index, transport);
        series
            .started
            .get_or_init(|| {
                inner
                    .started
                    .get_or_create(&self.labels(index, transport))
                    .clone()
            })
            .inc();
        self.in_flight(transport).inc();
        if streaming {
            self.streams_open(index, transport).inc();
        }
        CallTimer {
            metrics: self.clone(),
            path: index,
            transport,
            start: std::time::Instant::now(),
            streaming,
            finished: false,
        }
    }

    fn series(&self, index: usize, transport: Transport) -> &CallSeries {
        &self.inner.paths[index].series[transport as usize]
    }

    fn labels(&self, index: usize, transport: Transport) -> CallLabels {
        let path = &self.inner.paths[index];
        CallLabels {
            grpc_service: path.service,
            grpc_method: path.method,
            transport,
        }
    }

    fn in_flight(&self, transport: Transport) -> &Gauge {
        self.inner.in_flight_by[transport as usize].get_or_init(|| {
            self.inner
                .in_flight
                .get_or_create(&TransportLabels { transport })
                .clone()
        })
    }

    fn streams_open(&self, index: usize, transport: Transport) -> &Gauge {
        self.series(index, transport).streams_open.get_or_init(|| {
            self.inner
                .streams_open
                .get_or_create(&self.labels(index, transport))
                .clone()
        })
    }

    fn messages_sent(&self, index: usize, transport: Transport) -> Counter {
        self.series(index, transport)
            .messages_sent
            .get_or_init(|| {
                self.inner
                    .messages_sent
                    .get_or_create(&self.labels(index, transport))
                    .clone()
            })
            .clone()
    }
}

impl CallTimer {
    pub fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let (metrics, index, transport) = (&self.metrics, self.path, self.transport);
        let inner = &metrics.inner;
        let series = metrics.series(index, transport);
        if self.streaming {
            metrics.streams_open(index, transport).dec();
        }
        series
            .handling
            .get_or_init(|| {
                inner
                    .handling
                    .get_or_create(&metrics.labels(index, transport))
                    .clone()
            })
            .observe(self.start.elapsed().as_secs_f64());
        metrics.in_flight(transport).dec();
        let handled = || {
            let labels = metrics.labels(index, transport);
            inner
                .handled
                .get_or_create(&HandledLabels {
                    grpc_service: labels.grpc_service,
                    grpc_method: labels.grpc_method,
                    transport,
                    grpc_code: crate::edge::errors::code_name(code),
                })
                .clone()
        };
        match series.handled.get(code as usize) {
            Some(cell) => cell.get_or_init(handled).inc(),
            None => handled().inc(),
        };
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
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
///
/// A tower layer rather than `axum::middleware::from_fn`: that one boxes a clone of the
/// inner service and the call's future on every call, which showed in the measured
/// cost of instrumentation (`cargo bench --bench telemetry`).
#[derive(Clone)]
pub struct CallMetricsLayer(pub Metrics);

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallMetrics<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> tower::Service<axum::extract::Request> for CallMetrics<S>
where
    S: tower::Service<axum::extract::Request, Response = axum::response::Response>,
{
    type Response = axum::response::Response;
    type Error = S::Error;
    type Future = CallMetricsFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        let transport = request
            .extensions()
            .get::<Transport>()
            .copied()
            .unwrap_or(Transport::Grpc);
        let timer = self.metrics.start(request.uri().path(), transport);
        CallMetricsFuture {
            inner: self.inner.call(request),
            timer: Some(timer),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct CallMetricsFuture<F> {
        #[pin]
        inner: F,
        // Taken when the response arrives; dropped with the future (CANCELLED) before.
        timer: Option<CallTimer>,
    }
}

impl<F, E> std::future::Future for CallMetricsFuture<F>
where
    F: std::future::Future<Output = Result<axum::response::Response, E>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let Some(mut timer) = this.timer.take() else {
            return std::task::Poll::Ready(Ok(response));
        };
        if let Some(code) = grpc_code(response.headers()) {
            timer.finish(code);
            return std::task::Poll::Ready(Ok(response));
        }
        let sent = timer.streaming.then(|| {
            (
                timer.metrics.messages_sent(timer.path, timer.transport),
                crate::edge::frames::FramePrefixes::default(),
            )
        });
        std::task::Poll::Ready(Ok(response.map(|body| {
            axum::body::Body::new(TimedBody {
                inner: body,
                timer,
                sent,
            })
        })))
    }
}

fn grpc_code(headers: &http::HeaderMap) -> Option<Code> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(code))
}

pin_project_lite::pin_project! {
    /// A response body that records its call's code from the trailers.
    struct TimedBody {
        #[pin]
        inner: axum::body::Body,
        timer: CallTimer,
        sent: Option<(
            Counter,
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
            None => this.timer.finish(Code::Unknown),
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
