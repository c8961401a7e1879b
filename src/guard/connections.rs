//! Connections are resources too: a cap on open connections in all and per client IP
//! (checked at accept, before a byte is read), a deadline for the first bytes (before
//! protocol detection) and for the protocol's handshake, and an idle deadline for a
//! connection with no call open. What is refused is closed at once: nothing was read,
//! so nothing is lost.
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{config::ConnectionLimits, edge::coalesce::OpenCalls};

/// File descriptors kept for everything but client connections (Postgres and Redis
/// pools, storage files, logs).
const RESERVED_FDS: u64 = 256;

/// Bytes that prove a client speaks: the HTTP/2 preface (24) and a frame header (9);
/// an HTTP/1 request line and its first header are longer.
const HANDSHAKE_BYTES: usize = 33;

/// Who may open a connection now.
#[derive(Clone)]
pub struct Admission {
    total: Arc<Semaphore>,
    max_total: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// An open connection's place; given back when dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Full,
    TooManyFromIp,
}

impl Admission {
    /// The configured caps, the total lowered to fit the process's file-descriptor limit.
    pub fn new(limits: &ConnectionLimits) -> Self {
        let max_total = match raise_fd_limit() {
            Some(fds) => limits
                .max_connections
                .min(fds.saturating_sub(RESERVED_FDS).max(16) as usize),
            None => limits.max_connections,
        };
        if max_total < limits.max_connections {
            tracing::warn!(
                configured = limits.max_connections,
                allowed = max_total,
                "the file-descriptor limit (ulimit -n) lowers the connection cap"
            );
        }
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            per_ip: Arc::default(),
            max_per_ip: limits.max_connections_per_ip,
        }
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.max_per_ip {
            return Err(Refused::TooManyFromIp);
        }
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        per_ip.insert(ip, n + 1);
        Ok(Admitted {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// Raises the soft file-descriptor limit to the hard one (as Go's runtime does) and
/// returns it; `None` where it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// Waits for the connection's first byte; false when the deadline passes first or
/// the peer closed.
pub async fn first_bytes(stream: &Lingering, deadline: Duration) -> bool {
    let Some(stream) = stream.tcp() else {
        return false;
    };
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(deadline, stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// Why a connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The server is shutting down (graceful).
    Drain,
    /// No call open for the idle deadline (graceful).
    Idle,
    /// The handshake did not arrive in time (dropped).
    Handshake,
}

/// Resolves when the connection should be closed: the server drains, the handshake
/// is late, or no call has been open for `idle` (checked four times per period, so
/// a quiet connection closes between `idle` and 1.25 × `idle`).
pub async fn close_when(
    open: &OpenCalls,
    seen: &BytesSeen,
    limits: &ConnectionLimits,
    draining: &CancellationToken,
) -> Close {
    let handshake_due = Instant::now() + limits.handshake_timeout;
    let check = (limits.idle_timeout / 4)
        .min(limits.handshake_timeout / 4)
        .max(Duration::from_millis(10));
    let mut last_busy = Instant::now();
    let mut last_started = open.started();
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shaken = false;
    loop {
        tokio::select! {
            () = draining.cancelled() => return Close::Drain,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let started = open.started();
        shaken = shaken || started > 0 || seen.get() >= HANDSHAKE_BYTES;
        if !shaken {
            if now >= handshake_due {
                return Close::Handshake;
            }
            continue;
        }
        if open.count() > 0 || started != last_started {
            last_busy = now;
            last_started = started;
        } else if now.duration_since(last_busy) >= limits.idle_timeout {
            return Close::Idle;
        }
    }
}

/// Bytes read from a connection, counted until the handshake is proven.
#[derive(Clone, Default)]
pub struct BytesSeen(Arc<AtomicUsize>);

impl BytesSeen {
    fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A socket that counts what it reads into [`BytesSeen`] (until the handshake's size).
pub struct Counted<T> {
    inner: T,
    seen: BytesSeen,
    done: bool,
}

impl<T> Counted<T> {
    pub fn new(inner: T, seen: BytesSeen) -> Self {
        Self {
            inner,
            seen,
            done: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.done {
            let read = buf.filled().len() - before;
            let total = self.seen.0.fetch_add(read, Ordering::Relaxed) + read;
            self.done = total >= HANDSHAKE_BYTES;
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a closed connection keeps reading what its client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// A client socket that closes the way RFC 9112 (9.6) asks: when the server is done
/// with it (dropped), its sending half is shut (the client reads every response to its
/// end), then what the client still sends (requests that crossed a GOAWAY, window
/// updates) is read and discarded until the client closes or [`LINGER`] passes.
/// Closing with unread bytes would send a reset instead, and the client's TCP stack may
/// discard responses it had received but not yet read: answers to committed calls.
/// The lingering runs on `tracker`, so a draining server waits for it.
/// Only a connection that carried calls lingers: one refused for silence or a late
/// handshake has nothing to deliver and is closed at once.
pub struct Lingering {
    stream: Option<TcpStream>,
    tracker: tokio_util::task::TaskTracker,
    calls: Option<OpenCalls>,
}

impl Lingering {
    pub fn new(stream: TcpStream, tracker: tokio_util::task::TaskTracker) -> Self {
        Self {
            stream: Some(stream),
            tracker,
            calls: None,
        }
    }

    /// Lingers on close if any of `calls` started.
    pub fn counting(mut self, calls: OpenCalls) -> Self {
        self.calls = Some(calls);
        self
    }

    pub fn tcp(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        let answered = self.calls.as_ref().is_some_and(|c| c.started() > 0);
        if !answered || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.tracker.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
