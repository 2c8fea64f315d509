//! How long to wait before re-dialing the relay.
//!
//! Exponential backoff with *full jitter*: each wait is drawn uniformly from
//! zero up to a ceiling that doubles with every consecutive failure and is
//! capped. When a relay restarts, thousands of devices lose their control
//! channel at the same instant; full jitter spreads their re-dials over the
//! whole window instead of letting them return in synchronized waves. The
//! first retry is fast (within a second), so a brief blip costs little.

use std::time::Duration;

use rand::Rng;

/// Ceiling of the first wait.
pub const FIRST_CEILING: Duration = Duration::from_secs(1);

/// A connection that stayed up this long counts as healthy: the next failure
/// starts again from [`FIRST_CEILING`].
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Backoff {
    first_ceiling: Duration,
    max_ceiling: Duration,
    consecutive_failures: u32,
}

impl Backoff {
    pub fn new(first_ceiling: Duration, max_ceiling: Duration) -> Self {
        Self {
            first_ceiling,
            max_ceiling: max_ceiling.max(first_ceiling),
            consecutive_failures: 0,
        }
    }

    /// The longest the next wait can be.
    pub fn ceiling(&self) -> Duration {
        let doublings = self.consecutive_failures.min(31);
        self.first_ceiling
            .saturating_mul(1u32 << doublings)
            .min(self.max_ceiling)
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    fn next_delay_with(&mut self, random: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random.random_range(0..=ceiling_nanos))
    }

    /// Starts over after a healthy connection.
    pub fn reset(&mut self) {
        self.consecutive_failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_starts_at_one_second_doubles_and_is_capped() {
        let mut backoff = Backoff::new(FIRST_CEILING, Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(backoff.ceiling().as_secs());
            backoff.next_delay();
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn every_delay_lies_between_zero_and_its_ceiling() {
        let mut backoff = Backoff::new(FIRST_CEILING, Duration::from_secs(30));
        let mut random = rand::rng();
        for _ in 0..1000 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay_with(&mut random);
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
        }
    }

    #[test]
    fn delays_are_spread_not_synchronized() {
        let mut random = rand::rng();
        let delays: Vec<Duration> = (0..100)
            .map(|_| {
                Backoff::new(FIRST_CEILING, Duration::from_secs(30)).next_delay_with(&mut random)
            })
            .collect();
        let distinct = delays
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert!(
            distinct > 90,
            "only {distinct} distinct first delays out of 100"
        );
    }

    #[test]
    fn reset_starts_over_from_the_first_ceiling() {
        let mut backoff = Backoff::new(FIRST_CEILING, Duration::from_secs(30));
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
        backoff.reset();
        assert_eq!(backoff.ceiling(), FIRST_CEILING);
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let mut backoff = Backoff::new(FIRST_CEILING, Duration::from_secs(30));
        backoff.consecutive_failures = u32::MAX;
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
        assert!(backoff.next_delay() <= Duration::from_secs(30));
    }

    #[test]
    fn max_below_first_ceiling_is_raised_to_it() {
        let backoff = Backoff::new(FIRST_CEILING, Duration::from_millis(10));
        assert_eq!(backoff.ceiling(), FIRST_CEILING);
    }
}
