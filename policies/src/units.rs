//! Byte sizes, rates and durations written the way reason texts show them to people.

use std::fmt;

/// A byte count: `512 B`, `256 MiB`, `8.0 GiB`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bytes(pub f64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0;
        let mut unit = 0;
        while v >= 1024.0 && unit < UNITS.len() - 1 {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 || v >= 100.0 || v.fract() == 0.0 {
            write!(f, "{v:.0} {}", UNITS[unit])
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

/// A rate in bytes per second: `1.0 GiB/s`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate(pub f64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", Bytes(self.0))
    }
}

/// A duration given in ms: `12 ms`, `8.4 s`, `3.2 min`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Millis(pub f64);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms < 1000.0 {
            write!(f, "{ms:.0} ms")
        } else if ms < 120_000.0 {
            write!(f, "{:.1} s", ms / 1000.0)
        } else {
            write!(f, "{:.1} min", ms / 60_000.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(Bytes(512.0).to_string(), "512 B");
        assert_eq!(Bytes((256u64 << 20) as f64).to_string(), "256 MiB");
        assert_eq!(Bytes(1.5 * (1u64 << 30) as f64).to_string(), "1.5 GiB");
        assert_eq!(Rate((1u64 << 30) as f64).to_string(), "1 GiB/s");
        assert_eq!(Millis(12.4).to_string(), "12 ms");
        assert_eq!(Millis(8_400.0).to_string(), "8.4 s");
        assert_eq!(Millis(192_000.0).to_string(), "3.2 min");
    }
}
