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
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

pin_project_lite::pin_project! {
    /// `conn`, polled only once the work runnable before its wake-up has run.
    pub struct Coalesced<F> {
        #[pin]
        conn: F,
        state: State,
        due: Arc<Due>,
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

pub fn coalesced<F: Future>(conn: F) -> Coalesced<F> {
    Coalesced {
        conn,
        state: State::Ready,
        due: Arc::default(),
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
    use std::sync::atomic::AtomicUsize;

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

    /// 100 tasks each queue a frame and wake the connection, as watch streams do: the
    /// connection sees them all in one poll instead of one poll per frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_connection_polls_once_for_frames_queued_together() {
        let (queued, waker) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let conn = tokio::spawn(coalesced(Conn {
            queued: queued.clone(),
            seen: Vec::new(),
            frames: 100,
            waker: Arc::clone(&waker),
        }));
        tokio::task::yield_now().await;
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
        let streams = spawner.await.unwrap();
        for s in streams {
            s.await.unwrap();
        }
        let seen = conn.await.unwrap();
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&100));
        // Uncoalesced it is polled after every frame (101 polls); the worker's driver
        // poll every 61 tasks may add one.
        assert!(seen.len() <= 4, "polled at {seen:?}");
    }
}
