use super::*;
use crate::testutil::Lcg;
use half::f16;

fn paths() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available()).collect()
}

/// Byte offsets of a block's f16 scale fields.
fn scale_fields(qt: QType) -> &'static [usize] {
    match qt {
        QType::Q8_0 | QType::Q4_0 => &[0],
        QType::Q4_1 | QType::Q4K => &[0, 2],
        QType::Q6K => &[208],
    }
}

/// Random but valid blocks: every byte random, the f16 scale fields set to finite values.
fn random_weights(qt: QType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = Lcg(seed);
    let row = qt.row_bytes(k).unwrap();
    let mut w: Vec<u8> = (0..n * row).map(|_| rng.next_u31() as u8).collect();
    for block in w.chunks_exact_mut(qt.block_bytes()) {
        for &f in scale_fields(qt) {
            let v = (rng.uniform(1)[0] * 0.02) as f32;
            block[f..f + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
    }
    w
}

fn random_x(m: usize, k: usize, seed: u64) -> Vec<f32> {
    Lcg(seed).uniform(m * k).into_iter().map(|v| (v * 4.0) as f32).collect()
}

/// x · Wᵀ in f64 from the dequantized weights and the dequantized (8-bit) activations.
fn reference(qt: QType, x: &QuantRows, w: &[u8], n: usize) -> Vec<f64> {
    let k = x.k;
    let row = qt.row_bytes(k).unwrap();
    let mut wf = vec![0f32; n * k];
    for j in 0..n {
        dequantize_row(qt, &w[j * row..(j + 1) * row], &mut wf[j * k..(j + 1) * k]);
    }
    let mut y = vec![0f64; x.m * n];
    for i in 0..x.m {
        for j in 0..n {
            let mut s = 0f64;
            for c in 0..k {
                let xv = x.qs[i * k + c] as f64 * x.scales[i * k / 32 + c / 32] as f64;
                s += xv * wf[j * k + c] as f64;
            }
            y[i * n + j] = s;
        }
    }
    y
}

#[test]
fn every_path_has_the_same_integer_sums() {
    for qt in QType::ALL {
        let k = 512;
        let w = random_weights(qt, 3, k, 7);
        let x = QuantRows::new(&random_x(2, k, 11), 2, k, 1);
        let row = qt.row_bytes(k).unwrap();
        for j in 0..3 {
            for i in 0..2 {
                let wrow = &w[j * row..(j + 1) * row];
                let want = group_sums(Isa::Scalar, qt, wrow, x.row(i));
                for isa in paths() {
                    assert_eq!(group_sums(isa, qt, wrow, x.row(i)), want, "{qt:?} {isa:?}");
                }
            }
        }
    }
}

#[test]
fn products_match_the_dequantized_reference_on_every_path() {
    for qt in QType::ALL {
        let (n, k) = (37, 768);
        let k = k / qt.block_values() * qt.block_values();
        let w = random_weights(qt, n, k, 3);
        for m in [1, 4, 7] {
            let xf = random_x(m, k, 5 + m as u64);
            let acts = QuantRows::new(&xf, m, k, 1);
            let want = reference(qt, &acts, &w, n);
            let scale = want.iter().fold(0f64, |a, v| a.max(v.abs())).max(1e-6);
            for isa in paths() {
                for threads in [1, 2] {
                    let mut y = vec![0f32; m * n];
                    matmul(&xf, m, k, &w, n, qt, isa, threads, &mut y);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() <= 1e-5 * scale,
                            "{qt:?} {isa:?} m={m}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn quantize_then_dequantize_is_within_the_block_bound() {
    for qt in QType::ALL {
        let k = 1024;
        let x = random_x(1, k, 9);
        let mut q = vec![0u8; qt.row_bytes(k).unwrap()];
        quantize_row(qt, &x, &mut q);
        let mut back = vec![0f32; k];
        dequantize_row(qt, &q, &mut back);
        // Levels per block: 255 (Q8_0), 15 (4-bit), 63 (Q6_K); the K-quants add the error of
        // their 6/8-bit sub-block scales.
        let levels: f32 = match qt {
            QType::Q8_0 => 254.0,
            QType::Q4_0 | QType::Q4_1 => 15.0,
            QType::Q4K => 12.0,
            QType::Q6K => 50.0,
        };
        let range = 4.0; // the values span [-2, 2)
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= range / levels, "{qt:?}: {a} -> {b}");
        }
    }
}

#[test]
fn checks_name_the_disagreement() {
    assert!(check(QType::Q4_1, 2, 40, 0)
        .unwrap_err()
        .contains("not a multiple of the block size 32"));
    assert!(check(QType::Q4_1, 2, 64, 79).unwrap_err().contains("take 80 bytes"));
    assert_eq!(check(QType::Q6K, 3, 256, 630), Ok(210));
    assert_eq!(QType::from_name("q4_k"), Some(QType::Q4K));
}

#[test]
fn empty_and_degenerate_calls_do_not_panic() {
    use crate::kernels::{attention, decode};
    let sh = decode::Shape { b: 0, hq: 2, hk: 1, l: 4, d: 8, dv: 8 };
    assert!(decode::decode::<f32>(&[], &[], &[], &[], sh, 1.0, 2).unwrap().is_empty());
    let ash = attention::Shape { b: 1, hq: 1, hk: 1, tq: 2, tk: 2, d: 4, dv: 0 };
    let (q, k) = (vec![0f32; 8], vec![0f32; 8]);
    let args = attention::AttentionArgs {
        q: &q,
        k: &k,
        v: &[],
        shape: ash,
        causal: true,
        key_padding: None,
        scale: 1.0,
        threads: 1,
    };
    assert!(attention::forward(&args).is_err());
    let mut y = vec![0f32; 0];
    matmul(
        &[],
        0,
        64,
        &random_weights(QType::Q4_1, 3, 64, 1),
        3,
        QType::Q4_1,
        Isa::detect(),
        2,
        &mut y,
    );
}

#[test]
fn packed_rows_equal_the_reference_and_agree_bit_for_bit_across_paths() {
    for qt in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
        for (n, k, seed) in [(16, 32, 1u64), (48, 576, 2), (32, 1536, 3)] {
            let w = random_weights(qt, n, k, seed);
            let x = QuantRows::new(&random_x(2, k, seed + 10), 2, k, 1);
            let p = packed::Packed::new(qt, &w, n, k).expect("supported");
            for i in 0..2 {
                let want = reference(qt, &x, &w, n);
                let mut first: Option<Vec<f32>> = None;
                for isa in paths() {
                    // Every split into group ranges gives the same rows.
                    let mut y = vec![0f32; n];
                    let g = n / packed::ROWS;
                    packed::gemv(isa, &p, x.row(i), (0, g / 2), &mut y[..g / 2 * 16]);
                    packed::gemv(isa, &p, x.row(i), (g / 2, g), &mut y[g / 2 * 16..]);
                    for (j, v) in y.iter().enumerate() {
                        let r = want[i * n + j];
                        let tol = 2e-5 * (1.0 + r.abs());
                        assert!((*v as f64 - r).abs() < tol, "{qt:?} {isa:?} row {j}: {v} vs {r}");
                    }
                    match &first {
                        None => first = Some(y),
                        Some(f) => assert_eq!(
                            f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{qt:?} {isa:?} differs from the scalar path"
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn packed_matmul_rows_equal_the_one_row_product_bit_for_bit() {
    for qt in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
        let (m, n, k) = (7, 64, 320);
        let w = random_weights(qt, n, k, 21);
        let x = QuantRows::new(&random_x(m, k, 22), m, k, 1);
        let p = packed::Packed::new(qt, &w, n, k).unwrap();
        for isa in paths() {
            for threads in [1, 2] {
                let mut y = vec![0f32; m * n];
                packed::matmul(isa, &p, &x, threads, &mut y);
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    packed::gemv(Isa::Scalar, &p, x.row(i), (0, n / 16), &mut one);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&y[i * n..(i + 1) * n]), bits(&one), "{qt:?} {isa:?} row {i}");
                }
            }
        }
    }
}

#[test]
fn packing_refuses_what_it_cannot_interleave() {
    let w = random_weights(QType::Q4_1, 24, 64, 1);
    assert!(packed::Packed::new(QType::Q4_1, &w, 24, 64).is_none(), "24 rows: not whole groups");
    let w = random_weights(QType::Q4K, 16, 256, 1);
    assert!(packed::Packed::new(QType::Q4K, &w, 16, 256).is_none(), "Q4_K is not packed");
}

/// Timing of the batch-1 kernels, per type and path (not a test: `cargo test --release --
/// --ignored --nocapture quant_speed`).
#[test]
#[ignore]
fn quant_speed() {
    let (n, k, reps) = (1536usize, 576usize, 400);
    for qt in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
        let w = random_weights(qt, n, k, 9);
        let x = QuantRows::new(&random_x(1, k, 4), 1, k, 1);
        let p = packed::Packed::new(qt, &w, n, k).unwrap();
        let row = qt.row_bytes(k).unwrap();
        for isa in paths() {
            let mut y = vec![0f32; n];
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for (j, v) in y.iter_mut().enumerate() {
                    *v = dot::dot1(isa, qt, &w[j * row..(j + 1) * row], x.row(0));
                }
            }
            let rows = t.elapsed().as_secs_f64() / reps as f64;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                packed::gemv(isa, &p, x.row(0), (0, n / 16), &mut y);
            }
            let pk = t.elapsed().as_secs_f64() / reps as f64;
            let gb = |s: f64| w.len() as f64 / s / 1e9;
            println!("{qt:?} {isa:?}: rows {:.2} GB/s, packed {:.2} GB/s", gb(rows), gb(pk));
            let m = 64;
            let xm = QuantRows::new(&random_x(m, k, 5), m, k, 1);
            let mut ym = vec![0f32; m * n];
            let t = std::time::Instant::now();
            for _ in 0..reps / 8 {
                packed::matmul(isa, &p, &xm, 1, &mut ym);
            }
            let s = t.elapsed().as_secs_f64() / (reps / 8) as f64;
            println!("  m={m}: {:.1} GMAC/s", (m * n * k) as f64 / s / 1e9);
        }
    }
}

// ---- fuzzing: random shapes, random block bytes (every kind of f16 scale), every path

/// f16 scale bits of every kind: ordinary, the largest finite, subnormal, zero, any normal, and
/// (with `non_finite`) infinity and NaN; either sign.
fn scale_bits(rng: &mut Lcg, non_finite: bool) -> u16 {
    let sign = ((rng.next_u31() & 1) as u16) << 15;
    let kinds = if non_finite { 7 } else { 5 };
    let mag = match rng.next_u31() % kinds {
        0 => f16::from_f64((rng.uniform(1)[0] + 0.5) * 0.02).to_bits(),
        1 => f16::MAX.to_bits(),
        2 => 1 + (rng.next_u31() % 0x3ff) as u16, // subnormal
        3 => 0,
        4 => 0x0400 + (rng.next_u31() % 0x7800) as u16, // any normal, up to f16::MAX
        5 => f16::INFINITY.to_bits(),
        _ => f16::NAN.to_bits(),
    };
    sign | mag
}

/// Random bytes for every block, the f16 scale fields drawn by [`scale_bits`].
fn fuzz_weights(qt: QType, n: usize, k: usize, rng: &mut Lcg, non_finite: bool) -> Vec<u8> {
    let row = qt.row_bytes(k).unwrap();
    let mut w: Vec<u8> = (0..n * row).map(|_| rng.next_u31() as u8).collect();
    for block in w.chunks_exact_mut(qt.block_bytes()) {
        for &f in scale_fields(qt) {
            block[f..f + 2].copy_from_slice(&scale_bits(rng, non_finite).to_le_bytes());
        }
    }
    w
}

/// Activation rows of very different magnitudes (1e-20 .. 1e20, zeros, one outlier per row).
fn fuzz_x(m: usize, k: usize, rng: &mut Lcg) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mag = 10f64.powi((rng.next_u31() % 41) as i32 - 20);
        let zero = rng.next_u31().is_multiple_of(8);
        let row: Vec<f32> =
            rng.uniform(k).iter().map(|v| if zero { 0.0 } else { (v * mag) as f32 }).collect();
        x.extend(row);
        if !zero {
            let at = x.len() - 1 - rng.next_u31() as usize % k;
            x[at] *= 50.0;
        }
    }
    x
}

/// (x · Wᵀ, Σ|x·w|) in f64 over the dequantized weights and activations (the error bound's scale).
fn reference_with_scale(qt: QType, x: &QuantRows, w: &[u8], n: usize) -> (Vec<f64>, Vec<f64>) {
    let k = x.k;
    let row = qt.row_bytes(k).unwrap();
    let mut wf = vec![0f32; k];
    let (mut y, mut s) = (vec![0f64; x.m * n], vec![0f64; x.m * n]);
    for j in 0..n {
        dequantize_row(qt, &w[j * row..(j + 1) * row], &mut wf);
        for i in 0..x.m {
            let (mut acc, mut abs) = (0f64, 0f64);
            for (c, &wv) in wf.iter().enumerate() {
                let t = x.qs[i * k + c] as f64 * x.scales[i * k / 32 + c / 32] as f64 * wv as f64;
                acc += t;
                abs += t.abs();
            }
            y[i * n + j] = acc;
            s[i * n + j] = abs;
        }
    }
    (y, s)
}

#[test]
fn fuzz_every_path_against_the_scalar_path() {
    // Shapes: k a multiple of the block up to 3072, m 1..=20 (the 4-row tiles and the rest),
    // n 1..=70; every fourth case has infinite or NaN scales somewhere.
    let mut rng = Lcg(0x5eed_f00d);
    let cases = if cfg!(debug_assertions) { 12 } else { 200 };
    let (mut finite, mut poisoned) = (0usize, 0usize);
    for case in 0..cases {
        let qt = QType::ALL[case % 5];
        let bv = qt.block_values();
        let k = bv * (1 + rng.next_u31() as usize % (3072 / bv));
        let m = 1 + rng.next_u31() as usize % 20;
        let n = 1 + rng.next_u31() as usize % 70;
        let non_finite = case % 4 == 3;
        let w = fuzz_weights(qt, n, k, &mut rng, non_finite);
        let xf = fuzz_x(m, k, &mut rng);
        let acts = QuantRows::new(&xf, m, k, 1);
        let row = qt.row_bytes(k).unwrap();
        let what = format!("case {case}: {qt:?} m={m} n={n} k={k}");
        // The integer part: bit for bit on every path (scales play no part in it).
        for j in 0..n {
            let wrow = &w[j * row..(j + 1) * row];
            for i in 0..m {
                let want = group_sums(Isa::Scalar, qt, wrow, acts.row(i));
                for isa in paths() {
                    assert_eq!(group_sums(isa, qt, wrow, acts.row(i)), want, "{what} {isa:?}");
                }
            }
        }
        // The float part: within the f32 summation bound of the f64 reference, and finite
        // exactly where the scalar path is (a non-finite scale poisons its rows on every path).
        let (want, scale) = reference_with_scale(qt, &acts, &w, n);
        let mut scalar = vec![0f32; m * n];
        matmul(&xf, m, k, &w, n, qt, Isa::Scalar, 1, &mut scalar);
        for isa in paths() {
            for threads in [1, 2] {
                let mut y = vec![f32::NAN; m * n];
                matmul(&xf, m, k, &w, n, qt, isa, threads, &mut y);
                for (idx, (&a, &s)) in y.iter().zip(&scalar).enumerate() {
                    let at = format!("{what} {isa:?} threads={threads} at {idx}");
                    assert_eq!(a.is_finite(), s.is_finite(), "{at}: {a} vs scalar {s}");
                    if s.is_finite() {
                        finite += 1;
                        let bound = 2e-5 * scale[idx] + 1e-35;
                        assert!(
                            (a as f64 - want[idx]).abs() <= bound,
                            "{at}: {a} vs {}",
                            want[idx]
                        );
                        assert!((a as f64 - s as f64).abs() <= 2.0 * bound, "{at}: {a} vs {s}");
                    } else {
                        poisoned += 1;
                        assert!(!want[idx].is_finite() || scale[idx] > f32::MAX as f64, "{at}");
                    }
                }
            }
        }
    }
    // Both kinds of result were exercised.
    assert!(finite > 1000 && poisoned > 100, "{finite} finite, {poisoned} non-finite results");
}

#[test]
fn fuzz_dequantize_and_gather_never_panic_on_any_bytes() {
    let mut rng = Lcg(77);
    for case in 0..40 {
        let qt = QType::ALL[case % 5];
        let k = qt.block_values() * (1 + rng.next_u31() as usize % 4);
        let n = 1 + rng.next_u31() as usize % 9;
        let w = fuzz_weights(qt, n, k, &mut rng, true);
        let row = qt.row_bytes(k).unwrap();
        let mut out = vec![0f32; k];
        for j in 0..n {
            dequantize_row(qt, &w[j * row..(j + 1) * row], &mut out);
        }
        let ids: Vec<usize> = (0..5).map(|_| rng.next_u31() as usize % n).collect();
        let mut rows = vec![0f32; ids.len() * k];
        gather_rows(&w, k, qt, &ids, &mut rows);
        for (r, &id) in ids.iter().enumerate() {
            dequantize_row(qt, &w[id * row..(id + 1) * row], &mut out);
            let same =
                rows[r * k..(r + 1) * k].iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{qt:?}: gathered row {id} differs from its dequantized row");
        }
    }
}

#[test]
fn fuzz_check_refuses_every_malformed_shape_without_panicking() {
    let mut rng = Lcg(4242);
    for qt in QType::ALL {
        for _ in 0..2000 {
            let k = rng.next_u31() as usize % 2000;
            let n = rng.next_u31() as usize % 300;
            let good = qt.row_bytes(k).map(|r| r * n);
            let len = match (rng.next_u31() % 3, good) {
                (0, Some(g)) => g,
                (1, Some(g)) => g + 1 + rng.next_u31() as usize % 64,
                (_, Some(g)) if g > 0 => g - 1 - rng.next_u31() as usize % g.min(64),
                _ => rng.next_u31() as usize,
            };
            let r = check(qt, n, k, len);
            match good {
                Some(g) if g == len => {
                    assert_eq!(r, Ok(qt.row_bytes(k).unwrap()), "{qt:?} {n}x{k}")
                }
                _ => assert!(r.is_err(), "{qt:?} {n}x{k} with {len} bytes was accepted"),
            }
        }
        // Shapes whose byte count overflows usize are refused, not wrapped.
        let e = check(qt, usize::MAX / 2, qt.block_values() * 4, 0).unwrap_err();
        assert!(e.contains("overflow"), "{e}");
    }
}
