//! FP8 E4M3 for the KV cache (`engine.kv_cache_dtype = "fp8"`): the OCP
//! "fn" variant (sign, 4 exponent bits with bias 7, 3 mantissa bits; no
//! infinities; 0x7f / 0xff are NaN; the largest finite value is 448), with
//! one f32 scale per row of a KV head (`head_dim` values of one token):
//! `scale = amax / 448`, stored values `e4m3(x / scale)`, read back as
//! `decode(code) * scale`. Rounding is to nearest, ties to even; values past
//! the range saturate to +-448 (the scale keeps every finite row in range).

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 code.
pub fn e4m3_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((code >> 3) & 0x0f, code & 0x07);
    if e == 0x0f && m == 0x07 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m as f32 * 2f32.powi(-9) // subnormal: m/8 * 2^-6
    } else {
        (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
    };
    sign * mag
}

/// The E4M3 code nearest `x` (ties to even), saturating to +-448; NaN
/// gives the NaN code.
pub fn e4m3_encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    let min_normal = 2f32.powi(-6);
    if a < min_normal {
        // Subnormals are multiples of 2^-9; 8 of them is the smallest normal
        // (code 0x08), which the code's bit layout gives by itself.
        return sign | (a * 2f32.powi(9)).round_ties_even() as u8;
    }
    let e = a.log2().floor() as i32;
    // log2 may round across a power of two: keep 1 <= f < 2.
    let e = if a < 2f32.powi(e) {
        e - 1
    } else if a >= 2f32.powi(e + 1) {
        e + 1
    } else {
        e
    };
    let f = a / 2f32.powi(e);
    let mut m = ((f - 1.0) * 8.0).round_ties_even() as i32;
    let mut e = e;
    if m == 8 {
        m = 0;
        e += 1;
    }
    let code = (((e + 7) as u8) << 3) | m as u8;
    sign | code.min(0x7e)
}

/// Quantizes one row into `codes`; returns its scale (1 for a row of zeros
/// or with no finite value).
pub fn quantize_row(row: &[f32], codes: &mut [u8]) -> f32 {
    let amax = row
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    // (A row of denormal-small values would give a zero scale: floor it.)
    let scale = if amax > 0.0 {
        (amax / E4M3_MAX).max(f32::MIN_POSITIVE)
    } else {
        1.0
    };
    for (c, &x) in codes.iter_mut().zip(row) {
        *c = e4m3_encode(x / scale);
    }
    scale
}

/// The values of a quantized row.
pub fn dequantize_row(codes: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = e4m3_decode(c) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips_and_the_range_is_ocp_e4m3() {
        for c in 0..=255u8 {
            let v = e4m3_decode(c);
            if c & 0x7f == 0x7f {
                assert!(v.is_nan(), "code {c:#x}");
                continue;
            }
            assert_eq!(
                e4m3_encode(v),
                if v == 0.0 { c & 0x80 } else { c },
                "code {c:#x} = {v}"
            );
        }
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0xb8), -1.0);
    }

    #[test]
    fn encoding_rounds_to_nearest_even_and_saturates() {
        // 1.0 (m 0) and 1.125 (m 1): the midpoint goes to the even code.
        assert_eq!(e4m3_encode(1.0625), 0x38);
        // 1.125 and 1.25: the midpoint 1.1875 goes to 1.25 (m 2, even).
        assert_eq!(e4m3_encode(1.1875), 0x3a);
        assert_eq!(e4m3_encode(1.05), 0x38);
        assert_eq!(e4m3_encode(1.2), 0x3a);
        // The top of a binade carries into the next exponent.
        assert_eq!(e4m3_decode(e4m3_encode(1.96)), 2.0);
        assert_eq!(e4m3_encode(1000.0), 0x7e);
        assert_eq!(e4m3_encode(-1e9), 0xfe);
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_encode(2f32.powi(-11)), 0x00); // below half the smallest subnormal
        assert_eq!(e4m3_encode(f32::NAN), 0x7f);
        // Every value between two neighbours goes to the nearer one.
        for c in 0x00..0x7eu8 {
            let (lo, hi) = (e4m3_decode(c), e4m3_decode(c + 1));
            for k in 1..16 {
                let x = lo + (hi - lo) * k as f32 / 16.0;
                let want = if x - lo < hi - x {
                    c
                } else if x - lo > hi - x {
                    c + 1
                } else if c % 2 == 0 {
                    c
                } else {
                    c + 1
                };
                assert_eq!(e4m3_encode(x), want, "{x} between {lo} and {hi}");
            }
        }
    }

    #[test]
    fn a_row_keeps_its_largest_value_and_a_relative_error_of_one_sixteenth() {
        let row: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
            .collect();
        let mut codes = vec![0u8; 128];
        let scale = quantize_row(&row, &mut codes);
        let mut back = vec![0f32; 128];
        dequantize_row(&codes, scale, &mut back);
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in row.iter().zip(&back) {
            // Normal range: half an ulp is 1/16 relative; below it, absolute.
            let tol = (a.abs() / 16.0).max(scale * 2f32.powi(-10)) * 1.0001;
            assert!((a - b).abs() <= tol, "{a} -> {b}");
        }
        assert_eq!(back.iter().fold(0f32, |m, v| m.max(v.abs())), amax);
        let mut z = vec![0u8; 4];
        assert_eq!(quantize_row(&[0.0; 4], &mut z), 1.0);
        assert_eq!(z, vec![0; 4]);
    }
}
