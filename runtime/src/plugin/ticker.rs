//! The epoch ticker: call time limits are counted in epoch ticks, and the ticker moves the
//! engine's epoch on only while guest code runs. An idle process (a source read to its end, a
//! stream that pauses) then does not wake a hundred times a second for nothing.
//!
//! Every entry into guest code holds a [`Running`] guard, taken before the store's deadline is
//! armed; the first guard wakes the ticker, the last one lets it sleep. A deadline is a number of
//! ticks after the epoch at arming time, so a ticker that slept meanwhile changes nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How many guest calls run, and the ticker's wake-up.
#[derive(Default)]
pub(crate) struct Ticker {
    running: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Held while guest code runs: the epoch ticks.
pub(crate) struct Running(Arc<Ticker>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Guest code is about to run (hold the guard until it returned or trapped).
    pub(crate) fn running(self: &Arc<Self>) -> Running {
        if self.running.fetch_add(1, Ordering::SeqCst) == 0 {
            // Under the lock: the ticker either has not checked `running` yet or waits already.
            let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_one();
        }
        Running(self.clone())
    }

    /// Ends [`Ticker::run`] (within a second).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_one();
    }

    /// The ticker's loop: every `every` while a guard is held, `tick()`; asleep otherwise. Ends
    /// when stopped or when `tick` returns false (the engine is gone).
    pub(crate) fn run(&self, every: Duration, mut tick: impl FnMut() -> bool) {
        loop {
            let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            while self.running.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
                held = self
                    .wake
                    .wait_timeout(held, Duration::from_secs(1))
                    .map(|(h, _)| h)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            drop(held);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(every);
            if !tick() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn the_epoch_ticks_only_while_guest_code_runs() {
        let ticker = Arc::new(Ticker::default());
        let ticks = Arc::new(AtomicU64::new(0));
        let thread = {
            let (ticker, ticks) = (ticker.clone(), ticks.clone());
            std::thread::spawn(move || {
                ticker.run(Duration::from_millis(2), || {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    true
                })
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ticks.load(Ordering::SeqCst), 0, "idle: no tick");

        // (Generous sleeps: the test must hold on a loaded machine, where a thread may wait
        // tens of milliseconds for a core.)
        let running = ticker.running();
        let nested = ticker.running();
        std::thread::sleep(Duration::from_millis(200));
        drop(nested);
        let during = ticks.load(Ordering::SeqCst);
        assert!(during >= 5, "{during} ticks while a call ran");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            ticks.load(Ordering::SeqCst) > during,
            "one call still runs: still ticking"
        );
        drop(running);
        std::thread::sleep(Duration::from_millis(200));
        let after = ticks.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ticks.load(Ordering::SeqCst), after, "idle again: no tick");

        ticker.stop();
        thread.join().expect("the ticker thread");
    }
}
