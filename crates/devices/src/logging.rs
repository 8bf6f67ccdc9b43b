//! Log helpers: keeping a guest that repeats a mistake from flooding the VMM's log, and
//! formatting an error with its causes on one line.

use std::time::{Duration, Instant};

/// Lets one message through per interval and counts the ones held back in between.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// One message per second: enough to notice a misbehaving guest, too few to fill a disk.
    pub(crate) const fn new() -> Self {
        Self::with_interval(Duration::from_secs(1))
    }

    pub(crate) const fn with_interval(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Returns `Some(n)` when a message may be logged now, `n` being how many were held back
    /// since the last one; `None` when this one should be dropped.
    pub(crate) fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `error: cause: cause's cause...`, for log lines.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_one_message_per_interval_and_counts_the_rest() {
        let mut limiter = LogLimiter::with_interval(Duration::from_secs(3600));
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        limiter.interval = Duration::ZERO;
        assert_eq!(limiter.check(), Some(2));
        assert_eq!(limiter.check(), Some(0));
    }
}
