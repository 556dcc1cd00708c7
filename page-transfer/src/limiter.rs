//! A bandwidth cap shared by all channels of a migration: a token bucket in bytes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Limiter {
    rate: Option<f64>,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    /// `bytes_per_s` None (or 0) = unlimited. Bursts are capped at 50 ms worth of bytes.
    pub fn new(bytes_per_s: Option<u64>) -> Self {
        Limiter {
            rate: bytes_per_s.filter(|&r| r > 0).map(|r| r as f64),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Blocks until `bytes` may be sent.
    pub fn take(&self, bytes: usize) {
        let Some(rate) = self.rate else {
            return;
        };
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = &mut *state;
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate * 0.05);
            *last = now;
            *tokens -= bytes as f64;
            if *tokens >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-*tokens / rate)
        };
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_the_rate() {
        let l = Limiter::new(Some(10 << 20));
        let t = Instant::now();
        for _ in 0..20 {
            l.take(256 << 10);
        }
        // 5 MiB at 10 MiB/s: about half a second (minus the first burst).
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
}
