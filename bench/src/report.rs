//! The figures the seed design published for its 8 GiB boot, which every report sets ours
//! next to.

/// A figure published by an earlier design, with where it comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    pub what: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub source: &'static str,
}

/// KVM Forum 2021 (Intel), 8 GiB guest boot.
pub const SEED_8G: &[Reference] = &[
    Reference {
        what: "boot, no sharing",
        value: 29.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "boot, sharing, huge pages",
        value: 32.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "boot, sharing, 4K pages",
        value: 63.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "pre-populations per boot",
        value: 132.0,
        unit: "",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "time in pre-population, 4K pages",
        value: 32.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "time in pre-population, huge pages",
        value: 2.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "time in IOTLB flushes",
        value: 1.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_s_figures_are_its_published_ones() {
        let v = |what: &str| SEED_8G.iter().find(|r| r.what == what).unwrap().value;
        assert_eq!(v("boot, no sharing"), 29.0);
        assert_eq!(v("boot, sharing, huge pages"), 32.0);
        assert_eq!(v("boot, sharing, 4K pages"), 63.0);
        assert_eq!(v("pre-populations per boot"), 132.0);
    }
}
