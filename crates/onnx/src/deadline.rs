//! Deadlines of model runs: one watchdog thread per process holds the runs in flight ordered
//! by deadline and sets ONNX Runtime's terminate flag on each run that passes its own. The
//! runtime checks the flag between operators (also inside `Loop`, `Scan` and `If` bodies), so
//! a run stops at the first operator boundary after its deadline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use ort::session::RunOptions;

/// A run being watched.
struct Entry {
    options: Arc<RunOptions>,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    runs: BTreeMap<(Instant, u64), Entry>,
}

#[derive(Default)]
struct Watchdog {
    state: Mutex<State>,
    changed: Condvar,
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            while let Some(entry) = state.runs.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let entry = entry.remove();
                entry.fired.store(true, Ordering::SeqCst);
                if let Err(e) = entry.options.terminate() {
                    tracing::warn!(error = %e, "could not terminate a run past its deadline");
                }
            }
            state = match state.runs.keys().next() {
                Some(&(deadline, _)) => {
                    let wait = deadline.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("modelhub-run-deadlines".into())
            .spawn(move || dog.run())
            .expect("spawning the run deadline thread");
        dog
    })
}

/// A run registered with the watchdog; dropping it (when the run returns) unregisters it.
#[derive(Debug)]
pub(crate) struct Watch {
    key: (Instant, u64),
    fired: Arc<AtomicBool>,
}

impl Watch {
    /// Terminates the run of `options` once `deadline` has passed.
    pub(crate) fn start(options: Arc<RunOptions>, deadline: Instant) -> Watch {
        let dog = watchdog();
        let fired = Arc::new(AtomicBool::new(false));
        let mut state = dog.lock();
        let key = (deadline, state.next_id);
        state.next_id += 1;
        let earliest = state.runs.keys().next().is_none_or(|first| key < *first);
        state.runs.insert(
            key,
            Entry {
                options,
                fired: fired.clone(),
            },
        );
        drop(state);
        if earliest {
            dog.changed.notify_one();
        }
        Watch { key, fired }
    }

    /// Whether the watchdog terminated the run.
    pub(crate) fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        watchdog().lock().runs.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn runs_past_their_deadline_are_marked_and_others_are_not() {
        crate::init().unwrap();
        let late = Watch::start(Arc::new(RunOptions::new().unwrap()), Instant::now());
        let on_time = Watch::start(
            Arc::new(RunOptions::new().unwrap()),
            Instant::now() + Duration::from_secs(3600),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !late.fired() {
            assert!(Instant::now() < deadline, "the watchdog never fired");
            std::thread::yield_now();
        }
        assert!(!on_time.fired());
        let key = on_time.key;
        drop(on_time);
        assert!(!watchdog().lock().runs.contains_key(&key));
    }
}
