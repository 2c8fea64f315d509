//! Wake-ups between futures that share one task, kept inside the task.
//!
//! A resumable session ([`crate::session`]) runs its local reader, its
//! sender and its receiver as futures of one task, and they hand work to
//! each other through [`tokio::sync::Notify`]: the reader wakes the sender
//! for every chunk it reads. Such a wake arrives while the task is running.
//! Tokio's multi-thread scheduler treats a task woken during its own poll
//! as a yield: it goes to the back of the queue and an idle worker thread
//! is woken to steal it. In a bulk upload through `service-proxy` that was
//! an eventfd write, an `epoll_wait` and often a move to the other core,
//! with cold caches, for every 64 KiB read: twice the `epoll_wait` calls of
//! the plain pump and a quarter more CPU per byte (issue 11).
//!
//! [`Absorb`] polls its future with a waker of its own. A wake that comes
//! while the future is being polled (from the future itself) only asks for
//! another pass, which runs at once; a wake from anywhere else (the I/O
//! driver, a timer, another task) goes to the task as usual. Passes per poll
//! are bounded, so a future that keeps waking itself (tokio's cooperative
//! budget does, once spent) still yields to the scheduler.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Passes in one poll before a future that keeps waking itself is handed
/// back to the scheduler.
const MAX_PASSES: usize = 16;

/// Polls `future` so that the wake-ups it gives itself loop in place.
pub fn absorb<F: Future>(future: F) -> Absorb<F> {
    let state = Arc::new(WakeState {
        polling: AtomicBool::new(false),
        woken: AtomicBool::new(false),
        task: AtomicWaker::new(),
    });
    Absorb {
        future: Box::pin(future),
        waker: Waker::from(Arc::clone(&state)),
        state,
    }
}

/// The future [`absorb`] returns.
pub struct Absorb<F> {
    future: Pin<Box<F>>,
    state: Arc<WakeState>,
    waker: Waker,
}

struct WakeState {
    /// Set while the inner future is being polled.
    polling: AtomicBool,
    /// A wake came while `polling` was set.
    woken: AtomicBool,
    /// The task's own waker, for wakes from outside a poll.
    task: AtomicWaker,
}

impl Wake for WakeState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.polling.load(Ordering::SeqCst) {
            self.woken.store(true, Ordering::SeqCst);
        } else {
            self.task.wake();
        }
    }
}

impl<F: Future> Future for Absorb<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.state.task.register(context.waker());
        let mut inner_context = Context::from_waker(&this.waker);
        for _ in 0..MAX_PASSES {
            this.state.woken.store(false, Ordering::SeqCst);
            this.state.polling.store(true, Ordering::SeqCst);
            let poll = this.future.as_mut().poll(&mut inner_context);
            this.state.polling.store(false, Ordering::SeqCst);
            if poll.is_ready() {
                return poll;
            }
            // A wake between the poll's end and `polling` going false was
            // only recorded: it is seen here, so none is lost.
            if !this.state.woken.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        context.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    /// A waker that counts how often the task was woken.
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_from_inside_the_poll_is_a_pass_not_a_task_wake() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut context = Context::from_waker(&waker);
        let notify = Notify::new();
        let mut handed_over = false;
        // Two halves of one task: the second waits for what the first hands it.
        let future = std::future::poll_fn(|context| {
            let waiting = notify.notified();
            tokio::pin!(waiting);
            if !handed_over {
                // Register as a waiter, then hand over from "the other half".
                assert!(waiting.as_mut().poll(context).is_pending());
                handed_over = true;
                notify.notify_one();
                return Poll::Pending;
            }
            Poll::Ready("second pass")
        });
        let mut absorbed = absorb(future);
        let poll = Pin::new(&mut absorbed).poll(&mut context);
        assert_eq!(poll, Poll::Ready("second pass"));
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            0,
            "the task was not woken"
        );
    }

    #[test]
    fn a_wake_from_outside_reaches_the_task() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut context = Context::from_waker(&waker);
        let notify = Arc::new(Notify::new());
        let waiter = Arc::clone(&notify);
        let mut absorbed = absorb(async move { waiter.notified().await });
        assert!(Pin::new(&mut absorbed).poll(&mut context).is_pending());
        notify.notify_one();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut absorbed).poll(&mut context).is_ready());
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_after_a_bound() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut context = Context::from_waker(&waker);
        let passes = AtomicUsize::new(0);
        let future = std::future::poll_fn(|context| {
            passes.fetch_add(1, Ordering::SeqCst);
            context.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        let mut absorbed = absorb(future);
        assert!(Pin::new(&mut absorbed).poll(&mut context).is_pending());
        assert_eq!(passes.load(Ordering::SeqCst), MAX_PASSES);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "handed back once");
    }
}
