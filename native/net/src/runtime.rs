//! The runtime quinn runs on: the carrier's own tokio runtime, with one addition. A
//! connection's driver (the future that turns what was written into packets and sends them)
//! can also be polled by a thread that has just written to that connection.
//!
//! Why: a BEAM scheduler's send used to wait for the transport thread to wake before its
//! packet could leave. On the 2-core development VM that wake-up took 8–11 µs per node, so
//! about 20 µs of every idle round trip. Polled where it was written, a small packet on a
//! quiet link is on the wire when the NIF returns. The transport thread stays the driver's
//! home: it is still woken, and polls it for everything else (timers, received packets,
//! transmits that had to wait).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// quinn's [`quinn::Runtime`] for the carrier: tokio's, except that connection drivers
/// spawned inside [`capture_driver`] can be polled in place (see [`Driver`]).
pub(crate) struct TransportRuntime {
    handle: tokio::runtime::Handle,
}

impl TransportRuntime {
    pub(crate) fn new(handle: tokio::runtime::Handle) -> Self {
        TransportRuntime { handle }
    }
}

impl fmt::Debug for TransportRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransportRuntime")
    }
}

impl quinn::Runtime for TransportRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        // A driver polled on a BEAM scheduler may make its timer there.
        let _entered = self.handle.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Task) {
        let captured = CAPTURING.with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_mut() {
                Some(captured @ None) => {
                    let driver = Arc::new_cyclic(|me: &Weak<Driver>| Driver {
                        state: Mutex::new(DriverState {
                            future: Some(future),
                            waker: Waker::from(Arc::new(DriverWaker(me.clone()))),
                            polled: false,
                        }),
                        task: Mutex::new(None),
                        about_to_poll: AtomicUsize::new(0),
                        woken: AtomicBool::new(false),
                        handle: self.handle.clone(),
                    });
                    *captured = Some(driver.clone());
                    Ok(driver)
                }
                _ => Err(future),
            }
        });
        match captured {
            Ok(driver) => {
                self.handle.spawn(OnRuntime(driver));
            }
            Err(future) => {
                self.handle.spawn(future);
            }
        }
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _entered = self.handle.enter();
        Ok(Arc::new(UdpSocket(
            quinn::TokioRuntime.wrap_udp_socket(socket)?,
        )))
    }
}

/// The endpoint's socket as quinn's tokio runtime wraps it, except that a driver polled in
/// place sends only one datagram there (see [`IN_PLACE_TRANSMITS`]).
#[derive(Debug)]
struct UdpSocket(Arc<dyn quinn::AsyncUdpSocket>);

thread_local! {
    /// While a driver is polled in place: how many more transmits it may send here, each
    /// of one datagram. The first holds the packet just written (QUIC sends the quiet
    /// lane before a lane with a backlog); the rest, such as a bulk transfer's next
    /// datagrams, are the transport thread's, so that a scheduler does not encrypt and
    /// send them.
    static IN_PLACE_TRANSMITS: Cell<Option<usize>> = const { Cell::new(None) };
}

impl quinn::AsyncUdpSocket for UdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        // quinn's own poller underneath: it keeps a waker per connection, where the
        // socket keeps only one.
        Box::pin(Writable(self.0.clone().create_io_poller()))
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        // A driver polled in place asks this before its first transmit: one datagram.
        match IN_PLACE_TRANSMITS.get() {
            Some(_) => 1,
            None => self.0.max_transmit_segments(),
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }
}

/// quinn asks this before each transmit.
#[derive(Debug)]
struct Writable(Pin<Box<dyn quinn::UdpPoller>>);

impl quinn::UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<std::io::Result<()>> {
        match IN_PLACE_TRANSMITS.get() {
            Some(0) => {
                // The driver's task sends the rest: this wake-up reaches it when the poll
                // in place ends.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Some(left) => IN_PLACE_TRANSMITS.set(Some(left - 1)),
            None => {}
        }
        self.0.as_mut().poll_writable(cx)
    }
}

/// Sets [`IN_PLACE_TRANSMITS`] for a poll in place, and clears it however the poll ends.
struct InPlaceTransmits;

impl InPlaceTransmits {
    fn allow(transmits: usize) -> Self {
        IN_PLACE_TRANSMITS.set(Some(transmits));
        InPlaceTransmits
    }
}

impl Drop for InPlaceTransmits {
    fn drop(&mut self) {
        IN_PLACE_TRANSMITS.set(None);
    }
}

thread_local! {
    /// `Some` while [`capture_driver`] runs: the first task spawned then is a connection's
    /// driver (quinn spawns it as the connection is made, before anything else).
    static CAPTURING: RefCell<Option<Option<Arc<Driver>>>> = const { RefCell::new(None) };
}

/// Runs `make` (quinn's `connect_with` or `Incoming::accept_with`, on a
/// [`TransportRuntime`]) and returns what it made with the driver of the connection.
pub(crate) fn capture_driver<T>(make: impl FnOnce() -> T) -> (T, Option<Arc<Driver>>) {
    let outer = CAPTURING.with(|slot| slot.borrow_mut().replace(None));
    let made = make();
    let driver = CAPTURING.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), outer));
    (made, driver.flatten())
}

