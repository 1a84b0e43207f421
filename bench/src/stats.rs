//! One metric's samples and their summary: median, minimum, maximum, count — the shape of
//! cloud-hypervisor's performance-metrics results, so runs from different hosts compare.

use serde::{Deserialize, Serialize};

/// A measured or counted quantity over `n` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// What was measured, e.g. `boot to marker`.
    pub name: String,
    /// Its unit: `s`, `ms`, `count`, `ratio`, `pages`.
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    /// Where the number comes from: `measured`, `counted`, `modelled`.
    pub kind: String,
}

impl Metric {
    /// The summary of `samples` (none: `None`, there is nothing to report).
    pub fn of(name: &str, unit: &str, kind: &str, samples: &[f64]) -> Option<Metric> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Metric {
            name: name.to_owned(),
            unit: unit.to_owned(),
            median,
            min: v[0],
            max: v[n - 1],
            n,
            kind: kind.to_owned(),
        })
    }

    /// A count that is the same in every run.
    pub fn count(name: &str, value: u64) -> Metric {
        Metric {
            name: name.to_owned(),
            unit: "count".to_owned(),
            median: value as f64,
            min: value as f64,
            max: value as f64,
            n: 1,
            kind: "counted".to_owned(),
        }
    }

    /// The spread relative to the median: (max - min) / median (0 for one sample).
    pub fn noise(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }

    /// `12.300 s (11.900–13.000, n=3)`: every figure with the median's precision.
    pub fn display(&self) -> String {
        let digits = if self.unit == "count" {
            0
        } else if self.median.abs() >= 100.0 {
            1
        } else {
            3
        };
        let v = |x: f64| {
            if x.abs() >= 1e6 && self.unit != "count" {
                format!("{x:.3e}")
            } else {
                format!("{x:.digits$}")
            }
        };
        let unit = if self.unit == "count" {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        if self.n <= 1 || self.min == self.max {
            format!("{}{unit}", v(self.median))
        } else {
            format!(
                "{}{unit} ({}–{}, n={})",
                v(self.median),
                v(self.min),
                v(self.max),
                self.n
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_of_odd_and_even_counts() {
        let m = Metric::of("t", "s", "measured", &[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((m.median, m.min, m.max, m.n), (2.0, 1.0, 3.0, 3));
        let m = Metric::of("t", "s", "measured", &[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(m.median, 2.5);
        assert!((m.noise() - 1.2).abs() < 1e-9);
        assert!(Metric::of("t", "s", "measured", &[]).is_none());
        assert!(Metric::of("t", "s", "measured", &[f64::NAN]).is_none());
    }

    #[test]
    fn display_names_the_spread_only_when_there_is_one() {
        let m = Metric::of("t", "s", "measured", &[12.3, 11.9, 13.0]).unwrap();
        assert_eq!(m.display(), "12.300 s (11.900–13.000, n=3)");
        assert_eq!(Metric::count("roots", 7).display(), "7");
    }
}
