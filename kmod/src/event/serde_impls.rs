//! serde for the decision layer's types. That layer is compiled into the kernel and may not
//! depend on serde, so the trace format's encoding of its types lives here: addresses are plain
//! numbers (as `serde(transparent)` would write them), named values are their names.

use alloc::borrow::Cow;

use serde::de::{Error, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::decision::addr::{Gfn, Gpa, Hpa, Iova, PageSize};
use crate::decision::format::{Kind, Layout};
use crate::decision::kvm::KvmKernel;
use crate::decision::policy::{DirtyTracking, ShareMode};
use crate::decision::prereq::VIommu;

macro_rules! transparent_u64 {
    ($($t:ident),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u64(self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                u64::deserialize(d).map($t)
            }
        }
    )*};
}

transparent_u64!(Gfn, Gpa, Hpa, Iova);

macro_rules! by_name {
    ($($t:ty => $expected:literal),* $(,)?) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = Cow::<'de, str>::deserialize(d)?;
                text.parse()
                    .map_err(|_| D::Error::invalid_value(Unexpected::Str(&text), &$expected))
            }
        }
    )*};
}

by_name! {
    ShareMode => "a sharing mode: pin_prepopulate, exported_iopf, separate_table or optimized",
    PageSize => "a page size: 4K, 2M or 1G",
    Kind => "a format kind: ept or npt",
    Layout => "an SPTE layout: stock or sharing",
    VIommu => "a vIOMMU: none, nested or shadow",
    DirtyTracking => "dirty tracking: write_protect, report_all_pinned or dirty_bits",
    KvmKernel => "a kernel: 6.12 or pre-6.4",
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn encodings_are_the_trace_formats() {
        assert_eq!(serde_json::to_string(&Gfn(5)).unwrap(), "5");
        assert_eq!(serde_json::from_str::<Gpa>("4096").unwrap(), Gpa(4096));
        assert_eq!(
            serde_json::to_string(&ShareMode::PinPrepopulate).unwrap(),
            "\"pin_prepopulate\""
        );
        assert_eq!(
            serde_json::from_str::<PageSize>("\"2M\"").unwrap(),
            PageSize::Size2M
        );
        let err = serde_json::from_str::<ShareMode>("\"fast\"").unwrap_err();
        assert!(err.to_string().contains("pin_prepopulate"), "{err}");
    }
}
