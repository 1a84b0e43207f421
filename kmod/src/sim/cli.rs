//! Command-line parsing of the names the crate defines (feature `clap`): the mode names as a
//! `clap::ValueEnum`, each with its one spelling (`pin_prepopulate`) and the accepted alias
//! with dashes (`pin-prepopulate`).

use clap::builder::PossibleValue;

use crate::decision::policy::ShareMode;

impl clap::ValueEnum for ShareMode {
    fn value_variants<'a>() -> &'a [Self] {
        &ShareMode::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let alias = match self {
            ShareMode::PinPrepopulate => "pin-prepopulate",
            ShareMode::ExportedIopf => "exported-iopf",
            ShareMode::SeparateTable => "separate-table",
            ShareMode::Optimized => "optimized",
        };
        let value = PossibleValue::new(self.name());
        Some(if alias == self.name() {
            value
        } else {
            value.alias(alias)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn one_spelling_and_its_alias() {
        for mode in ShareMode::ALL {
            assert_eq!(ShareMode::from_str(mode.name(), false), Ok(mode));
            let dashed = mode.name().replace('_', "-");
            assert_eq!(ShareMode::from_str(&dashed, false), Ok(mode));
            // The alias parses exactly as FromStr does.
            assert_eq!(dashed.parse::<ShareMode>(), Ok(mode));
        }
        assert!(ShareMode::from_str("fast", false).is_err());
    }
}
