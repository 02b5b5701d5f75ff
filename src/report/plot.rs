//! The sweep report's plot with `plotters`: one numbered point per variant,
//! a score (y) against output tok/s (x), with a title and axis labels, as
//! SVG (the text is left to the viewer, so no font library is needed;
//! report.md's legend maps the numbers to variants).

use crate::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

const W: u32 = 720;
const H: u32 = 480;

/// Distinct colours for up to 8 points (then repeating).
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// What to draw: the points (x, y), numbered from 1 in order, and the labels.
pub struct Plot<'a> {
    /// The figure's title.
    pub title: &'a str,
    /// The x axis label.
    pub x_label: &'a str,
    /// The y axis label.
    pub y_label: &'a str,
    /// One point per variant; non-finite points are left out.
    pub points: &'a [(f64, f64)],
}

/// Writes the plot as an SVG file.
pub fn write(path: &Path, plot: &Plot) -> Result<()> {
    let mut svg = String::new();
    draw(&mut svg, plot).map_err(|e| Error::Output(format!("{}: {e}", path.display())))?;
    std::fs::write(path, svg).map_err(|e| Error::io(path, e))
}

fn draw(svg: &mut String, plot: &Plot) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite: Vec<(usize, (f64, f64))> = plot
        .points
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, p)| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (x0, x1) = span(finite.iter().map(|p| p.1 .0));
    // Scores and shares live in [0, 1]: show that whole range.
    let (y0, y1) = if finite.iter().all(|p| (0.0..=1.0).contains(&p.1 .1)) {
        (0.0, 1.0)
    } else {
        span(finite.iter().map(|p| p.1 .1))
    };
    let pad = (x1 - x0) * 0.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(plot.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0 - pad..x1 + pad, y0..y1 + (y1 - y0) * 0.05)?;
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .draw()?;
    chart.draw_series(finite.iter().map(|&(i, p)| {
        let [r, g, b] = PALETTE[i % PALETTE.len()];
        let colour = RGBColor(r, g, b);
        EmptyElement::at(p)
            + Circle::new((0, 0), 6, colour.filled())
            + Text::new(
                (i + 1).to_string(),
                (8, -18),
                ("sans-serif", 15).into_font().color(&colour),
            )
    }))?;
    root.present()?;
    Ok(())
}

/// Axis range; a flat range is widened.
fn span(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        let pad = if lo.abs() > 1e-9 { lo.abs() * 0.1 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_has_a_title_axis_labels_and_one_point_per_variant() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.svg");
        let points = [(100.0, 0.5), (200.0, 0.75), (f64::NAN, 0.1), (150.0, 1.0)];
        let plot = Plot {
            title: "sweep: exact_match against speed",
            x_label: "output tok/s",
            y_label: "exact_match mean",
            points: &points,
        };
        write(&path, &plot).unwrap();
        // plotters puts a text element's content on a line of its own.
        let svg = std::fs::read_to_string(&path).unwrap().replace('\n', "");
        for text in [plot.title, plot.x_label, plot.y_label] {
            assert!(svg.contains(&format!(">{text}<")), "{text} in {svg}");
        }
        for (i, c) in [0, 1, 3].map(|i| (i, PALETTE[i])) {
            let hex = format!("#{:02X}{:02X}{:02X}", c[0], c[1], c[2]);
            assert!(
                svg.contains("<circle") && svg.to_uppercase().contains(&hex),
                "point {i}"
            );
        }
        assert_eq!(
            svg.matches("<circle").count(),
            3,
            "one circle per finite point"
        );
    }
}
