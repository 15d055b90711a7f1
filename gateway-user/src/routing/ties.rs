//! The one tie-break of routing: the lowest key wins, and items tied on it
//! share the win at random, so equal pods share the load instead of the
//! first one taking it all.

use std::cmp::Ordering;

/// The lowest-keyed item offered so far, chosen uniformly among ties by
/// reservoir sampling: the n-th tied item replaces the pick with chance
/// 1/n, which leaves each of them a 1/n chance without collecting them.
#[derive(Debug)]
pub(crate) struct Lowest<K, T> {
    best: Option<(K, T)>,
    ties: u32,
}

impl<K: PartialOrd, T> Lowest<K, T> {
    pub(crate) fn new() -> Self {
        Self { best: None, ties: 0 }
    }

    /// Offers `item` at `key`. A key that does not compare with the best
    /// (NaN) replaces it, as a lower one does.
    pub(crate) fn offer(&mut self, key: K, item: T) {
        match self.best.as_ref().and_then(|(best, _)| key.partial_cmp(best)) {
            Some(Ordering::Greater) => {}
            Some(Ordering::Equal) => {
                self.ties = self.ties.saturating_add(1);
                if rand::random_range(0..self.ties) == 0 {
                    self.best = Some((key, item));
                }
            }
            Some(Ordering::Less) | None => {
                self.best = Some((key, item));
                self.ties = 1;
            }
        }
    }

    /// The item of the lowest key, `None` when nothing was offered.
    pub(crate) fn into_item(self) -> Option<T> {
        self.best.map(|(_, item)| item)
    }
}

/// A cost compared with a tolerance: costs within a billionth of each
/// other are equal, so sums of floats that should tie do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cost(pub f64);

/// How far apart two [`Cost`]s may be and still tie.
const COST_TOLERANCE: f64 = 1e-9;

impl PartialEq for Cost {
    fn eq(&self, other: &Self) -> bool {
        self.partial_cmp(other) == Some(Ordering::Equal)
    }
}

impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        if self.0 > other.0 + COST_TOLERANCE {
            Some(Ordering::Greater)
        } else if self.0 >= other.0 - COST_TOLERANCE {
            Some(Ordering::Equal)
        } else if self.0 < other.0 - COST_TOLERANCE {
            Some(Ordering::Less)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_key_wins() {
        let mut lowest = Lowest::new();
        for (key, item) in [(3, 'a'), (1, 'b'), (2, 'c')] {
            lowest.offer(key, item);
        }
        assert_eq!(lowest.into_item(), Some('b'));
        assert_eq!(Lowest::<u32, char>::new().into_item(), None);
    }

    #[test]
    fn ties_share_the_win() {
        let mut seen = [0; 3];
        for _ in 0..300 {
            let mut lowest = Lowest::new();
            for (key, item) in [(1, 0), (5, 1), (1, 2), (1, 1)] {
                lowest.offer(key, item);
            }
            seen[lowest.into_item().unwrap_or(9)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn costs_within_the_tolerance_tie() {
        assert_eq!(Cost(1.0).partial_cmp(&Cost(1.0 + 1e-12)), Some(Ordering::Equal));
        assert_eq!(Cost(1.0).partial_cmp(&Cost(1.1)), Some(Ordering::Less));
        assert_eq!(Cost(1.1).partial_cmp(&Cost(1.0)), Some(Ordering::Greater));
        assert_eq!(Cost(f64::NAN).partial_cmp(&Cost(1.0)), None);
    }
}
