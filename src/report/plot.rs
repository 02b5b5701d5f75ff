//! The sweep report's plot: one point per variant, a score (y) against
//! output tok/s (x), drawn into a PNG without a font library: points are
//! numbered (report.md's legend maps numbers to variants) and the axis ends
//! carry their values in a 3x5 pixel digit font.

use crate::{Error, Result};
use std::path::Path;

const W: usize = 720;
const H: usize = 480;
const M: usize = 60; // margin

/// 3x5 glyphs for 0-9, '.', '-': each row is 3 bits, most significant left.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        _ => return None,
    })
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, w: i64, h: i64, c: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.set(x, y, c);
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            if let Some(g) = glyph(ch) {
                for (row, bits) in g.iter().enumerate() {
                    for col in 0..3 {
                        if bits & (4 >> col) != 0 {
                            let (gx, gy) =
                                (x + (k as i64 * 4 + col) * scale, y + row as i64 * scale);
                            self.rect(gx, gy, scale, scale, c);
                        }
                    }
                }
            }
        }
    }
}

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

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes the plot of `points` (x, y), numbered from 1 in order.
pub fn write(path: &Path, points: &[(f64, f64)]) -> Result<()> {
    let mut c = Canvas::new();
    let black = [0, 0, 0];
    c.rect(M as i64, (H - M) as i64, (W - 2 * M) as i64, 2, black);
    c.rect(M as i64, M as i64, 2, (H - 2 * M) as i64, black);
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (x0, x1) = span(finite.iter().map(|p| p.0));
    // Scores and shares live in [0, 1]: show that whole range.
    let (y0, y1) = if finite.iter().all(|p| (0.0..=1.0).contains(&p.1)) {
        (0.0, 1.0)
    } else {
        span(finite.iter().map(|p| p.1))
    };
    c.text(M as i64, (H - M + 10) as i64, &fmt(x0), 2, black);
    c.text((W - M - 40) as i64, (H - M + 10) as i64, &fmt(x1), 2, black);
    c.text(6, (H - M - 10) as i64, &fmt(y0), 2, black);
    c.text(6, M as i64, &fmt(y1), 2, black);
    let plot_w = (W - 2 * M - 20) as f64;
    let plot_h = (H - 2 * M - 20) as f64;
    for (i, &(x, y)) in points.iter().enumerate() {
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let px = M as f64 + 10.0 + (x - x0) / (x1 - x0) * plot_w;
        let py = (H - M) as f64 - 10.0 - (y - y0) / (y1 - y0) * plot_h;
        let col = PALETTE[i % PALETTE.len()];
        for dy in -5i64..=5 {
            for dx in -5i64..=5 {
                if dx * dx + dy * dy <= 25 {
                    c.set(px as i64 + dx, py as i64 + dy, col);
                }
            }
        }
        c.text(px as i64 + 8, py as i64 - 14, &(i + 1).to_string(), 2, col);
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut w| w.write_image_data(&c.px))
        .map_err(|e| Error::Output(format!("{}: {e}", path.display())))
}

/// Axis range with a little room; a flat range is widened.
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