/// A connection's driver, polled by its task on the transport thread or, through
/// [`Driver::poll_here`], by a thread that wrote to the connection.
pub(crate) struct Driver {
    state: Mutex<DriverState>,
    /// The waker of the driver's task on the transport thread, from its last poll.
    task: Mutex<Option<Waker>>,
    /// Threads between [`Driver::about_to_poll`] and the end of their [`Driver::poll_here`]:
    /// while there are any, waking the driver only marks it `woken`.
    about_to_poll: AtomicUsize,
    woken: AtomicBool,
    handle: tokio::runtime::Handle,
}

struct DriverState {
    /// `None` once the driver has finished.
    future: Option<Task>,
    /// What the driver is polled with, wherever: quinn keeps the waker of the last poll
    /// and wakes it for the driver's next turn.
    waker: Waker,
    /// Whether the task has polled the driver yet.
    polled: bool,
}

/// Wakes the driver's task, except while a thread is about to poll the driver itself:
/// writing to a stream wakes the driver, and a thread that then polls it in place has no
/// need of the transport thread (waking it costs the writing thread a system call before
/// its packet leaves).
struct DriverWaker(Weak<Driver>);

impl Wake for DriverWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(driver) = self.0.upgrade() {
            driver.wake();
        }
    }
}

impl Driver {
    fn wake(&self) {
        if self.about_to_poll.load(Ordering::SeqCst) > 0 {
            self.woken.store(true, Ordering::SeqCst);
            // A poll that ended in between has not seen `woken`.
            if self.about_to_poll.load(Ordering::SeqCst) > 0 {
                return;
            }
            self.woken.store(false, Ordering::SeqCst);
        }
        self.wake_task();
    }

    fn wake_task(&self) {
        let task = self.task.lock().ok().and_then(|task| task.clone());
        if let Some(task) = task {
            task.wake();
        }
    }

    /// Says that this thread is about to poll the driver ([`PollHere::poll`]): until
    /// then, wake-ups of the driver (such as the one a write to its connection makes)
    /// wait for that poll. Dropped unpolled, the promise hands them to the driver's task.
    pub(crate) fn about_to_poll(self: &Arc<Self>) -> PollHere {
        self.about_to_poll.fetch_add(1, Ordering::SeqCst);
        PollHere(self.clone())
    }

    fn poll_once(&self) -> bool {
        let Ok(mut state) = self.state.try_lock() else {
            // Its task is polling it: whatever was written goes out in that poll or the
            // next, which the wake-up (if any) brings.
            self.woken.store(true, Ordering::SeqCst);
            return false;
        };
        let DriverState {
            future,
            waker,
            polled,
        } = &mut *state;
        let Some(task) = future.as_mut().filter(|_| *polled) else {
            self.woken.store(true, Ordering::SeqCst);
            return false;
        };
        // The wake-ups until now are this poll's to answer.
        self.woken.store(false, Ordering::SeqCst);
        let _entered = self.handle.enter();
        let one = InPlaceTransmits::allow(1);
        let done = task
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready();
        drop(one);
        if done {
            *future = None;
            // Lets the task see that the driver is done.
            self.woken.store(true, Ordering::SeqCst);
        }
        true
    }
}

/// A thread's promise to poll a connection's driver (see [`Driver::about_to_poll`]).
pub(crate) struct PollHere(Arc<Driver>);

impl PollHere {
    /// Polls the driver on this thread, unless another thread is polling it or its task
    /// has not polled it yet; then hands the driver's task any wake-up that came in the
    /// meantime. Returns whether it polled. A poll sends one datagram (unless the task
    /// left a transmit that found the socket full: quinn sends that first, up to a GSO
    /// batch of 10), but first takes in every datagram that waits for the connection,
    /// however many (tokio's task budget does not reach here): callers poll only while
    /// the peer sends little.
    pub(crate) fn poll(self) -> bool {
        self.0.poll_once()
    }
}

impl Drop for PollHere {
    fn drop(&mut self) {
        let driver = &self.0;
        driver.about_to_poll.fetch_sub(1, Ordering::SeqCst);
        if driver.woken.swap(false, Ordering::SeqCst) {
            driver.wake_task();
        }
    }
}

/// The driver's task on the transport thread.
struct OnRuntime(Arc<Driver>);

impl Drop for OnRuntime {
    /// The driver goes with its task (when the runtime shuts down, say), as it did on
    /// tokio's own runtime: polled elsewhere after that, its timer would panic.
    fn drop(&mut self) {
        let future = match self.0.state.lock() {
            Ok(mut state) => state.future.take(),
            Err(poisoned) => poisoned.into_inner().future.take(),
        };
        // Outside the lock: dropping the driver may wake it.
        drop(future);
    }
}

impl Future for OnRuntime {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Ok(mut task) = self.0.task.lock() {
            match task.as_ref() {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        // Blocking here is short: a poll elsewhere holds the lock for one turn of quinn.
        let Ok(mut state) = self.0.state.lock() else {
            // A poll elsewhere panicked: the connection's state cannot be trusted.
            return Poll::Ready(());
        };
        let DriverState {
            future,
            waker,
            polled,
        } = &mut *state;
        *polled = true;
        let Some(task) = future.as_mut() else {
            return Poll::Ready(());
        };
        if task
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready()
        {
            *future = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
