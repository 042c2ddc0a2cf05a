//! FP8 (e4m3) per-output-channel quantization on the host, byte for byte what the GPU
//! kernel (and compressed-tensors) write.
//!
//! Per row `x` of a weight of dtype `D` (bf16, fp16 or fp32):
//! 1. `amax = max |x|` (exact in `D`);
//! 2. `scale = RN_D(f32(amax) / 448)`; a zero scale becomes `eps(D)`;
//! 3. `q = x / scale` divided in fp32 and rounded once ([`Rounding::Fp32`], what
//!    compressed-tensors' Triton path does on sm90+ GPUs) or, for [`Rounding::Eager`] (its
//!    torch path), the fp32 quotient rounded to `D` first; `q + 0.0` (its zero point: `-0`
//!    becomes `+0`); clamped to `[-448, 448]`; rounded to nearest even e4m3.
//!
//! A row holding NaN or Inf gets a NaN scale and NaN bytes (`0x7F`): the caller reports it
//! as a non-finite weight (the GPU path gives such rows a NaN or Inf scale, which the
//! engine reports the same way).
//!
//! A tensor-parallel row slice (each rank holds some columns of every row) takes its scale
//! from the largest magnitude of the whole row, over every rank: [`rows_amax`] gives each
//! row's amax of the local slice, the caller all-reduces them (MAX), and
//! [`quantize_rows_with_amax`] runs step 1 as `amax = max(max |x|, given)` (the given amax
//! rounded up to `D`, which it is already when it came from [`rows_amax`]); steps 2 and 3
//! are unchanged, so a given amax equal to the row's own gives the bytes of
//! [`quantize_rows`].
//!
//! The bf16 rows (the common case) run on explicit AVX-512 or AVX2 intrinsics where the CPU
//! has them (module `x86`, chosen at run time; most values by a table of e4m3 bytes on
//! AVX-512 VBMI and on AVX2), byte for byte what the plain Rust loops here give; fp16 and
//! fp32 rows are plain Rust loops, which the compiler vectorizes for the widest instruction
//! set the CPU has.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use std::sync::OnceLock;
use std::time::Instant;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

#[cfg(target_arch = "x86_64")]
mod x86;

/// Largest finite e4m3 value.
pub const FP8_MAX: f32 = 448.0;
/// The e4m3 byte of a NaN row.
const FP8_NAN: u8 = 0x7F;

/// How the quotient is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Divide in fp32, round once to e4m3.
    Fp32,
    /// Divide in fp32, round to the weight's dtype, then to e4m3 (division "in `D`").
    Eager,
}

/// How to quantize the rows of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub dtype: Dtype,
    /// Elements per row (the input dimension).
    pub cols: u64,
    pub rounding: Rounding,
}

impl QuantSpec {
    pub fn new(dtype: Dtype, cols: u64, rounding: Rounding) -> Result<QuantSpec> {
        if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            return Err(Error::Invalid(format!(
                "host quantization takes BF16, F16 or F32 rows, not {dtype}"
            )));
        }
        if cols == 0 {
            return Err(Error::Invalid(
                "host quantization needs rows of at least one element".into(),
            ));
        }
        Ok(QuantSpec {
            dtype,
            cols,
            rounding,
        })
    }

    /// Bytes of one element (and of one scale).
    pub fn elem_bytes(&self) -> u64 {
        self.dtype.bits() / 8
    }

    /// Bytes of one source row.
    pub fn row_bytes(&self) -> u64 {
        self.cols * self.elem_bytes()
    }

    /// Bytes one quantized row takes: its e4m3 bytes and its scale.
    pub fn out_row_bytes(&self) -> u64 {
        self.cols + self.elem_bytes()
    }
}

/// Quantizes the whole rows in `src` (little-endian, `spec.dtype`) into `q` (one byte per
/// element) and `scales` (one `spec.dtype` value per row).
///
/// # Panics
/// If `src` is not whole rows or the outputs do not match it.
pub fn quantize_rows(spec: &QuantSpec, src: &[u8], q: &mut [u8], scales: &mut [u8]) {
    check_sizes(spec, src, q, scales);
    quantize_rows_on(Isa::detect(), spec, src, &[], q, scales);
}

/// The size checks of [`quantize_rows`].
fn check_sizes(spec: &QuantSpec, src: &[u8], q: &[u8], scales: &[u8]) {
    let rb = spec.row_bytes() as usize;
    assert!(
        src.len().is_multiple_of(rb),
        "host quantization: a partial row"
    );
    let rows = src.len() / rb;
    assert_eq!(
        q.len(),
        rows * spec.cols as usize,
        "host quantization: e4m3 buffer size"
    );
    assert_eq!(
        scales.len(),
        rows * spec.elem_bytes() as usize,
        "host quantization: scale buffer size"
    );
}

/// As [`quantize_rows`], with each row's scale taken from the larger of its own largest
/// magnitude and `amax[row]` (the row's amax over every tensor-parallel rank, after a MAX
/// all-reduce of [`rows_amax`]). A NaN or infinite `amax[row]` makes the row non-finite (NaN
/// scale and bytes), like a NaN in the row itself; the sign of `amax[row]` is ignored.
///
/// # Panics
/// As [`quantize_rows`], and if `amax` is not one value per row.
pub fn quantize_rows_with_amax(
    spec: &QuantSpec,
    src: &[u8],
    amax: &[f32],
    q: &mut [u8],
    scales: &mut [u8],
) {
    let rb = spec.row_bytes() as usize;
    assert_eq!(
        amax.len() * rb,
        src.len(),
        "host quantization: one given amax per row"
    );
    check_sizes(spec, src, q, scales);
    quantize_rows_on(Isa::detect(), spec, src, amax, q, scales);
}

/// The code path host quantization takes on this CPU: `"avx512vbmi"`, `"avx512"`,
/// `"avx2"` or `"generic"`.
pub fn isa_name() -> &'static str {
    match Isa::detect() {
        Isa::Generic => "generic",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vbmi => "avx512vbmi",
    }
}

