//! Command-line values shared by `tdpshare-probe` and `sharetop`, checked at parse time so a bad
//! one is clap's usage error (exit 2) naming the value — never a panic or a silent clamp.

/// Seconds: a finite number ≥ `min`.
fn seconds(text: &str, min: f64, what: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !v.is_finite() {
        return Err(format!(
            "{text:?}: {what} must be a finite number of seconds"
        ));
    }
    if v < min {
        return Err(format!("{v} s: {what} must be at least {min} s"));
    }
    Ok(v)
}

/// `--interval`: at least 0.05 s (the view refreshes no faster).
pub fn interval(text: &str) -> Result<f64, String> {
    seconds(text, 0.05, "the interval")
}

/// `--duration`: a finite, non-negative number of seconds.
pub fn duration(text: &str) -> Result<f64, String> {
    seconds(text, 0.0, "the duration")
}

/// A positive, finite factor or time (`--speed`, `--sim-seconds`).
pub fn positive(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{text:?}: must be a finite number above 0"));
    }
    Ok(v)
}

/// `--count`: at least 1.
pub fn count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("0: the count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// `--pid`: a process that exists now (a pid that never appears would record nothing forever).
pub fn pid(text: &str) -> Result<u32, String> {
    let p: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a process id"))?;
    if p == 0 {
        return Err("0 is not a process id".into());
    }
    if !std::path::Path::new(&format!("/proc/{p}")).exists() {
        return Err(format!("no process {p} is running"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named() {
        assert_eq!(interval("1").unwrap(), 1.0);
        for bad in ["inf", "NaN", "-1", "0", "0.01", "x"] {
            assert!(interval(bad).is_err(), "{bad}");
        }
        assert_eq!(duration("0").unwrap(), 0.0);
        for bad in ["-1", "NaN", "inf"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
        for bad in ["0", "-2", "nan", "inf"] {
            assert!(positive(bad).is_err(), "{bad}");
        }
        assert_eq!(count("3").unwrap(), 3);
        assert!(count("0").is_err() && count("-1").is_err());
        assert_eq!(
            pid(&std::process::id().to_string()).unwrap(),
            std::process::id()
        );
        assert!(pid("0").is_err());
        assert_eq!(
            pid("5000000000").unwrap_err(),
            "\"5000000000\" is not a process id"
        );
        // Above the kernel's pid_max limit (2^22): never running.
        assert_eq!(pid("4194305").unwrap_err(), "no process 4194305 is running");
    }
}
