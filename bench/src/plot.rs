//! The report's plots, as inline SVG (plotters' SVG backend: text is SVG `<text>`, no font
//! files are read, nothing is fetched when the report is opened).

use anyhow::anyhow;
use plotters::prelude::*;

const SIZE: (u32, u32) = (720, 380);
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

/// Vertical bars, one per `(label, value)`.
pub fn bars(title: &str, y_desc: &str, data: &[(String, f64)]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let n = data.len().max(1) as u32;
        let top = data.iter().map(|d| d.1).fold(0.0_f64, f64::max).max(1.0) * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(70)
            // `a..b` segmented has a segment for every value of a..=b: n bars, n segments.
            .build_cartesian_2d((0u32..n - 1).into_segmented(), 0f64..top)
            .map_err(err)?;
        let labels: Vec<String> = data.iter().map(|d| d.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(data.len().max(1))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(data.iter().enumerate().map(|(i, (_, v))| {
                let i = i as u32;
                let colour = COLOURS[i as usize % COLOURS.len()];
                Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    colour.mix(0.85).filled(),
                )
            }))
            .map_err(err)?;
        // The value above each bar.
        chart
            .draw_series(data.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    format_value(*v),
                    (SegmentValue::CenterOf(i as u32), *v + top * 0.02),
                    ("sans-serif", 13),
                )
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Lines through points, one series per `(name, points)`, with a legend.
pub fn lines(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let points = series.iter().flat_map(|s| s.1.iter());
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0_f64);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        if x0 == x1 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0f64..(y1.max(1e-9) * 1.15))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                .map_err(err)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, colour.filled())),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{}", v as i64)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_lines_are_standalone_svg_with_their_labels() {
        let svg = bars(
            "full pre-populations",
            "count",
            &[("pin_prepopulate".into(), 61.0), ("optimized".into(), 0.0)],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        // plotters writes a text's content on its own line.
        assert!(
            svg.contains("\npin_prepopulate\n") && svg.contains("\n61\n"),
            "{svg}"
        );
        assert!(!svg.contains("http://") || svg.contains("http://www.w3.org/2000/svg"));
        let svg = lines(
            "boot",
            "GiB",
            "s",
            &[("base".into(), vec![(1.0, 10.0), (4.0, 12.0)])],
        )
        .unwrap();
        assert!(svg.contains("<polyline") || svg.contains("<path"), "{svg}");
        assert!(svg.contains("\nbase\n"), "{svg}");
    }
}