/// One core's cost of quantizing a source byte of `dtype` (bf16, fp16 or fp32) on this CPU,
/// in picoseconds: measured once per process and dtype, the best of five passes over
/// 256 KiB of weight-like rows (Eager rounding, the slower) that stay in the core's cache,
/// as a reader thread's piece does. What the reader weighs against its idle time when it
/// decides whether to quantize a weight on the way.
pub fn core_ps_per_byte(dtype: Dtype) -> u64 {
    static MEASURED: [OnceLock<u64>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = match dtype {
        Dtype::BF16 => 0,
        Dtype::F16 => 1,
        _ => 2,
    };
    *MEASURED[slot].get_or_init(|| {
        const COLS: usize = 4096;
        let spec = QuantSpec::new(dtype, COLS as u64, Rounding::Eager)
            .expect("a dtype the quantizer takes");
        let rows = (256 << 10) / spec.row_bytes() as usize;
        // a sum of two uniforms scaled to a weight's range, no two rows alike
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let src: Vec<u8> = (0..rows * COLS)
            .flat_map(|_| {
                let v = (next() + next()) * 0.04;
                match dtype {
                    Dtype::BF16 => round_bf16(v).to_le_bytes().to_vec(),
                    Dtype::F16 => f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                    _ => v.to_le_bytes().to_vec(),
                }
            })
            .collect();
        let mut q = vec![0u8; rows * COLS];
        let mut scales = vec![0u8; rows * spec.elem_bytes() as usize];
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                quantize_rows(&spec, &src, &mut q, &mut scales);
                t.elapsed()
            })
            .min()
            .unwrap_or_default();
        let ps = best.as_nanos() as u64 * 1000 / src.len() as u64;
        // a preempted pass or a clock that did not move must not make it free or absurd
        ps.clamp(20, 5000)
    })
}

/// Whether every scale in `scales` (little-endian `dtype` values, as [`quantize_rows`]
/// writes them) is finite: false where a row held NaN or Inf (its scale is NaN). The reader
/// checks each chunk's scales here, in the cache, so a load need not copy them back.
pub fn scales_finite(dtype: Dtype, scales: &[u8]) -> bool {
    match dtype {
        Dtype::F32 => scales
            .chunks_exact(4)
            .all(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7F80_0000 != 0x7F80_0000),
        _ => {
            let exp = if dtype == Dtype::F16 { 0x7C00 } else { 0x7F80 };
            scales
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & exp != exp)
        }
    }
}

/// The largest magnitude of each whole row of `src` (little-endian `spec.dtype`), as f32
/// (exact: every bf16, fp16 and fp32 value is an f32); a row holding NaN or Inf gives +Inf,
/// so that a MAX all-reduce carries it to every rank (a NaN may not survive one) and
/// [`quantize_rows_with_amax`] makes the row non-finite there.
///
/// # Panics
/// If `src` is not whole rows or `out` is not one value per row.
pub fn rows_amax(spec: &QuantSpec, src: &[u8], out: &mut [f32]) {
    let rb = spec.row_bytes() as usize;
    assert_eq!(out.len() * rb, src.len(), "row amax: one value per row");
    rows_amax_on(Isa::detect(), spec, src, out);
}

/// [`rows_amax`] on the code path of `isa` (bf16 rows only; the others are plain loops).
fn rows_amax_on(isa: Isa, spec: &QuantSpec, src: &[u8], out: &mut [f32]) {
    assert!(isa.available(), "row amax: the CPU lacks {isa:?}");
    let rb = spec.row_bytes() as usize;
    for (row, o) in src.chunks_exact(rb).zip(out.iter_mut()) {
        let bits = match (spec.dtype, isa) {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            #[cfg(target_arch = "x86_64")]
            (Dtype::BF16, Isa::Avx512 | Isa::Avx512Vbmi) => {
                u32::from(unsafe { x86::bf16_amax_avx512(row) })
            }
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Dtype::BF16, Isa::Avx2) => u32::from(unsafe { x86::bf16_amax_avx2(row) }),
            (dtype, _) => magnitude_max(dtype, row),
        };
        *o = amax_f32(spec.dtype, bits);
    }
}

/// The largest magnitude bits (sign cleared) of the `dtype` values in `row`.
#[inline]
fn magnitude_max(dtype: Dtype, row: &[u8]) -> u32 {
    match dtype {
        Dtype::F32 => row.chunks_exact(4).fold(0u32, |m, b| {
            m.max(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7FFF_FFFF)
        }),
        _ => row.chunks_exact(2).fold(0u32, |m, b| {
            m.max((u16::from_le_bytes([b[0], b[1]]) & 0x7FFF) as u32)
        }),
    }
}

/// The f32 value of magnitude bits `m` of `dtype`; a non-finite one is +Inf.
#[inline]
fn amax_f32(dtype: Dtype, m: u32) -> f32 {
    let v = match dtype {
        Dtype::BF16 => bf16_f32(m as u16),
        Dtype::F16 => f16::from_bits(m as u16).to_f32(),
        _ => f32::from_bits(m),
    };
    if v.is_finite() {
        v
    } else {
        f32::INFINITY
    }
}

/// A given amax as magnitude bits of `dtype`, rounded up (so never below the value); a NaN
/// or Inf one is the dtype's Inf (a non-finite row). `floor` empty: no given amax (0).
#[inline(always)]
fn floor_bits(dtype: Dtype, floor: &[f32], row: usize) -> u32 {
    let Some(&v) = floor.get(row) else {
        return 0;
    };
    let v = v.abs();
    match dtype {
        Dtype::BF16 if !v.is_finite() => 0x7F80,
        Dtype::BF16 => (v.to_bits() + 0xFFFF) >> 16,
        Dtype::F16 if !v.is_finite() => 0x7C00,
        Dtype::F16 => {
            let h = f16::from_f32(v);
            (h.to_bits() + u16::from(h.to_f32() < v)) as u32
        }
        _ if !v.is_finite() => 0x7F80_0000,
        _ => v.to_bits(),
    }
}

