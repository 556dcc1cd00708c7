//! Hotspot detection, after Sandpiper: a host is hot when at least k of its last n load
//! samples exceed the threshold *and* the trend over those samples does not predict the load
//! falling back under it. The k-of-n rule ignores single spikes; the trend keeps a host that
//! is already cooling off from triggering migrations it no longer needs.
//!
//! The trend is the least-squares line through the window, extrapolated `trend_horizon_ms`
//! past the newest sample.

use std::fmt;

use serde::Serialize;

use crate::model::{Host, LoadSample};
use crate::params::HotspotParams;
use crate::view::ClusterView;

/// What the samples say about a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Heat {
    /// k of the last n samples are above the threshold and the trend stays above.
    Hot,
    /// k of n are above, but the trend predicts the load falling under the threshold.
    Cooling,
    /// Fewer than k samples are above the threshold.
    BelowK,
    /// The newest sample is too old to judge by.
    Stale,
    /// The host reported no samples.
    NoSamples,
}

/// The verdict on one host, with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HotspotVerdict {
    /// The host.
    pub host: String,
    /// The verdict.
    pub heat: Heat,
    /// Samples in the window above the threshold.
    pub above: usize,
    /// Samples in the window (at most n; fewer when the host has fewer).
    pub window: usize,
    /// The newest sample's load (0 without samples).
    pub latest: f64,
    /// Least-squares slope over the window, load per second.
    pub slope_per_s: f64,
    /// Load the trend predicts `horizon_ms` after the newest sample.
    pub predicted: f64,
    /// Age of the newest sample at `now_ms`.
    pub age_ms: u64,
    /// The parameters the verdict was made with, for the reason text.
    pub threshold: f64,
    /// Required samples above.
    pub k: usize,
    /// Trend horizon.
    pub horizon_ms: u64,
    /// Sample age limit.
    pub max_age_ms: u64,
}

impl HotspotVerdict {
    /// True when the host is hot.
    pub fn is_hot(&self) -> bool {
        self.heat == Heat::Hot
    }

    /// The verdict in one sentence.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for HotspotVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counted = format_args!(
            "{} of last {} samples above {:.2}",
            self.above, self.window, self.threshold
        );
        let trend = format_args!(
            "trend {:+.4}/s predicts {:.2} in {} s",
            self.slope_per_s,
            self.predicted,
            self.horizon_ms as f64 / 1000.0
        );
        match self.heat {
            Heat::Hot => write!(f, "{} is hot: {counted} and {trend}", self.host),
            Heat::Cooling => write!(
                f,
                "{} is cooling, not hot: {counted} but {trend}",
                self.host
            ),
            Heat::BelowK => write!(
                f,
                "{} is not hot: {counted} (needs {}), newest {:.2}",
                self.host, self.k, self.latest
            ),
            Heat::Stale => write!(
                f,
                "{} has no verdict: its newest sample is {:.1} s old (limit {:.1} s)",
                self.host,
                self.age_ms as f64 / 1000.0,
                self.max_age_ms as f64 / 1000.0
            ),
            Heat::NoSamples => write!(
                f,
                "{} has no verdict: it reported no load samples",
                self.host
            ),
        }
    }
}

/// Judges one host from its samples at time `now_ms`.
pub fn assess(host: &Host, params: &HotspotParams, now_ms: u64) -> HotspotVerdict {
    let samples = &host.load_samples;
    let window = &samples[samples.len().saturating_sub(params.window)..];
    let mut v = HotspotVerdict {
        host: host.name.clone(),
        heat: Heat::NoSamples,
        above: 0,
        window: window.len(),
        latest: 0.0,
        slope_per_s: 0.0,
        predicted: 0.0,
        age_ms: 0,
        threshold: params.threshold,
        k: params.k,
        horizon_ms: params.trend_horizon_ms,
        max_age_ms: params.max_sample_age_ms,
    };
    let Some(newest) = window.last() else {
        return v;
    };
    v.latest = newest.load;
    v.age_ms = now_ms.saturating_sub(newest.at_ms);
    v.above = window.iter().filter(|s| s.load > params.threshold).count();
    let (slope, predicted) = trend(window, params.trend_horizon_ms);
    v.slope_per_s = slope;
    v.predicted = predicted;
    v.heat = if v.age_ms > params.max_sample_age_ms {
        Heat::Stale
    } else if v.above < params.k {
        Heat::BelowK
    } else if predicted <= params.threshold {
        Heat::Cooling
    } else {
        Heat::Hot
    };
    v
}

/// Verdicts for every host that is up: hot ones first, hottest (highest current load) first,
/// then the rest by name.
pub fn detect(view: &ClusterView, params: &HotspotParams, now_ms: u64) -> Vec<HotspotVerdict> {
    let mut out: Vec<(f64, HotspotVerdict)> = view
        .hosts()
        .iter()
        .filter(|h| h.up)
        .map(|h| {
            let load = view.load(&h.name).unwrap_or(0.0);
            (load, assess(h, params, now_ms))
        })
        .collect();
    out.sort_by(|(la, a), (lb, b)| {
        b.is_hot()
            .cmp(&a.is_hot())
            .then(if a.is_hot() {
                lb.total_cmp(la)
            } else {
                std::cmp::Ordering::Equal
            })
            .then_with(|| a.host.cmp(&b.host))
    });
    out.into_iter().map(|(_, v)| v).collect()
}

