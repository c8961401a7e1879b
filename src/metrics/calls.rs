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
    pub fn finish(&mut self, code: &str) {
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
                grpc_code: code.to_owned(),
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
    let mut timer = metrics.start(metrics.call_labels(request.uri().path(), transport));
    let response = next.run(request).await;
    if let Some(code) = grpc_code(response.headers()) {
        timer.finish(code);
        return response;
    }
    let sent = timer.streaming.then(|| {
        let labels = timer.labels.clone();
        (
            metrics.messages_sent_counter(labels),
            MessageCounter::default(),
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
    Some(crate::edge::calls::code_name(tonic::Code::from_i32(code)))
}

pin_project_lite::pin_project! {
    /// A response body that records its call's code from the trailers.
    struct TimedBody {
        #[pin]
        inner: axum::body::Body,
        timer: CallTimer,
        sent: Option<(prometheus_client::metrics::counter::Counter, MessageCounter)>,
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
                    let n = messages.feed(data);
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

/// Counts the gRPC messages in a response's data frames (each a 5-byte prefix with
/// its length, then the message; frames split and join messages freely).
#[derive(Default)]
struct MessageCounter {
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Prefix bytes of the next message seen so far.
    prefix: [u8; 5],
    have: usize,
}

impl MessageCounter {
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut complete = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining as usize).min(data.len());
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                self.have = 0;
                complete += 1;
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
            }
        }
        complete
    }
}

#[cfg(test)]
mod tests {
    use super::MessageCounter;

    #[test]
    fn messages_are_counted_across_and_within_frames() {
        let message = |len: u32| {
            let mut m = vec![0u8];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len as usize));
            m
        };
        let mut all = Vec::new();
        for len in [3, 0, 10, 1] {
            all.extend(message(len));
        }
        // One frame with all four; then the same bytes one at a time.
        assert_eq!(MessageCounter::default().feed(&all), 4);
        let mut c = MessageCounter::default();
        assert_eq!(all.iter().map(|b| c.feed(&[*b])).sum::<u64>(), 4);
        let mut c = MessageCounter::default();
        let (a, b) = all.split_at(7);
        assert_eq!(c.feed(a) + c.feed(b), 4);
    }
}