/// The instruction sets the quantizer has code paths for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// Plain Rust, the reference.
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 with VBMI: the bf16 rows' bulk by table (byte permutes).
    #[cfg(target_arch = "x86_64")]
    Avx512Vbmi,
}

impl Isa {
    /// The widest one this CPU has.
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::Avx512Vbmi.available() {
                return Isa::Avx512Vbmi;
            }
            if Isa::Avx512.available() {
                return Isa::Avx512;
            }
            if Isa::Avx2.available() {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    }

    /// Whether this CPU has every feature the path is compiled for.
    fn available(self) -> bool {
        match self {
            Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vbmi => {
                Isa::Avx512.available() && std::arch::is_x86_feature_detected!("avx512vbmi")
            }
        }
    }
}

/// [`quantize_rows`] on the code path of `isa` (after its size checks).
///
/// # Panics
/// If the CPU lacks `isa`.
/// `floor`: a given amax per row ([`quantize_rows_with_amax`]), or empty.
fn quantize_rows_on(
    isa: Isa,
    spec: &QuantSpec,
    src: &[u8],
    floor: &[f32],
    q: &mut [u8],
    scales: &mut [u8],
) {
    assert!(isa.available(), "host quantization: the CPU lacks {isa:?}");
    match isa {
        Isa::Generic => rows_generic(spec, src, floor, q, scales),
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { rows_avx2(spec, src, floor, q, scales) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rows_avx512(spec, false, src, floor, q, scales) },
        // SAFETY: as above (VBMI included).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vbmi => unsafe { rows_avx512(spec, true, src, floor, q, scales) },
    }
}

/// bf16 rows with explicit intrinsics (by table where `vbmi`); fp16 and fp32 rows as the
/// compiler vectorizes [`rows_generic`] for these features.
///
/// # Safety
/// `vbmi`: the CPU has AVX-512 VBMI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rows_avx512(
    spec: &QuantSpec,
    vbmi: bool,
    src: &[u8],
    floor: &[f32],
    q: &mut [u8],
    scales: &mut [u8],
) {
    match spec.dtype {
        // SAFETY: the caller's contract on `vbmi`.
        Dtype::BF16 => unsafe {
            x86::bf16_rows_avx512(
                spec.cols as usize,
                spec.rounding == Rounding::Eager,
                vbmi,
                src,
                floor,
                q,
                scales,
            )
        },
        _ => rows_generic(spec, src, floor, q, scales),
    }
}

/// As [`rows_avx512`], on AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_avx2(spec: &QuantSpec, src: &[u8], floor: &[f32], q: &mut [u8], scales: &mut [u8]) {
    match spec.dtype {
        Dtype::BF16 => x86::bf16_rows_avx2(
            spec.cols as usize,
            spec.rounding == Rounding::Eager,
            src,
            floor,
            q,
            scales,
        ),
        _ => rows_generic(spec, src, floor, q, scales),
    }
}

#[inline(always)]
fn rows_generic(spec: &QuantSpec, src: &[u8], floor: &[f32], q: &mut [u8], scales: &mut [u8]) {
    let cols = spec.cols as usize;
    let eb = spec.elem_bytes() as usize;
    let eager = spec.rounding == Rounding::Eager;
    let mut row_f32: Vec<f32> = Vec::new();
    for (r, (row, qrow)) in src
        .chunks_exact(cols * eb)
        .zip(q.chunks_exact_mut(cols))
        .enumerate()
    {
        let scale = &mut scales[r * eb..(r + 1) * eb];
        let fl = floor_bits(spec.dtype, floor, r);
        match spec.dtype {
            Dtype::BF16 => {
                let s = bf16_row(row, qrow, eager, fl as u16);
                scale.copy_from_slice(&s.to_le_bytes());
            }
            Dtype::F16 => {
                let s = f16_row(row, qrow, eager, fl as u16, &mut row_f32);
                scale.copy_from_slice(&s.to_le_bytes());
            }
            _ => {
                let s = f32_row(row, qrow, fl);
                scale.copy_from_slice(&s.to_le_bytes());
            }
        }
    }
}

/// Round to nearest even bf16 (finite inputs).
#[inline(always)]
fn round_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn bf16_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// e4m3 of a finite `v`, after the zero point and the clamp.
#[inline(always)]
fn e4m3(v: f32) -> u8 {
    let v = (v + 0.0).clamp(-FP8_MAX, FP8_MAX);
    let bits = v.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7FFF_FFFF;
    // normal (|v| >= 2^-6): round the fp32 significand to 3 bits, nearest even, and rebias
    // the exponent (127 -> 7); a carry moves into the exponent, which is right.
    let normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20).wrapping_sub(120 << 3);
    // subnormal: |v| / 2^-9 rounded to an integer (nearest even) is the byte itself; 8
    // (2^-6) is the smallest normal's byte.
    let sub = (f32::from_bits(a) * 512.0 + 8_388_608.0).to_bits() & 0x7F_FFFF;
    let mag = if a >= 0x3C80_0000 { normal } else { sub };
    sign | mag as u8
}

/// `RN(x / s)` in fp32, for `x` and `s` bf16 values (`s` positive, normal), without a
/// division: `r = RN(1/s)`, `q = RN(x r)`, the exact remainder `x - q s` (one fma), and
/// `RN(q + rem r)` (Markstein's correction). Equal to `x / s` for every pair of bf16
/// significands (`quotient_matches_division_for_every_bf16_significand_pair`); the steps
/// scale exactly with the exponents, so it is equal for every bf16 pair whose quotient is a
/// normal fp32, and quotients below that are far below e4m3's smallest step (2^-10) and
/// keep their sign, so their e4m3 bytes are equal too (the tests check every bf16 value).
/// Subnormal scales (whose reciprocal overflows) divide instead.
#[inline(always)]
fn bf16_quotient(x: f32, s: f32, r: f32) -> f32 {
    let q = x * r;
    let rem = (-q).mul_add(s, x);
    rem.mul_add(r, q)
}

