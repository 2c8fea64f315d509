//! Percentiles of latency samples, nearest-rank, so a reported p99 is a
//! latency that was actually observed.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub samples: usize,
}

impl Percentiles {
    /// None when there are no samples.
    pub fn of(samples: &[Duration]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Some(Percentiles {
            p50: nearest_rank(&sorted, 50.0),
            p99: nearest_rank(&sorted, 99.0),
            samples: sorted.len(),
        })
    }
}

fn nearest_rank(sorted: &[Duration], percentile: f64) -> Duration {
    let rank = ((percentile / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_observed_values() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let percentiles = Percentiles::of(&samples).expect("samples");
        assert_eq!(percentiles.p50, Duration::from_millis(50));
        assert_eq!(percentiles.p99, Duration::from_millis(99));
        assert_eq!(percentiles.samples, 100);
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let percentiles = Percentiles::of(&[Duration::from_micros(7)]).expect("one sample");
        assert_eq!(percentiles.p50, Duration::from_micros(7));
        assert_eq!(percentiles.p99, Duration::from_micros(7));
    }

    #[test]
    fn no_samples_no_percentiles() {
        assert!(Percentiles::of(&[]).is_none());
    }
}
