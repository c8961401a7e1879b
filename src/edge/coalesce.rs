//! Write coalescing for server connections.
//!
//! An HTTP/2 connection is one task that writes what its streams queued. When a
//! stream queues a frame, tokio runs the woken connection task right away (its "LIFO
//! slot"), so a progress event fanned out to the 125 watch streams of one connection
//! went out in about 60 writes of one or two frames each: a syscall and a trip
//! through the loopback TCP stack per write, on the server and again in the client.
//! Here a woken connection first lets every task already runnable on its worker run
//! (tokio's deferred wake-up, as `yield_now` uses: at the latest when the worker
//! would park, or at its next driver poll), then writes what they all queued at once.
//! Only while two or more calls are open on the connection: with one (every HTTP/1
//! connection, whose call also runs inside the connection's task) nobody else is
//! about to queue a frame, and waiting would only delay the call.
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker, ready},
};

use axum::{body::Body, response::Response};
use bytes::Bytes;

pin_project_lite::pin_project! {
    /// `conn`, polled only once the work runnable before its wake-up has run.
    pub struct Coalesced<F> {
        #[pin]
        conn: F,
        state: State,
        due: Arc<Due>,
        open: OpenCalls,
    }
}

/// The calls open on one connection: counted from the request until its response
/// body is dropped (ended, or the client went away). Also how many ever started, so
/// the connection's idle deadline can tell a quiet connection from a busy one.
#[derive(Clone, Default)]
pub struct OpenCalls(Arc<Counts>);

#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    started: AtomicUsize,
}

