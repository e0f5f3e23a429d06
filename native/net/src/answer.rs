//! Waiting, on the transport thread, for the VM's answer to what it was just handed.
//!
//! A request that crosses to the VM is usually answered at once (a ping, a
//! `gen_server:call`): the VM hands the answer back to the transport thread a few
//! microseconds later. If that thread has gone to sleep meanwhile, the answer waits for
//! it to be woken, which on a small or virtual machine costs about as much again; the
//! thread's wake-ups from the VM were most of what the idle round trip spent beyond the
//! bare transport's (README, "Known limits"). So after handing the VM a packet someone
//! may be waiting for, the thread stays awake a little, giving its core to anyone who
//! wants it, until the VM sends something or [`ANSWER_WAIT`] passes.
//!
//! Only while it pays: the thread keeps a running share of the waits that ended with an
//! answer, and waits only while that share is at least a quarter. Where answers stop
//! (a one-way stream of small messages, calls that take a while) it falls below that
//! within a dozen waits, and the thread then waits only every [`PROBE_EVERY`]th time,
//! to notice when answers come again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The longest a transport thread stays awake for an answer.
pub const ANSWER_WAIT: Duration = Duration::from_micros(25);
/// The share of waits answered, in 1/256ths, moving an eighth of the way to each
/// wait's outcome; waits go on at or above a quarter.
const ALL: u32 = 256;
const ENOUGH: u32 = ALL / 4;
/// Out of the handovers made while answers stopped coming, those that wait anyway.
const PROBE_EVERY: u32 = 32;

/// One node's record of how its waits went (the transport thread is per node).
#[derive(Debug)]
pub struct AnswerWait {
    score: AtomicU32,
    handovers: AtomicU32,
}

impl Default for AnswerWait {
    fn default() -> Self {
        Self::new()
    }
}

impl AnswerWait {
    pub const fn new() -> Self {
        AnswerWait {
            score: AtomicU32::new(ALL),
            handovers: AtomicU32::new(0),
        }
    }

    /// After a handover of a packet someone may be waiting for: should the thread wait
    /// for the answer?
    pub fn worth_waiting(&self) -> bool {
        let n = self.handovers.fetch_add(1, Ordering::Relaxed);
        self.score.load(Ordering::Relaxed) >= ENOUGH || n.is_multiple_of(PROBE_EVERY)
    }

    /// How a wait ended.
    pub fn record(&self, answered: bool) {
        let score = self.score.load(Ordering::Relaxed);
        let score = if answered {
            score + (ALL - score) / 8
        } else {
            score - score / 8
        };
        self.score.store(score.min(ALL), Ordering::Relaxed);
    }

    /// Stays awake, yielding the core at every turn, until `answered()` or
    /// [`ANSWER_WAIT`]; records and returns whether the answer came.
    pub fn wait(&self, answered: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        let came = loop {
            std::thread::yield_now();
            if answered() {
                break true;
            }
            if start.elapsed() >= ANSWER_WAIT {
                break false;
            }
        };
        self.record(came);
        came
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_go_on_while_a_quarter_are_answered_and_then_only_as_probes() {
        let w = AnswerWait::new();
        assert!(w.worth_waiting(), "at first, answers are expected");
        // Half of the waits answered: the thread keeps waiting.
        for i in 0..200 {
            w.record(i % 2 == 0);
            assert!(w.worth_waiting());
        }
        // None answered: within a dozen misses it stops, but for one probe in 32.
        let misses = (1..100)
            .find(|_| {
                w.record(false);
                (0..PROBE_EVERY).filter(|_| w.worth_waiting()).count() <= 1
            })
            .unwrap_or(100);
        assert!(misses <= 12, "{misses} misses before the waits stopped");
        let waits = (0..PROBE_EVERY * 4).filter(|_| w.worth_waiting()).count();
        assert_eq!(waits, 4, "one probe in every {PROBE_EVERY}");
        // Answers again: a few hits bring the waits back.
        for _ in 0..4 {
            w.record(true);
        }
        assert!((0..10).all(|_| w.worth_waiting()));
    }

    #[test]
    fn a_wait_ends_at_the_answer_or_after_its_time() {
        let w = AnswerWait::new();
        let t = Instant::now();
        assert!(w.wait(|| true));
        assert!(t.elapsed() < ANSWER_WAIT * 40);
        let t = Instant::now();
        assert!(!w.wait(|| false));
        assert!(t.elapsed() >= ANSWER_WAIT);
        let calls = std::cell::Cell::new(0);
        assert!(w.wait(|| {
            calls.set(calls.get() + 1);
            calls.get() == 3
        }));
        assert_eq!(calls.get(), 3);
    }
}
