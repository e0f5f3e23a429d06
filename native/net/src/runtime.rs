//! The runtime quinn runs on: the carrier's own tokio runtime, with two additions. A
//! connection's driver (the future that turns what was written into packets and sends them)
//! can also be polled by a thread that has just written to that connection; and the
//! transport thread waits a little for the next packet before it sleeps ([`BusyPoll`]).
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

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

/// How the transport thread waits for its next packet: for a short while it keeps its
/// core, looking at the socket between `sched_yield`s, and only then sleeps in the
/// kernel.
///
/// Why: on a quiet link every packet found the transport thread asleep, and the kernel
/// took 10–30 µs (on the 2-core development VM) to wake it, once on each node of every
/// round trip, on top of waking the BEAM scheduler the packet is for. The VM's own
/// schedulers wait the same way before they sleep (`+sbwt`). The wait ends as soon as a
/// datagram is in the socket or another thread hands the runtime work (a scheduler's
/// write, say), and it is only made while packets come close together: after a longer
/// sleep than [`BUSY_POLL_AFTER`] windows the thread sleeps at once, so an idle link
/// costs nothing. What it does cost is measured where there are more busy threads than
/// cores: five nodes on two cores (the soak) got through about an eighth fewer
/// one-at-a-time operations; operators of such hosts set the window to zero.
pub(crate) struct BusyPoll {
    /// A second handle on the endpoint's socket, only to peek at it.
    socket: std::net::UdpSocket,
    window: Duration,
    /// What `parked_at` counts from.
    epoch: Instant,
    /// When the thread last began to wait, in nanoseconds from `epoch`.
    parked_at: AtomicU64,
    /// Whether the last wait ended within [`BUSY_POLL_AFTER`] windows.
    expect_soon: AtomicBool,
}

/// How many windows apart packets may come for the thread to wait for the next one: a
/// conversation or a stream of calls, not a tick every few seconds.
const BUSY_POLL_AFTER: u32 = 4;

impl BusyPoll {
    pub(crate) fn new(
        socket: &std::net::UdpSocket,
        window: Duration,
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(BusyPoll {
            socket: socket.try_clone()?,
            window,
            epoch: Instant::now(),
            parked_at: AtomicU64::new(0),
            expect_soon: AtomicBool::new(false),
        }))
    }

    /// tokio's `on_thread_park`: returns when the thread may sleep.
    pub(crate) fn before_park(&self) {
        let start = Instant::now();
        self.parked_at
            .store(self.since_epoch(start), Ordering::Relaxed);
        if self.window.is_zero() || !self.expect_soon.load(Ordering::Relaxed) {
            return;
        }
        // The runtime being parked (this is called inside its `block_on`). Not kept in
        // `self`: the runtime keeps `self` in its hooks, and the cycle would keep both,
        // and the socket, after the carrier stops.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let metrics = runtime.metrics();
        let mut peek = [0u8; 1];
        while start.elapsed() < self.window {
            // Tasks woken from other threads wait in the runtime's global queue.
            if metrics.global_queue_depth() > 0 {
                return;
            }
            match self.socket.peek_from(&mut peek) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let yielded = Instant::now();
                    std::thread::yield_now();
                    if yielded.elapsed() > self.window / 2 {
                        // Another thread had the core for a while: the machine is busy,
                        // and waiting on would take time it needs (a sleeping thread is
                        // woken when the packet comes, a yielding one only when the core
                        // is given back).
                        self.expect_soon.store(false, Ordering::Relaxed);
                        return;
                    }
                }
                // A datagram (the runtime's poll reads it at once), or an error: either
                // way the thread may sleep as it would have.
                _ => return,
            }
        }
    }

    /// tokio's `on_thread_unpark`.
    pub(crate) fn after_unpark(&self) {
        let waited = self
            .since_epoch(Instant::now())
            .saturating_sub(self.parked_at.load(Ordering::Relaxed));
        let soon = self.window.saturating_mul(BUSY_POLL_AFTER).as_nanos();
        self.expect_soon
            .store(u128::from(waited) <= soon, Ordering::Relaxed);
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far longer than any wait the tests expect to end early.
    const LONG: Duration = Duration::from_secs(10);
    /// Long enough that a loaded machine's scheduling does not decide a test.
    const WINDOW: Duration = Duration::from_millis(100);

    fn socket() -> std::net::UdpSocket {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        socket
    }

    /// A busy poll as the transport thread's hooks drive it, on a runtime of its own.
    struct Thread {
        busy: Arc<BusyPoll>,
        runtime: tokio::runtime::Runtime,
    }

    impl Thread {
        /// Just woken from a short sleep, so its next park waits.
        fn new(socket: &std::net::UdpSocket, window: Duration) -> Thread {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let thread = Thread {
                busy: BusyPoll::new(socket, window).unwrap(),
                runtime,
            };
            thread.park();
            thread.busy.after_unpark();
            thread
        }

        /// How long `before_park` kept the thread, inside the runtime as the hook is.
        fn park(&self) -> Duration {
            let _inside = self.runtime.enter();
            let start = Instant::now();
            self.busy.before_park();
            start.elapsed()
        }
    }

    #[test]
    fn with_nothing_to_do_the_thread_waits_out_its_window_then_sleeps() {
        let socket = socket();
        let waited = Thread::new(&socket, WINDOW).park();
        assert!(waited >= WINDOW, "{waited:?}");

        let waited = Thread::new(&socket, Duration::ZERO).park();
        assert!(waited < WINDOW / 2, "{waited:?}");
    }

    #[test]
    fn after_a_long_sleep_the_thread_sleeps_at_once_until_packets_come_close_again() {
        let socket = socket();
        let thread = Thread::new(&socket, WINDOW);
        thread.park();
        // The kernel's sleep, longer than four windows.
        std::thread::sleep(WINDOW * 5);
        thread.busy.after_unpark();
        let waited = thread.park();
        assert!(waited < WINDOW / 2, "{waited:?}");
        // Woken again within four windows: the next park waits.
        std::thread::sleep(WINDOW / 10);
        thread.busy.after_unpark();
        let waited = thread.park();
        assert!(waited >= WINDOW, "{waited:?}");
    }

    #[test]
    fn a_datagram_ends_the_wait_and_is_left_for_the_runtime_to_read() {
        let socket = socket();
        let to = socket.local_addr().unwrap();
        let thread = Thread::new(&socket, LONG);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let from = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            from.send_to(b"ping", to).unwrap();
        });
        let waited = thread.park();
        assert!(waited < LONG / 4, "{waited:?}");
        sender.join().unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
    }

    #[test]
    fn work_handed_over_by_another_thread_ends_the_wait() {
        let socket = socket();
        let thread = Thread::new(&socket, LONG);
        let handle = thread.runtime.handle().clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // As a BEAM scheduler's write wakes a task of the transport thread.
            drop(handle.spawn(async {}));
        });
        let waited = thread.park();
        assert!(waited < LONG / 4, "{waited:?}");
        waker.join().unwrap();
    }
}