/// Least-squares slope (load per second) through the samples, and the line's value `horizon_ms`
/// after the newest one. With one sample, or all at one instant, the slope is 0 and the
/// prediction is the mean.
fn trend(window: &[LoadSample], horizon_ms: u64) -> (f64, f64) {
    let newest = window.last().map_or(0, |s| s.at_ms);
    let n = window.len() as f64;
    // Seconds relative to the newest sample, so the numbers stay small.
    let x = |s: &LoadSample| -((newest - s.at_ms) as f64) / 1000.0;
    let mean_x = window.iter().map(x).sum::<f64>() / n;
    let mean_y = window.iter().map(|s| s.load).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for s in window {
        let dx = x(s) - mean_x;
        sxy += dx * (s.load - mean_y);
        sxx += dx * dx;
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let at = horizon_ms as f64 / 1000.0;
    (slope, mean_y + slope * (at - mean_x))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A host with samples one second apart, the newest at t = 100 s.
    fn host(loads: &[f64]) -> Host {
        let mut h = Host::new("h1", 8.0, GIB);
        let start = 100_000 - 1000 * (loads.len() as u64 - 1);
        h.load_samples = loads
            .iter()
            .enumerate()
            .map(|(i, &load)| LoadSample {
                at_ms: start + 1000 * i as u64,
                load,
            })
            .collect();
        h
    }

    fn verdict(loads: &[f64]) -> HotspotVerdict {
        assess(&host(loads), &HotspotParams::default(), 100_500)
    }

    #[test]
    fn three_of_five_above_is_hot() {
        let v = verdict(&[0.5, 0.8, 0.6, 0.85, 0.9]);
        assert_eq!(v.heat, Heat::Hot, "{v}");
        assert_eq!((v.above, v.window), (3, 5));
        let text = v.reason();
        assert!(
            text.starts_with("h1 is hot: 3 of last 5 samples above 0.75 and trend +"),
            "{text}"
        );
    }

    #[test]
    fn two_of_five_above_is_not_hot() {
        let v = verdict(&[0.5, 0.9, 0.6, 0.95, 0.7]);
        assert_eq!(v.heat, Heat::BelowK);
        assert_eq!(
            v.reason(),
            "h1 is not hot: 2 of last 5 samples above 0.75 (needs 3), newest 0.70"
        );
    }

    #[test]
    fn only_the_last_n_samples_count() {
        // Old hot samples outside the window of 5 do not count.
        let v = verdict(&[0.9, 0.9, 0.9, 0.5, 0.5, 0.8, 0.5, 0.8]);
        assert_eq!((v.above, v.window, v.heat), (2, 5, Heat::BelowK));
    }

    #[test]
    fn rising_trend_is_hot_falling_trend_is_cooling() {
        let rising = verdict(&[0.70, 0.76, 0.80, 0.84, 0.88]);
        assert_eq!(rising.heat, Heat::Hot);
        assert!(rising.slope_per_s > 0.0 && rising.predicted > 0.88);

        let falling = verdict(&[0.99, 0.95, 0.88, 0.82, 0.76]);
        assert_eq!(falling.above, 5);
        assert!(falling.slope_per_s < 0.0);
        assert_eq!(falling.heat, Heat::Cooling, "{falling}");
        assert!(
            falling.reason().contains("is cooling, not hot"),
            "{falling}"
        );
    }

    #[test]
    fn flat_above_threshold_is_hot() {
        let v = verdict(&[0.8, 0.8, 0.8, 0.8, 0.8]);
        assert_eq!(v.heat, Heat::Hot);
        assert!(v.slope_per_s.abs() < 1e-12);
        assert!((v.predicted - 0.8).abs() < 1e-12);
    }

    #[test]
    fn trend_matches_a_known_line() {
        // load = 0.5 + 0.01 * t (t in s): slope 0.01/s, at newest + 10 s -> 0.5 + 0.01 * 14.
        let (slope, predicted) = trend(
            &(0..5)
                .map(|i| LoadSample {
                    at_ms: i * 1000,
                    load: 0.5 + 0.01 * i as f64,
                })
                .collect::<Vec<_>>(),
            10_000,
        );
        assert!((slope - 0.01).abs() < 1e-12);
        assert!((predicted - 0.64).abs() < 1e-12);
    }

    #[test]
    fn stale_or_missing_samples_make_no_verdict() {
        let v = assess(
            &host(&[0.9; 5]),
            &HotspotParams::default(),
            100_000 + 61_000,
        );
        assert_eq!(v.heat, Heat::Stale);
        assert_eq!(
            v.reason(),
            "h1 has no verdict: its newest sample is 61.0 s old (limit 60.0 s)"
        );
        let v = assess(&Host::new("h2", 1.0, GIB), &HotspotParams::default(), 0);
        assert_eq!(v.heat, Heat::NoSamples);
    }

    #[test]
    fn fewer_samples_than_the_window_still_count() {
        let v = verdict(&[0.9, 0.9, 0.9]);
        assert_eq!((v.above, v.window, v.heat), (3, 3, Heat::Hot));
        let v = verdict(&[0.9, 0.9]);
        assert_eq!(v.heat, Heat::BelowK);
    }

    #[test]
    fn detect_orders_hot_hosts_hottest_first() {
        let mk = |name: &str, load: f64| {
            let mut h = host(&[load; 5]);
            h.name = name.into();
            h
        };
        let mut down = mk("h0", 0.99);
        down.up = false;
        let view = ClusterView::new(
            vec![
                down,
                mk("h1", 0.8),
                mk("h2", 0.3),
                mk("h3", 0.95),
                mk("h4", 0.1),
            ],
            vec![],
            0,
        )
        .unwrap();
        let order: Vec<_> = detect(&view, &HotspotParams::default(), 100_000)
            .into_iter()
            .map(|v| (v.host, v.heat))
            .collect();
        assert_eq!(
            order,
            [
                ("h3".to_string(), Heat::Hot),
                ("h1".to_string(), Heat::Hot),
                ("h2".to_string(), Heat::BelowK),
                ("h4".to_string(), Heat::BelowK),
            ]
        );
    }
}
