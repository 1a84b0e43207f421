//! The reports: each a [`Section`] of tables plus a one-paragraph finding with numbers,
//! rendered as terminal tables, Markdown (what the bench report embeds), JSON or CSV.

pub mod dma;
pub mod huge;
pub mod iotlb;
pub mod render;
pub mod roots;
pub mod summary;
pub mod whatif;

use serde::Serialize;

pub use render::Format;

/// One table cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Int(u64),
    Signed(i64),
    /// A value and the decimals to show.
    Float(f64, u8),
    Text(String),
    Null,
}

impl Serialize for Cell {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Cell::Int(v) => s.serialize_u64(*v),
            Cell::Signed(v) => s.serialize_i64(*v),
            Cell::Float(v, _) => s.serialize_f64(*v),
            Cell::Text(t) => s.serialize_str(t),
            Cell::Null => s.serialize_none(),
        }
    }
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Self {
        Cell::Text(s.into())
    }

    pub fn f(v: f64, decimals: u8) -> Self {
        if v.is_finite() {
            Cell::Float(v, decimals)
        } else {
            Cell::Null
        }
    }

    /// Nanoseconds shown as milliseconds.
    pub fn ms(ns: u64) -> Self {
        Cell::Float(ns as f64 / 1e6, 3)
    }

    pub fn opt(v: Option<u64>) -> Self {
        v.map_or(Cell::Null, Cell::Int)
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Int(v) => write!(f, "{v}"),
            Cell::Signed(v) => write!(f, "{v:+}"),
            Cell::Float(v, d) => write!(f, "{v:.*}", usize::from(*d)),
            Cell::Text(s) => f.write_str(s),
            Cell::Null => f.write_str("-"),
        }
    }
}

/// A table: a title, column names, rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }
}

/// One report: what it is about, the finding, the tables behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    /// Stable identifier (`roots`, `whatif`, `huge_pages`, `iotlb`, `dma`, `summary`, `diff`).
    pub id: String,
    pub title: String,
    pub finding: String,
    pub tables: Vec<Table>,
}

/// Several sections over the same inputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The inputs, as given.
    pub inputs: Vec<String>,
    pub sections: Vec<Section>,
}

/// Human-readable bytes (binary units).
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
pub fn pct(part: f64, whole: f64) -> f64 {
    if whole == 0.0 {
        0.0
    } else {
        100.0 * part / whole
    }
}

/// Column `name` of `df` as `u64` values (nulls as `None`).
pub(crate) fn u64s(
    df: &polars::prelude::DataFrame,
    name: &str,
) -> polars::prelude::PolarsResult<Vec<Option<u64>>> {
    use polars::prelude::*;
    let c = df.column(name)?.cast(&DataType::UInt64)?;
    Ok(c.u64()?.iter().collect())
}

/// Column `name` of `df` as strings (nulls as `None`).
pub(crate) fn strs(
    df: &polars::prelude::DataFrame,
    name: &str,
) -> polars::prelude::PolarsResult<Vec<Option<String>>> {
    let c = df.column(name)?;
    Ok(c.str()?.iter().map(|s| s.map(str::to_owned)).collect())
}
