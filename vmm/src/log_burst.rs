//! Repeated log lines folded into one line per burst: the first event of a burst is logged at once; events of
//! the same kind that follow within the burst's window ([`BURST_WINDOW`]) are only counted, and the next line
//! (the first event after the window, or [`Burst::flush`] at the end) says how many were folded into it.
//! Metrics keep the exact counts; the log stays readable when a process opens a file a thousand times or a
//! client floods the API.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of line may be written while events keep coming.
pub const BURST_WINDOW: Duration = Duration::from_secs(10);

/// One kind of repeated line.
#[derive(Debug)]
pub struct Burst {
    window: Duration,
    /// When the current burst's line was written, and how many events were folded since.
    state: Mutex<Option<(Instant, u64)>>,
}

impl Default for Burst {
    fn default() -> Self {
        Burst::new(BURST_WINDOW)
    }
}

impl Burst {
    pub const fn new(window: Duration) -> Self {
        Burst {
            window,
            state: Mutex::new(None),
        }
    }

    /// Counts one event. `Some(n)`: write a line now, saying `n` earlier events were folded since the last
    /// line (0 for the first of a burst); `None`: this one is folded.
    pub fn hit(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match st.as_mut() {
            Some((since, folded)) if now.duration_since(*since) < self.window => {
                *folded += 1;
                None
            }
            Some((since, folded)) => {
                let n = *folded;
                (*since, *folded) = (now, 0);
                Some(n)
            }
            None => {
                *st = Some((now, 0));
                Some(0)
            }
        }
    }

    /// Events folded since the last line, and the burst ended: for a last line at the end.
    pub fn flush(&self) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.take().map_or(0, |(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_one_line_and_the_next_line_carries_its_count() {
        // A window no test run outlasts: every hit after the first is folded.
        let b = Burst::new(Duration::from_secs(3600));
        assert_eq!(b.hit(), Some(0));
        for _ in 0..999 {
            assert_eq!(b.hit(), None);
        }
        assert_eq!(b.flush(), 999);
        assert_eq!(b.flush(), 0);
        // A zero window: every hit is its own line.
        let b = Burst::new(Duration::ZERO);
        assert_eq!(b.hit(), Some(0));
        assert_eq!(b.hit(), Some(0));
    }
}