impl OpenCalls {
    pub fn count(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Calls started on the connection so far.
    pub fn started(&self) -> usize {
        self.0.started.load(Ordering::Relaxed)
    }

    fn open(&self) -> OpenCall {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        OpenCall(self.clone())
    }
}

struct OpenCall(OpenCalls);

impl Drop for OpenCall {
    fn drop(&mut self) {
        (self.0).0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's service: `inner`, with its calls counted in `open`.
#[derive(Clone)]
pub struct CountCalls<S> {
    inner: S,
    open: OpenCalls,
}

impl<S> CountCalls<S> {
    pub fn new(inner: S, open: OpenCalls) -> Self {
        Self { inner, open }
    }
}

impl<S, B> tower::Service<http::Request<B>> for CountCalls<S>
where
    S: tower::Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = CountedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        CountedCall {
            open: Some(self.open.open()),
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct CountedCall<F> {
        #[pin]
        inner: F,
        open: Option<OpenCall>,
    }
}

impl<F, E> Future for CountedCall<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx));
        let open = this.open.take();
        Poll::Ready(response.map(|r| match open {
            Some(open) => r.map(|body| Body::new(HoldingBody::new(body, open))),
            None => r,
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds `T` (a count, a slot) until it ends or is dropped.
    pub struct HoldingBody<T> {
        #[pin]
        inner: Body,
        _held: T,
    }
}

impl<T> HoldingBody<T> {
    pub fn new(inner: Body, held: T) -> Self {
        Self { inner, _held: held }
    }
}

impl<T> http_body::Body for HoldingBody<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

enum State {
    /// Poll the connection on the next poll.
    Ready,
    /// The connection is waiting; a wake-up now means it has work.
    Waiting,
    /// Put off until `due` fires; wake-ups before then are for work already coming.
    Deferred,
}

/// The deferred wake-up: marks itself fired, then wakes the connection's task.
#[derive(Default)]
struct Due {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Due {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F> Coalesced<F> {
    /// The connection inside, to shut it down gracefully.
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().conn
    }
}

/// `conn`, whose service counts its calls in `open`.
pub fn coalesced<F: Future>(conn: F, open: OpenCalls) -> Coalesced<F> {
    Coalesced {
        conn,
        state: State::Ready,
        due: Arc::default(),
        open,
    }
}

impl<F: Future> Future for Coalesced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        loop {
            match this.state {
                State::Ready => {
                    let out = this.conn.as_mut().poll(cx);
                    if out.is_pending() {
                        *this.state = State::Waiting;
                    }
                    return out;
                }
                State::Waiting if this.open.count() < 2 => *this.state = State::Ready,
                State::Waiting => {
                    this.due.fired.store(false, Ordering::Release);
                    if let Ok(mut task) = this.due.task.lock() {
                        *task = Some(cx.waker().clone());
                    }
                    let due = Waker::from(this.due.clone());
                    // Its first poll hands `due` to the worker's deferred list (outside a
                    // runtime it wakes `due` at once); the future itself is not needed.
                    let yielded = std::pin::pin!(tokio::task::yield_now())
                        .poll(&mut Context::from_waker(&due));
                    *this.state = State::Deferred;
                    if yielded.is_ready() {
                        *this.state = State::Ready;
                    }
                }
                State::Deferred => {
                    if !this.due.fired.load(Ordering::Acquire) {
                        return Poll::Pending;
                    }
                    *this.state = State::Ready;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each poll records how many frames were queued at that moment; pending until
    /// `frames` were seen.
    struct Conn {
        queued: Arc<AtomicUsize>,
        seen: Vec<usize>,
        frames: usize,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Conn {
        type Output = Vec<usize>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<usize>> {
            let n = self.queued.load(Ordering::SeqCst);
            self.seen.push(n);
            if n >= self.frames {
                return Poll::Ready(std::mem::take(&mut self.seen));
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// 100 tasks each queue a frame and wake the connection, as watch streams do, with
    /// `calls` calls open on it; returns what the connection saw at each of its polls.
    async fn polls_for_100_frames(calls: usize) -> Vec<usize> {
        let (queued, waker) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let open = OpenCalls::default();
        let calls: Vec<OpenCall> = (0..calls).map(|_| open.open()).collect();
        let conn = tokio::spawn(coalesced(
            Conn {
                queued: queued.clone(),
                seen: Vec::new(),
                frames: 100,
                waker: Arc::clone(&waker),
            },
            open,
        ));
        while waker.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        }
        // Spawned from a task on the worker, so they run one after another there.
        let spawner = {
            let (queued, waker) = (queued.clone(), waker.clone());
            tokio::spawn(async move {
                (0..100)
                    .map(|_| {
                        let (queued, waker) = (queued.clone(), waker.clone());
                        tokio::spawn(async move {
                            queued.fetch_add(1, Ordering::SeqCst);
                            if let Some(w) = waker.lock().unwrap().as_ref() {
                                w.wake_by_ref();
                            }
                        })
                    })
                    .collect::<Vec<_>>()
            })
        };
        for s in spawner.await.unwrap() {
            s.await.unwrap();
        }
        let seen = conn.await.unwrap();
        drop(calls);
        seen
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_connection_with_open_calls_polls_once_for_frames_queued_together() {
        let seen = polls_for_100_frames(2).await;
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&100));
        // Uncoalesced it is polled after every frame (101 polls); the worker's driver
        // poll every 61 tasks may add one.
        assert!(seen.len() <= 4, "polled at {seen:?}");
    }

    /// With one call open nothing is put off: polled after every frame, as hyper does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_connection_with_one_call_is_polled_at_once() {
        let seen = polls_for_100_frames(1).await;
        assert_eq!(seen, (0..=100).collect::<Vec<_>>());
    }

    /// A call counts from the request until its response body is dropped.
    #[tokio::test]
    async fn calls_count_until_their_body_is_dropped() {
        use tower::{Service, ServiceExt};
        let open = OpenCalls::default();
        let mut service = CountCalls::new(
            tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Body::from("x")))
            }),
            open.clone(),
        );
        let call = service.ready().await.unwrap().call(http::Request::new(()));
        assert_eq!(open.count(), 1);
        let response = call.await.unwrap();
        assert_eq!(open.count(), 1);
        let second = service.call(http::Request::new(()));
        assert_eq!(open.count(), 2);
        drop(second);
        assert_eq!(open.count(), 1);
        drop(response);
        assert_eq!(open.count(), 0);
    }
}