/// One bf16 row; its amax is at least `floor` (magnitude bits). Returns its scale.
#[inline(always)]
fn bf16_row(row: &[u8], q: &mut [u8], eager: bool, floor: u16) -> u16 {
    // SAFETY: every bit pattern is a valid u16, and align_to leaves an unaligned head or
    // tail as bytes (then the row is converted element by element instead).
    let (head, xs, tail) = unsafe { row.align_to::<u16>() };
    if !head.is_empty() || !tail.is_empty() {
        let xs: Vec<u16> = row
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        return bf16_row_u16(&xs, q, eager, floor);
    }
    bf16_row_u16(xs, q, eager, floor)
}

#[inline(always)]
fn bf16_row_u16(xs: &[u16], q: &mut [u8], eager: bool, floor: u16) -> u16 {
    let m = xs
        .iter()
        .fold(floor, |m, &b| m.max(u16::from_le(b) & 0x7FFF));
    if m >= 0x7F80 {
        q.fill(FP8_NAN);
        return 0x7FC0;
    }
    let mut s = round_bf16(bf16_f32(m) / FP8_MAX);
    if s == 0 {
        s = 0x3C00; // 2^-7, bf16's eps
    }
    let sf = bf16_f32(s);
    if sf < f32::MIN_POSITIVE {
        // a subnormal scale: 1/s overflows, so divide
        for (o, &b) in q.iter_mut().zip(xs) {
            let v = bf16_f32(u16::from_le(b)) / sf;
            *o = e4m3(if eager { bf16_f32(round_bf16(v)) } else { v });
        }
        return s;
    }
    let r = 1.0 / sf;
    for (o, &b) in q.iter_mut().zip(xs) {
        let v = bf16_quotient(bf16_f32(u16::from_le(b)), sf, r);
        *o = e4m3(if eager { bf16_f32(round_bf16(v)) } else { v });
    }
    s
}

#[inline(always)]
fn f16_row(row: &[u8], q: &mut [u8], eager: bool, floor: u16, xs: &mut Vec<f32>) -> u16 {
    let bits: Vec<u16> = row
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let m = bits.iter().fold(floor, |m, &b| m.max(b & 0x7FFF));
    if m >= 0x7C00 {
        q.fill(FP8_NAN);
        return 0x7E00;
    }
    let mut s = f16::from_f32(f16::from_bits(m).to_f32() / FP8_MAX);
    if s.to_bits() == 0 {
        s = f16::EPSILON;
    }
    let sf = s.to_f32();
    let halves: &[f16] = bits.as_slice().reinterpret_cast();
    xs.resize(halves.len(), 0.0);
    halves.convert_to_f32_slice(xs);
    for v in xs.iter_mut() {
        *v /= sf;
    }
    if eager {
        let mut h = vec![f16::ZERO; xs.len()];
        h.convert_from_f32_slice(xs);
        h.convert_to_f32_slice(xs);
    }
    for (o, &v) in q.iter_mut().zip(xs.iter()) {
        *o = e4m3(v);
    }
    s.to_bits()
}

