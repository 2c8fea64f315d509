//! How long to wait before re-dialing the relay: the device-proxy's control
//! channel, and the service-proxy's attempts to resume a session.
//!
//! Exponential backoff with *full jitter*: each wait is drawn uniformly from
//! zero up to a ceiling that doubles with every consecutive failure and is
//! capped. When a relay restarts, thousands of devices lose their control
//! channel at the same instant; full jitter spreads their re-dials over the
//! whole window instead of letting them return in synchronized waves. The
//! first retry is fast (within a second), so a brief blip costs little.
//!
//! The capped, doubling ceilings come from `backon`'s exponential backoff.
//! Its own jitter is not used: it adds up to one more delay on top (a wait
//! in `[ceiling, 2 × ceiling)`, past the cap), where full jitter draws in
//! `[0, ceiling]`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::Rng;

/// Ceiling of the first wait.
pub const FIRST_CEILING: Duration = Duration::from_secs(1);

/// A connection that stayed up this long counts as healthy: the next failure
/// starts again from [`FIRST_CEILING`].
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Backoff {
    first_ceiling: Duration,
    max_ceiling: Duration,
    /// The ceilings of the waits after the next one.
    ceilings: ExponentialBackoff,
    /// The ceiling of the next wait.
    next_ceiling: Duration,
}

impl Backoff {
    pub fn new(first_ceiling: Duration, max_ceiling: Duration) -> Self {
        let max_ceiling = max_ceiling.max(first_ceiling);
        let mut ceilings = Self::ceilings(first_ceiling, max_ceiling);
        let next_ceiling = ceilings.next().unwrap_or(max_ceiling);
        Self {
            first_ceiling,
            max_ceiling,
            ceilings,
            next_ceiling,
        }
    }

    fn ceilings(first_ceiling: Duration, max_ceiling: Duration) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_factor(2.0)
            .with_min_delay(first_ceiling)
            .with_max_delay(max_ceiling)
            .without_max_times()
            .build()
    }

    /// The longest the next wait can be.
    pub fn ceiling(&self) -> Duration {
        self.next_ceiling
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    fn next_delay_with(&mut self, random: &mut impl Rng) -> Duration {
        let ceiling = self.next_ceiling;
        self.next_ceiling = self
            .ceilings
            .next()
            .unwrap_or(self.max_ceiling)
            .min(self.max_ceiling);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random.random_range(0..=ceiling_nanos))
    }

    /// Starts over after a healthy connection.
    pub fn reset(&mut self) {
        *self = Self::new(self.first_ceiling, self.max_ceiling);
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
    fn many_failures_do_not_overflow() {
        let mut backoff = Backoff::new(FIRST_CEILING, Duration::from_secs(30));
        for _ in 0..100_000 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
    }

    #[test]
    fn max_below_first_ceiling_is_raised_to_it() {
        let backoff = Backoff::new(FIRST_CEILING, Duration::from_millis(10));
        assert_eq!(backoff.ceiling(), FIRST_CEILING);
    }
}