#[inline(always)]
fn f32_row(row: &[u8], q: &mut [u8], floor: u32) -> f32 {
    let mut m: u32 = floor;
    for b in row.chunks_exact(4) {
        m = m.max(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7FFF_FFFF);
    }
    if m >= 0x7F80_0000 {
        q.fill(FP8_NAN);
        return f32::NAN;
    }
    let mut s = f32::from_bits(m) / FP8_MAX;
    if s == 0.0 {
        s = f32::EPSILON;
    }
    for (o, b) in q.iter_mut().zip(row.chunks_exact(4)) {
        *o = e4m3(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) / s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an e4m3fn byte (NaN for 0x7F/0xFF).
    fn e4m3_value(b: u8) -> f64 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 0xF) as i32;
        let m = (b & 7) as f64;
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        sign * if e == 0 {
            m / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    /// Nearest e4m3 by search; ties to the even byte (the one with an even significand).
    fn e4m3_slow(v: f32) -> u8 {
        let v = (v as f64).clamp(-448.0, 448.0);
        let mut best = 0u8;
        let mut best_d = f64::INFINITY;
        for b in 0u8..=0xFE {
            let x = e4m3_value(b);
            if x.is_nan() || (x == 0.0 && b == 0x80) {
                continue;
            }
            let d = (x - v).abs();
            if d < best_d || (d == best_d && b & 1 == 0) {
                best = b;
                best_d = d;
            }
        }
        if best == 0 && v.is_sign_negative() && v != 0.0 {
            0x80
        } else {
            best
        }
    }

    #[test]
    fn e4m3_matches_a_search_for_every_bf16_quotient() {
        for bits in 0u16..=0xFFFF {
            let v = bf16_f32(bits);
            if !v.is_finite() {
                continue;
            }
            assert_eq!(e4m3(v), e4m3_slow(v), "bf16 bits {bits:#06x} = {v}");
        }
        for v in [
            0.0f32,
            -0.0,
            448.0,
            -448.0,
            1e30,
            -1e30,
            464.0,
            2f32.powi(-10),
            2f32.powi(-10) * 1.000001,
        ] {
            assert_eq!(e4m3(v), e4m3_slow(v), "{v}");
        }
    }

    #[test]
    fn quotient_matches_division_for_every_bf16_significand_pair() {
        // x = +-(1 + i/128) 2^ex, s = (1 + j/128) 2^es: in the normal range the fma steps
        // are exact scalings of these
        for i in 0..128u32 {
            for j in 0..128u32 {
                for (ex, es) in [(0i32, 0i32), (3, -5), (-20, 40), (100, -20), (-100, 20)] {
                    for sign in [1.0f32, -1.0] {
                        let x = sign * (1.0 + i as f32 / 128.0) * 2f32.powi(ex);
                        let s = (1.0 + j as f32 / 128.0) * 2f32.powi(es);
                        let got = bf16_quotient(x, s, 1.0 / s);
                        assert_eq!(got.to_bits(), (x / s).to_bits(), "{x} / {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rows_match_the_scalar_math() {
        let spec = QuantSpec::new(Dtype::BF16, 4, Rounding::Fp32).unwrap();
        let row: [f32; 4] = [1.0, -2.0, 0.5, 0.0];
        let src: Vec<u8> = row
            .iter()
            .flat_map(|&v| round_bf16(v).to_le_bytes())
            .collect();
        let mut q = [0u8; 4];
        let mut s = [0u8; 2];
        quantize_rows(&spec, &src, &mut q, &mut s);
        let scale = bf16_f32(u16::from_le_bytes(s));
        assert_eq!(u16::from_le_bytes(s), round_bf16(2.0 / 448.0));
        for (i, &v) in row.iter().enumerate() {
            assert_eq!(q[i], e4m3_slow(v / scale));
        }
    }

    #[test]
    fn zero_and_non_finite_rows() {
        let spec = QuantSpec::new(Dtype::BF16, 3, Rounding::Fp32).unwrap();
        let mut src = vec![0u8; 6];
        src.extend_from_slice(&[0x80, 0x7F, 0, 0, 0, 0]); // +inf
        let mut q = [1u8; 6];
        let mut s = [0u8; 4];
        quantize_rows(&spec, &src, &mut q, &mut s);
        assert_eq!(&q[..3], &[0, 0, 0]);
        assert_eq!(u16::from_le_bytes([s[0], s[1]]), 0x3C00);
        assert_eq!(&q[3..], &[FP8_NAN; 3]);
        assert!(bf16_f32(u16::from_le_bytes([s[2], s[3]])).is_nan());
    }

    #[test]
    fn scales_of_non_finite_rows_are_found() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let spec = QuantSpec::new(dtype, 4, Rounding::Fp32).unwrap();
            let eb = spec.elem_bytes() as usize;
            let one: Vec<u8> = match dtype {
                Dtype::BF16 => 0x3F80u16.to_le_bytes().to_vec(),
                Dtype::F16 => 0x3C00u16.to_le_bytes().to_vec(),
                _ => 1f32.to_le_bytes().to_vec(),
            };
            let inf: Vec<u8> = match dtype {
                Dtype::BF16 => 0x7F80u16.to_le_bytes().to_vec(),
                Dtype::F16 => 0x7C00u16.to_le_bytes().to_vec(),
                _ => f32::INFINITY.to_le_bytes().to_vec(),
            };
            let finite_rows: Vec<u8> = one.repeat(8);
            let mut with_inf = finite_rows.clone();
            with_inf[6 * eb..7 * eb].copy_from_slice(&inf); // row 1
            for (src, finite) in [
                (&finite_rows, true),
                (&with_inf, false),
                (&vec![0u8; 8 * eb], true),
            ] {
                let mut q = vec![0u8; 8];
                let mut s = vec![0u8; 2 * eb];
                quantize_rows(&spec, src, &mut q, &mut s);
                assert_eq!(scales_finite(dtype, &s), finite, "{dtype}");
            }
        }
        assert!(scales_finite(Dtype::BF16, &[]));
    }

    #[test]
    fn specs_are_checked() {
        assert!(QuantSpec::new(Dtype::I8, 4, Rounding::Fp32).is_err());
        assert!(QuantSpec::new(Dtype::BF16, 0, Rounding::Fp32).is_err());
        let s = QuantSpec::new(Dtype::F32, 10, Rounding::Eager).unwrap();
        assert_eq!((s.row_bytes(), s.out_row_bytes()), (40, 14));
    }

    /// The code paths this CPU has, besides the generic one.
    fn simd_isas() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        isas.extend([Isa::Avx2, Isa::Avx512, Isa::Avx512Vbmi]);
        isas.retain(|i| i.available());
        isas
    }

    /// Quantizes `src` on `isa`: (e4m3 bytes, scales).
    fn quantize_on(isa: Isa, spec: &QuantSpec, src: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let rows = src.len() / spec.row_bytes() as usize;
        let mut q = vec![0xAAu8; rows * spec.cols as usize];
        let mut s = vec![0xAAu8; rows * spec.elem_bytes() as usize];
        quantize_rows_on(isa, spec, src, &[], &mut q, &mut s);
        (q, s)
    }

    /// Every SIMD path gives the generic path's bytes for `src`, read from an even address
    /// and from an odd one.
    fn check_paths(spec: &QuantSpec, src: &[u8]) {
        let want = quantize_on(Isa::Generic, spec, src);
        let mut shifted = vec![0u8; src.len() + 1];
        shifted[1..].copy_from_slice(src);
        let rb = spec.row_bytes() as usize;
        for isa in simd_isas() {
            for (offset, src) in [(0, src), (1, &shifted[1..])] {
                let got = quantize_on(isa, spec, src);
                if got == want {
                    continue;
                }
                // name the first row that differs
                let cols = spec.cols as usize;
                let eb = spec.elem_bytes() as usize;
                for r in 0..src.len() / rb {
                    let (gq, wq) = (&got.0[r * cols..][..cols], &want.0[r * cols..][..cols]);
                    let (gs, ws) = (&got.1[r * eb..][..eb], &want.1[r * eb..][..eb]);
                    if gq != wq || gs != ws {
                        let i = (0..cols).find(|&i| gq[i] != wq[i]).unwrap_or(0);
                        panic!(
                            "{isa:?} {spec:?} offset {offset} row {r}: scale {gs:02x?} vs \
                             {ws:02x?}; element {i} ({:02x?}): {:#04x} vs {:#04x}",
                            &src[r * rb + i * eb..][..eb],
                            gq[i],
                            wq[i]
                        );
                    }
                }
                unreachable!();
            }
        }
    }

    /// A small xorshift generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn simd_paths_match_generic_for_every_finite_bf16_value() {
        let finite: Vec<u16> = (0u16..=0xFFFF).filter(|b| b & 0x7FFF < 0x7F80).collect();
        // rows of an amax element and 256 consecutive patterns (two binades of one sign);
        // pass j puts the amax j / 2 binades (with a varying significand) above the
        // largest pattern, so the quotients run from e4m3's top through its subnormals
        // and below, and the scales from subnormal (the first rows) to the largest
        const W: usize = 256;
        let mut src = Vec::new();
        for j in 0..28u16 {
            for (k, chunk) in finite.chunks(W).enumerate() {
                let mut row = [0u16; W + 1];
                let top = chunk.iter().map(|b| b & 0x7FFF).max().unwrap();
                let amax = (top + j * 0x40 + (k as u16 * 37) % 0x80).min(0x7F7F);
                row[0] = if k % 2 == 0 { amax } else { amax | 0x8000 };
                row[1..=chunk.len()].copy_from_slice(chunk);
                src.extend(row.iter().flat_map(|b| b.to_le_bytes()));
            }
        }
        for rounding in [Rounding::Fp32, Rounding::Eager] {
            let spec = QuantSpec::new(Dtype::BF16, W as u64 + 1, rounding).unwrap();
            check_paths(&spec, &src);
        }
    }

    /// `n` random bf16 values of a row: random signs, significands and exponents near
    /// `exp` (and now and then a zero, a -0 or a value far below).
    fn random_bf16_row(rng: &mut Rng, n: usize, exp: u16) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let b = rng.next();
                let sign = (b as u16) & 0x8000;
                let e = match b >> 60 {
                    0 => 0,
                    1 => exp.saturating_sub(40),
                    _ => exp.saturating_sub(((b >> 20) % 14) as u16),
                };
                sign | (e << 7) | ((b >> 8) as u16 & 0x7F)
            })
            .collect()
    }

    #[test]
    fn simd_paths_match_generic_for_random_rows() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let lens = (1..=70).chain([127, 128, 129, 4096, 4099]);
        for cols in lens {
            let mut src = Vec::new();
            let rows = if cols > 1000 { 6 } else { 24 };
            for r in 0..rows {
                // exponents from bf16's subnormal scales to its largest values
                let exp = [1, 8, 10, 11, 20, 60, 100, 120, 127, 134, 200, 254][r % 12];
                let mut row = random_bf16_row(&mut rng, cols, exp);
                match rng.below(8) {
                    0 => row.fill(0),
                    1 => row.fill(0x8000),
                    2 => {
                        // a non-finite value anywhere (the tail included)
                        let i = rng.below(cols as u64) as usize;
                        row[i] = [0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x7F81][rng.below(5) as usize];
                    }
                    _ => {}
                }
                src.extend(row.iter().flat_map(|b| b.to_le_bytes()));
            }
            for rounding in [Rounding::Fp32, Rounding::Eager] {
                let spec = QuantSpec::new(Dtype::BF16, cols as u64, rounding).unwrap();
                check_paths(&spec, &src);
            }
        }
    }

    /// Rows with no zero and no value far below their largest, as weights are: the blocks
    /// take the table (64 values on [`Isa::Avx512Vbmi`], 32 on [`Isa::Avx2`]) rather than
    /// the arithmetic, except where a quotient lands in or near e4m3's subnormals (every
    /// fourth row reaches them).
    #[test]
    fn simd_paths_match_generic_for_rows_of_normal_quotients() {
        let mut rng = Rng(0x51_7CC1_B727_220A);
        for cols in [64usize, 65, 127, 128, 200, 4096] {
            let mut src = Vec::new();
            for r in 0..32 {
                let exp = [9u16, 60, 118, 121, 124, 127, 130, 200, 254][r % 9];
                // 12 binades keep every quotient above 2^-6; 17 reach e4m3's subnormals
                let spread = if r % 4 == 0 { 17 } else { 12 };
                let row: Vec<u16> = (0..cols)
                    .map(|_| {
                        let b = rng.next();
                        let e = exp.saturating_sub(((b >> 20) % spread) as u16).max(1);
                        (b as u16 & 0x8000) | (e << 7) | ((b >> 8) as u16 & 0x7F)
                    })
                    .collect();
                src.extend(row.iter().flat_map(|b| b.to_le_bytes()));
            }
            for rounding in [Rounding::Fp32, Rounding::Eager] {
                let spec = QuantSpec::new(Dtype::BF16, cols as u64, rounding).unwrap();
                check_paths(&spec, &src);
            }
        }
    }

    #[test]
    fn a_cores_quantization_cost_is_measured_once_and_plausible() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let ps = core_ps_per_byte(dtype);
            assert!((20..=5000).contains(&ps), "{dtype}: {ps} ps a byte");
            assert_eq!(
                core_ps_per_byte(dtype),
                ps,
                "{dtype}: measured once per process"
            );
        }
    }

    #[test]
    fn simd_paths_match_generic_for_zero_subnormal_scale_and_non_finite_rows() {
        for cols in [1usize, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100] {
            let mut rows: Vec<Vec<u16>> = vec![vec![0; cols], vec![0x8000; cols]];
            // subnormal scales: an amax below 2^-117 (bf16 subnormals among them)
            for amax in [0x0001u16, 0x0040, 0x007F, 0x0080, 0x0500, 0x0555, 0x05FF] {
                let mut row: Vec<u16> = (0..cols as u16).map(|i| (i * 13) % amax).collect();
                row[cols / 2] = amax | 0x8000;
                for (i, b) in row.iter_mut().enumerate() {
                    if i % 3 == 1 {
                        *b |= 0x8000;
                    }
                }
                rows.push(row);
            }
            // the smallest normal scale
            rows.push((0..cols as u16).map(|i| 0x0580 - i % 0x40).collect());
            for bad in [0x7F80u16, 0xFF80, 0x7FC0, 0xFFC1] {
                for at in [0, cols / 2, cols - 1] {
                    let mut row = vec![0x3F80u16; cols];
                    row[at] = bad;
                    rows.push(row);
                }
            }
            let src: Vec<u8> = rows
                .iter()
                .flatten()
                .flat_map(|b| b.to_le_bytes())
                .collect();
            for rounding in [Rounding::Fp32, Rounding::Eager] {
                let spec = QuantSpec::new(Dtype::BF16, cols as u64, rounding).unwrap();
                check_paths(&spec, &src);
                let (q, s) = quantize_on(Isa::detect(), &spec, &src);
                // the zero rows: zero bytes and bf16's eps; the non-finite ones: NaN
                assert!(q[..2 * cols].iter().all(|&b| b == 0));
                assert_eq!(&s[..4], &[0x00, 0x3C, 0x00, 0x3C]);
                let bad = rows.len() - 12;
                assert!(q[bad * cols..].iter().all(|&b| b == FP8_NAN));
                assert!(s[bad * 2..].chunks(2).all(|b| b == [0xC0, 0x7F]));
            }
        }
    }

    #[test]
    fn simd_paths_match_generic_for_fp16_and_fp32_rows() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for cols in [1usize, 7, 16, 33, 100] {
            for dtype in [Dtype::F16, Dtype::F32] {
                let eb = (dtype.bits() / 8) as usize;
                let src: Vec<u8> = (0..4 * cols)
                    .flat_map(|_| {
                        let v = (rng.below(2001) as f32 - 1000.0) / 37.0;
                        if eb == 2 {
                            f16::from_f32(v).to_bits().to_le_bytes().to_vec()
                        } else {
                            v.to_le_bytes().to_vec()
                        }
                    })
                    .collect();
                for rounding in [Rounding::Fp32, Rounding::Eager] {
                    let spec = QuantSpec::new(dtype, cols as u64, rounding).unwrap();
                    check_paths(&spec, &src);
                }
            }
        }
    }

    /// Random rows of `dtype` (a zero row and a -0 row among them), as bytes.
    fn random_rows(rng: &mut Rng, dtype: Dtype, rows: usize, cols: usize) -> Vec<u8> {
        (0..rows)
            .flat_map(|r| {
                let exp = [120u16, 127, 100, 130][r % 4];
                let row = random_bf16_row(rng, cols, exp);
                row.into_iter().flat_map(move |b| {
                    let v = if r == 1 {
                        0.0
                    } else if r == 2 {
                        -0.0
                    } else {
                        bf16_f32(b)
                    };
                    match dtype {
                        Dtype::BF16 => round_bf16(v).to_le_bytes().to_vec(),
                        Dtype::F16 => f16::from_f32(v / 1e4).to_bits().to_le_bytes().to_vec(),
                        _ => (v * 1.000_123).to_le_bytes().to_vec(),
                    }
                })
            })
            .collect()
    }

    /// [`quantize_rows_with_amax`] on `isa`.
    fn quantize_with_on(
        isa: Isa,
        spec: &QuantSpec,
        src: &[u8],
        amax: &[f32],
    ) -> (Vec<u8>, Vec<u8>) {
        let rows = src.len() / spec.row_bytes() as usize;
        let mut q = vec![0xAAu8; rows * spec.cols as usize];
        let mut s = vec![0xAAu8; rows * spec.elem_bytes() as usize];
        check_sizes(spec, src, &q, &s);
        quantize_rows_on(isa, spec, src, amax, &mut q, &mut s);
        (q, s)
    }

    #[test]
    fn a_given_amax_equal_to_the_rows_own_gives_the_same_bytes() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            for cols in [1usize, 5, 16, 33, 64, 100, 257] {
                let src = random_rows(&mut rng, dtype, 9, cols);
                for rounding in [Rounding::Fp32, Rounding::Eager] {
                    let spec = QuantSpec::new(dtype, cols as u64, rounding).unwrap();
                    let mut amax = vec![0f32; 9];
                    rows_amax(&spec, &src, &mut amax);
                    let want = quantize_on(Isa::Generic, &spec, &src);
                    let mut isas = simd_isas();
                    isas.push(Isa::Generic);
                    for isa in isas {
                        let mut own = vec![0f32; 9];
                        rows_amax_on(isa, &spec, &src, &mut own);
                        assert_eq!(own, amax, "{isa:?} {spec:?}");
                        assert_eq!(
                            quantize_with_on(isa, &spec, &src, &amax),
                            want,
                            "{isa:?} {spec:?}"
                        );
                        // no floor at all (0) is the row's own amax too
                        assert_eq!(quantize_with_on(isa, &spec, &src, &[0.0; 9]), want);
                    }
                }
            }
        }
    }

    #[test]
    fn a_larger_given_amax_is_the_scale_of_a_wider_row() {
        // the row with the given amax appended as one more element has the same scale, and
        // its other elements the same bytes: what the whole row (every rank's slice) gives
        let mut rng = Rng(0x0F0F_1234_5555_AAAA);
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let eb = (dtype.bits() / 8) as usize;
            for cols in [1usize, 7, 32, 65, 130] {
                let rows = 9;
                let src = random_rows(&mut rng, dtype, rows, cols);
                let spec0 = QuantSpec::new(dtype, cols as u64, Rounding::Fp32).unwrap();
                let mut own = vec![0f32; rows];
                rows_amax(&spec0, &src, &mut own);
                // bigger amaxes, each a value of the dtype (a whole row's amax is one)
                let other = random_rows(&mut rng, dtype, rows, 1);
                let mut given = vec![0f32; rows];
                rows_amax(
                    &QuantSpec::new(dtype, 1, Rounding::Fp32).unwrap(),
                    &other,
                    &mut given,
                );
                let given: Vec<f32> = given
                    .iter()
                    .zip(&own)
                    .map(|(g, o)| (g * 8.0).max(*o))
                    .collect();
                let wide: Vec<u8> = src
                    .chunks_exact(cols * eb)
                    .zip(&given)
                    .flat_map(|(row, &g)| {
                        let mut row = row.to_vec();
                        row.extend(match dtype {
                            Dtype::BF16 => round_bf16(g).to_le_bytes().to_vec(),
                            Dtype::F16 => f16::from_f32(g).to_bits().to_le_bytes().to_vec(),
                            _ => g.to_le_bytes().to_vec(),
                        });
                        row
                    })
                    .collect();
                for rounding in [Rounding::Fp32, Rounding::Eager] {
                    let spec = QuantSpec::new(dtype, cols as u64, rounding).unwrap();
                    let wspec = QuantSpec::new(dtype, cols as u64 + 1, rounding).unwrap();
                    let (wq, ws) = quantize_on(Isa::Generic, &wspec, &wide);
                    let mut isas = simd_isas();
                    isas.push(Isa::Generic);
                    for isa in isas {
                        let (q, s) = quantize_with_on(isa, &spec, &src, &given);
                        assert_eq!(s, ws, "{isa:?} {spec:?}");
                        for r in 0..rows {
                            assert_eq!(
                                q[r * cols..][..cols],
                                wq[r * (cols + 1)..][..cols],
                                "{isa:?} {spec:?} row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn given_amax_edge_cases() {
        let spec = QuantSpec::new(Dtype::BF16, 3, Rounding::Fp32).unwrap();
        let src: Vec<u8> = [0u16, 0, 0, 0x3F80, 0, 0xBF80, 0x3F80, 0x7FC0, 0]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let mut amax = [0f32; 3];
        rows_amax(&spec, &src, &mut amax);
        assert_eq!(amax, [0.0, 1.0, f32::INFINITY]);
        for isa in simd_isas().into_iter().chain([Isa::Generic]) {
            // a zero row with a zero amax: eps, as the device gives an all-zero row
            let (q, s) = quantize_with_on(isa, &spec, &src, &[0.0, 1.0, 0.0]);
            assert_eq!(&s[..2], &[0x00, 0x3C]);
            assert_eq!(&q[..3], &[0, 0, 0]);
            // a non-finite row anywhere (its own NaN, or an Inf or NaN given) is NaN
            assert_eq!(u16::from_le_bytes([s[4], s[5]]), 0x7FC0);
            assert_eq!(&q[6..], &[FP8_NAN; 3]);
            for bad in [f32::INFINITY, f32::NAN] {
                let (q, s) = quantize_with_on(isa, &spec, &src, &[bad, 1.0, 1.0]);
                assert_eq!(u16::from_le_bytes([s[0], s[1]]), 0x7FC0);
                assert_eq!(&q[..3], &[FP8_NAN; 3]);
            }
            // a zero row with a given amax: the scale of that amax, zero bytes
            let (q, s) = quantize_with_on(isa, &spec, &src, &[448.0, 1.0, 0.0]);
            assert_eq!(u16::from_le_bytes([s[0], s[1]]), 0x3F80);
            assert_eq!(&q[..3], &[0, 0, 0]);
        }
        // a given amax between two bf16 values rounds up
        assert_eq!(floor_bits(Dtype::BF16, &[1.0001], 0), 0x3F81);
        assert_eq!(floor_bits(Dtype::F16, &[1.0001], 0), 0x3C01);
        assert_eq!(floor_bits(Dtype::F16, &[-2.0], 0), 0x4000);
        assert_eq!(floor_bits(Dtype::F32, &[], 0), 0);
    }

    /// Single-core throughput of every path, in GB/s of bf16 input:
    /// `cargo test -p fastfp8-core --release quant_throughput -- --ignored --nocapture`.
    /// Two kinds of rows of 4096: bf16 with random exponents over 2^-7..2^3 (no quotient
    /// in e4m3's subnormal range), and weight-like ones (a sum of four uniforms: some
    /// quotients are tiny); each from memory (128 MiB, at an even address and at an odd
    /// one) and from L2 (the first 256 KiB again and again).
    #[test]
    #[ignore]
    fn quant_throughput() {
        const COLS: usize = 4096;
        const BYTES: usize = 128 << 20;
        let rows = BYTES / (2 * COLS);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let exps: Vec<u8> = (0..rows * COLS)
            .flat_map(|_| {
                let b = (rng.next() >> 32) as u32;
                let exp = 120 + (b >> 8) % 11;
                (((b & 0x8000) | (exp << 7) | (b & 0x7F)) as u16).to_le_bytes()
            })
            .collect();
        let weights: Vec<u8> = (0..rows * COLS)
            .flat_map(|_| {
                let u: f32 = (0..4)
                    .map(|_| (rng.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                    .sum();
                round_bf16(u * 0.02).to_le_bytes()
            })
            .collect();
        let mut q = vec![0u8; rows * COLS];
        let mut s = vec![0u8; rows * 2];
        #[allow(unused_mut)] // on x86-64 only it grows
        let mut isas = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        isas.extend([Isa::Avx2, Isa::Avx512, Isa::Avx512Vbmi]);
        for (data, src) in [("exponents", &exps), ("weights", &weights)] {
            // the same rows one byte further on: u16 loads off their alignment
            let mut shifted = vec![0u8; src.len() + 1];
            shifted[1..].copy_from_slice(src);
            for rounding in [Rounding::Fp32, Rounding::Eager] {
                let spec = QuantSpec::new(Dtype::BF16, COLS as u64, rounding).unwrap();
                for &isa in isas.iter().filter(|i| i.available()) {
                    let mut line = format!("bf16 {data:9} {rounding:?} {isa:?}:");
                    let shapes = [
                        ("memory", &src[..], 1),
                        ("memory, odd address", &shifted[1..], 1),
                        ("L2", &src[..256 << 10], BYTES >> 18),
                    ];
                    for (shape, src, reps) in shapes {
                        let rows = src.len() / (2 * COLS);
                        let (q, s) = (&mut q[..rows * COLS], &mut s[..rows * 2]);
                        let mut best = f64::INFINITY;
                        for _ in 0..5 {
                            let t = std::time::Instant::now();
                            for _ in 0..reps {
                                quantize_rows_on(isa, &spec, src, &[], q, s);
                            }
                            best = best.min(t.elapsed().as_secs_f64());
                        }
                        let gbs = (src.len() * reps) as f64 / best / 1e9;
                        line += &format!(" {gbs:.2} GB/s ({shape})");
                    }
                    println!("{line}");
                }
            }
        }
    }
}
