//! The bf16 rows with explicit x86-64 intrinsics: AVX-512 (F, BW, VL) and AVX2 (+ FMA).
//!
//! Each lane does what the scalar code ([`super::bf16_row`]) does to one element: the same
//! IEEE operations on the same values (`x r`, `fma(-q, s, x)`, `fma(rem, r, q)`), the same
//! integer rounding to bf16 (Eager) and to e4m3; three steps of [`e4m3`] take forms that
//! give the same bits for every finite value (see [`magnitude_x16`] and
//! [`e4m3_small_x16`]): the zero point, the clamp and `|v| 512 + 2^23`. So every byte is
//! the scalar one; the tests compare the two byte for byte, over every bf16 value. A row
//! whose scale is subnormal (rare: its largest magnitude is below about 2^-117) is left to
//! the scalar code.
//!
//! Rows are read with unaligned loads, so a row at an odd address costs nothing extra.
//!
//! The bulk of a row takes a table instead of the arithmetic: the e4m3 byte of `x / s` for
//! a normal quotient of at least 2^-6 is `T[m_s][m_x] + 8 (e_x - e_s)` (before the clamp),
//! where `m_x`, `m_s` are the 7 stored significand bits and `e_x`, `e_s` the biased
//! exponents, and `T[m_s][m_x]` is the scalar code's byte for `1.m_x / 1.m_s` (see
//! [`lut_blocks_vbmi`]). With AVX-512 VBMI 64 lanes look their bytes up in one byte permute
//! ([`lut_blocks_vbmi`]); on AVX2, 32 lanes in eight 16-byte shuffles and seven blends
//! ([`lut_blocks_avx2`]); plain AVX-512 (no VBMI) keeps the arithmetic. A block with a lane
//! outside that range (a zero, a quotient in e4m3's subnormals) takes the arithmetic.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{
    bf16_f32, bf16_quotient, bf16_row, e4m3, floor_bits, round_bf16, Dtype, FP8_MAX, FP8_NAN,
};

/// What a row's largest magnitude `m` (bf16 bits without the sign) makes of it.
enum Scale {
    /// NaN or Inf in the row: its bytes are [`FP8_NAN`] and its scale this NaN.
    NonFinite(u16),
    /// A subnormal scale: the scalar code divides.
    Subnormal,
    /// The bf16 scale, its value and the fp32 reciprocal of that.
    Normal(u16, f32, f32),
}

#[inline(always)]
fn bf16_scale(m: u16) -> Scale {
    if m >= 0x7F80 {
        return Scale::NonFinite(0x7FC0);
    }
    let mut s = round_bf16(bf16_f32(m) / FP8_MAX);
    if s == 0 {
        s = 0x3C00; // 2^-7, bf16's eps
    }
    let sf = bf16_f32(s);
    if sf < f32::MIN_POSITIVE {
        return Scale::Subnormal;
    }
    Scale::Normal(s, sf, 1.0 / sf)
}

/// Quantizes the bf16 rows of `cols` elements in `src` into `q` and `scales` (two bytes a
/// row) on AVX-512; the buffers are whole rows ([`super::quantize_rows`] checks).
///
/// # Safety
/// `vbmi`: the CPU has AVX-512 VBMI (the rows then take [`lut_blocks_vbmi`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn bf16_rows_avx512(
    cols: usize,
    eager: bool,
    vbmi: bool,
    src: &[u8],
    floor: &[f32],
    q: &mut [u8],
    scales: &mut [u8],
) {
    let lut = vbmi.then(|| quotient_bytes(eager));
    let rows = src
        .chunks_exact(2 * cols)
        .zip(q.chunks_exact_mut(cols))
        .zip(scales.chunks_exact_mut(2));
    for (r, ((row, qrow), scale)) in rows.enumerate() {
        let fl = floor_bits(Dtype::BF16, floor, r) as u16;
        // SAFETY: `lut` is Some only where the caller vouched for VBMI.
        let s = unsafe {
            if eager {
                bf16_row_avx512::<true>(row, qrow, fl, lut)
            } else {
                bf16_row_avx512::<false>(row, qrow, fl, lut)
            }
        };
        scale.copy_from_slice(&s.to_le_bytes());
    }
}

/// As [`bf16_rows_avx512`], on AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) fn bf16_rows_avx2(
    cols: usize,
    eager: bool,
    src: &[u8],
    floor: &[f32],
    q: &mut [u8],
    scales: &mut [u8],
) {
    let rows = src
        .chunks_exact(2 * cols)
        .zip(q.chunks_exact_mut(cols))
        .zip(scales.chunks_exact_mut(2));
    for (r, ((row, qrow), scale)) in rows.enumerate() {
        let fl = floor_bits(Dtype::BF16, floor, r) as u16;
        let s = if eager {
            bf16_row_avx2::<true>(row, qrow, fl)
        } else {
            bf16_row_avx2::<false>(row, qrow, fl)
        };
        scale.copy_from_slice(&s.to_le_bytes());
    }
}

/// The largest `bits & 0x7FFF` of the bf16 values in `row`, on AVX-512.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) fn bf16_amax_avx512(row: &[u8]) -> u16 {
    amax_avx512(row)
}

/// As [`bf16_amax_avx512`], on AVX2.
#[target_feature(enable = "avx2,fma")]
pub(super) fn bf16_amax_avx2(row: &[u8]) -> u16 {
    amax_avx2(row)
}

/// One row (`row` holds `q.len()` bf16 values) whose amax is at least `floor` (magnitude
/// bits); returns its scale.
///
/// # Safety
/// `lut` ([`quotient_bytes`]) is Some only if the CPU has AVX-512 VBMI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn bf16_row_avx512<const EAGER: bool>(
    row: &[u8],
    q: &mut [u8],
    floor: u16,
    lut: Option<&QuotientBytes>,
) -> u16 {
    let n = q.len();
    assert_eq!(row.len(), 2 * n);
    let (s, sf, r) = match bf16_scale(amax_avx512(row).max(floor)) {
        Scale::Normal(s, sf, r) => (s, sf, r),
        Scale::NonFinite(s) => {
            q.fill(FP8_NAN);
            return s;
        }
        Scale::Subnormal => return bf16_row(row, q, EAGER, floor),
    };
    let (vs, vr) = (_mm512_set1_ps(sf), _mm512_set1_ps(r));
    let (src, dst) = (row.as_ptr(), q.as_mut_ptr());
    let mut i = 0;
    let e_s = s >> 7;
    if let Some(lut) = lut.filter(|_| e_s >= LUT_MIN_SCALE_EXP) {
        // SAFETY: `lut` is Some only on a CPU with VBMI (this function's contract).
        i = unsafe { lut_blocks_vbmi::<EAGER>(row, q, &lut[usize::from(s & 0x7F)], e_s, vs, vr) };
    }
    while i + 64 <= n {
        // SAFETY: i + 64 <= n: the 128 bytes at 2i lie inside `row` (2n bytes) and the 64
        // bytes at i inside `q` (n bytes), which nothing else borrows.
        unsafe { block_x64::<EAGER>(src.add(2 * i), dst.add(i), vs, vr) };
        i += 64;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, so the 32 bytes at 2i lie inside `row`.
        let x = unsafe { _mm256_loadu_si256(src.add(2 * i).cast()) };
        let b = _mm512_cvtepi32_epi8(e4m3_x16::<EAGER>(bf16_x16(x), vs, vr));
        // SAFETY: the 16 bytes at i lie inside `q`; the store takes any alignment.
        unsafe { _mm_storeu_si128(dst.add(i).cast(), b) };
        i += 16;
    }
    if i < n {
        // n - i < 16 lanes
        let k: __mmask16 = (1 << (n - i)) - 1;
        // SAFETY: the masked load reads only the n - i lanes of k, which lie inside `row`;
        // the lanes masked off are not read (they cannot fault) and come back as zero.
        let x = unsafe { _mm256_maskz_loadu_epi16(k, src.add(2 * i).cast()) };
        let v = e4m3_x16::<EAGER>(bf16_x16(x), vs, vr);
        // SAFETY: the masked store writes only the n - i bytes of k, which lie inside `q`.
        unsafe { _mm512_mask_cvtepi32_storeu_epi8(dst.add(i).cast(), k, v) };
    }
    s
}

/// The e4m3 bytes of 64 bf16 values at `src` (128 bytes) divided by `s` (`r` = 1/s), written
/// to the 64 bytes at `dst`.
///
/// # Safety
/// Both ranges are valid for their reads and writes (any alignment).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn block_x64<const EAGER: bool>(src: *const u8, dst: *mut u8, vs: __m512, vr: __m512) {
    // SAFETY: the caller's contract; the loads take any alignment.
    let (x0, x1) = unsafe {
        (
            _mm512_loadu_si512(src.cast()),
            _mm512_loadu_si512(src.add(64).cast()),
        )
    };
    // bf16 to f32 is a shift by 16: interleaving zero words below the values does it for
    // elements 0-3 (lo) and 4-7 (hi) of each 128-bit lane; the packs below work lane by
    // lane too and undo the interleaving
    let zero = _mm512_setzero_si512();
    let x = [
        _mm512_unpacklo_epi16(zero, x0),
        _mm512_unpackhi_epi16(zero, x0),
        _mm512_unpacklo_epi16(zero, x1),
        _mm512_unpackhi_epi16(zero, x1),
    ];
    let [lo0, hi0, lo1, hi1] = e4m3_x64::<EAGER>(x.map(|x| _mm512_castsi512_ps(x)), vs, vr);
    // lanes of at most 0xFF, which the saturating packs keep: 128-bit lane l of w holds the
    // bytes of x0[8l..8l + 8], then of x1[8l..8l + 8]; the qword permute puts x0's before
    // x1's
    let w = _mm512_packus_epi16(_mm512_packus_epi32(lo0, hi0), _mm512_packus_epi32(lo1, hi1));
    let w = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), w);
    // SAFETY: the caller's contract; the store takes any alignment.
    unsafe { _mm512_storeu_si512(dst.cast(), w) };
}

/// `T[m_s][m_x]`: the e4m3 byte the scalar code gives `1.m_x / 1.m_s` (both bf16 values in
/// [1, 2), so the quotient lies in (0.5, 2) and its byte in 0x30 ..= 0x40).
pub(super) type QuotientBytes = [[u8; 128]; 128];

/// The smallest biased exponent of a scale whose rows take the table: below it, a zero or
/// subnormal `x` (exponent field 0) could come out of `T + 8 (0 - e_s)` above 8.
const LUT_MIN_SCALE_EXP: u16 = 8;

/// The table of `eager`'s rounding, built once from the scalar steps.
fn quotient_bytes(eager: bool) -> &'static QuotientBytes {
    static TABLES: [OnceLock<Box<QuotientBytes>>; 2] = [OnceLock::new(), OnceLock::new()];
    TABLES[usize::from(eager)].get_or_init(|| {
        let mut t = Box::new([[0u8; 128]; 128]);
        for (ms, row) in t.iter_mut().enumerate() {
            let sf = bf16_f32(0x3F80 | ms as u16);
            let r = 1.0 / sf;
            for (mx, b) in row.iter_mut().enumerate() {
                let v = bf16_quotient(bf16_f32(0x3F80 | mx as u16), sf, r);
                *b = e4m3(if eager { bf16_f32(round_bf16(v)) } else { v });
            }
        }
        t
    })
}

/// The whole blocks of 64 of a row (`row` holds `q.len()` bf16 values) by table, whose
/// scale has exponent `e_s` (at least [`LUT_MIN_SCALE_EXP`]) and significand row `t` of
/// [`QuotientBytes`]; `vs`, `vr` (the scale and its reciprocal) for the blocks that take
/// the arithmetic ([`block_x64`]). Returns how many elements it wrote (a multiple of 64).
///
/// Why the table gives the scalar bytes: the quotient `v` of [`bf16_quotient`] (and its
/// bf16 rounding, for EAGER) is `q(1.m_x, 1.m_s) 2^d`, `d = e_x - e_s`, exactly while it is
/// a normal fp32; [`e4m3`]'s byte of a `v` from 2^-6 up, before the clamp, is
/// `((a + 0x7FFFF + lsb) >> 20) - 960` of its bits `a`, and adding `d << 23` to `a` adds
/// `8 d` to that (the lsb is bit 20, untouched): the byte is `t[m_x] + 8 d`. The formula
/// grows with `a`, so a `v` below 2^-6 gives at most 8, and a `v` from 2^-6 up at least 8:
/// a lane whose sum is above 8 is exact, clamped as [`e4m3`] clamps (448 is 0x7E, and any
/// `v` above 448 gives 0x7E or more); a block with a lane at 8 or below (zeros, subnormal
/// `x`: the exponent field 0 with `e_s >= 8` gives at most 0; quotients in or near e4m3's
/// subnormals) takes the arithmetic. The sign is `x`'s (`s` is positive, `x` is not zero).
///
/// # Safety
/// The CPU has AVX-512 VBMI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma")]
unsafe fn lut_blocks_vbmi<const EAGER: bool>(
    row: &[u8],
    q: &mut [u8],
    t: &[u8; 128],
    e_s: u16,
    vs: __m512,
    vr: __m512,
) -> usize {
    let n = q.len();
    assert_eq!(row.len(), 2 * n);
    // byte j of the 128 bytes of two vectors of 32 words: the low byte of word j
    static EVEN: [u8; 64] = {
        let mut e = [0u8; 64];
        let mut j = 0;
        while j < 64 {
            e[j] = 2 * j as u8;
            j += 1;
        }
        e
    };
    // SAFETY: `EVEN` and `t` are 64 and 128 bytes.
    let (even, t0, t1) = unsafe {
        (
            _mm512_loadu_si512(EVEN.as_ptr().cast()),
            _mm512_loadu_si512(t.as_ptr().cast()),
            _mm512_loadu_si512(t.as_ptr().add(64).cast()),
        )
    };
    let c = _mm512_set1_epi16((8 * e_s) as i16);
    let exp_bits = _mm512_set1_epi16(0x7F8);
    let top = _mm512_set1_epi16(0x7E);
    let eight = _mm512_set1_epi16(8);
    let sign = _mm512_set1_epi16(0x80);
    let (src, dst) = (row.as_ptr(), q.as_mut_ptr());
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: i + 64 <= n, so the 128 bytes at 2i lie inside `row` (2n bytes); the
        // loads take any alignment.
        let (x0, x1) = unsafe {
            (
                _mm512_loadu_si512(src.add(2 * i).cast()),
                _mm512_loadu_si512(src.add(2 * i + 64).cast()),
            )
        };
        // the low bytes hold m_x in bits 0-6; the permute reads bits 0-6 of each index
        let m = _mm512_permutex2var_epi8(x0, even, x1);
        let tb = _mm512_permutex2var_epi8(t0, m, t1);
        let tw = [
            _mm512_cvtepu8_epi16(_mm512_castsi512_si256(tb)),
            _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(tb)),
        ];
        // t[m_x] + 8 e_x - 8 e_s: (w >> 4) & 0x7F8 is 8 e_x
        let b = [x0, x1].map(|x| _mm512_and_si512(_mm512_srli_epi16::<4>(x), exp_bits));
        let v = [
            _mm512_add_epi16(tw[0], _mm512_sub_epi16(b[0], c)),
            _mm512_add_epi16(tw[1], _mm512_sub_epi16(b[1], c)),
        ];
        let low = _mm512_cmple_epi16_mask(v[0], eight) | _mm512_cmple_epi16_mask(v[1], eight);
        if low != 0 {
            // SAFETY: as for the loads above, and the 64 bytes at i lie inside `q`.
            unsafe { block_x64::<EAGER>(src.add(2 * i), dst.add(i), vs, vr) };
            i += 64;
            continue;
        }
        // the clamp, then x's sign (bit 15, shifted to bit 7) or'ed in: a | (b & c)
        let w = [(v[0], x0), (v[1], x1)].map(|(v, x)| {
            _mm512_ternarylogic_epi32::<0xF8>(
                _mm512_min_epi16(v, top),
                _mm512_srli_epi16::<8>(x),
                sign,
            )
        });
        let out = _mm512_permutex2var_epi8(w[0], even, w[1]);
        // SAFETY: the 64 bytes at i lie inside `q` (n bytes), which nothing else borrows;
        // the store takes any alignment.
        unsafe { _mm512_storeu_si512(dst.add(i).cast(), out) };
        i += 64;
    }
    i
}

/// The largest `bits & 0x7FFF` of the bf16 values in `row`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn amax_avx512(row: &[u8]) -> u16 {
    let n = row.len() / 2;
    let src = row.as_ptr();
    let mask = _mm512_set1_epi16(0x7FFF);
    let (mut m0, mut m1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: i + 64 <= n: both 64-byte loads lie inside `row` (2n bytes); they take
        // any alignment.
        let (a, b) = unsafe {
            (
                _mm512_loadu_si512(src.add(2 * i).cast()),
                _mm512_loadu_si512(src.add(2 * i + 64).cast()),
            )
        };
        m0 = _mm512_max_epu16(m0, _mm512_and_si512(a, mask));
        m1 = _mm512_max_epu16(m1, _mm512_and_si512(b, mask));
        i += 64;
    }
    if i + 32 <= n {
        // SAFETY: i + 32 <= n: the 64 bytes at 2i lie inside `row`.
        let a = unsafe { _mm512_loadu_si512(src.add(2 * i).cast()) };
        m0 = _mm512_max_epu16(m0, _mm512_and_si512(a, mask));
        i += 32;
    }
    if i < n {
        // n - i < 32 lanes
        let k: __mmask32 = (1 << (n - i)) - 1;
        // SAFETY: the masked load reads only the n - i lanes of k, which lie inside `row`;
        // the lanes masked off are not read and come back as zero (which leaves the max).
        let a = unsafe { _mm512_maskz_loadu_epi16(k, src.add(2 * i).cast()) };
        m1 = _mm512_max_epu16(m1, _mm512_and_si512(a, mask));
    }
    let m = _mm512_max_epu16(m0, m1);
    let m = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64::<1>(m));
    hmax_epu15(_mm_max_epu16(
        _mm256_castsi256_si128(m),
        _mm256_extracti128_si256::<1>(m),
    ))
}

/// The largest of 8 u16 lanes, each at most 0x7FFF.
#[inline]
#[target_feature(enable = "avx2")]
fn hmax_epu15(m: __m128i) -> u16 {
    // 0x7FFF - v (an xor, v <= 0x7FFF) turns the max into a min, which one instruction finds
    let flip = _mm_set1_epi16(0x7FFF);
    let min = _mm_minpos_epu16(_mm_xor_si128(m, flip));
    (_mm_cvtsi128_si32(min) as u16 & 0x7FFF) ^ 0x7FFF
}

/// 16 bf16 values as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn bf16_x16(x: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
}

/// The e4m3 bytes (in the low byte of each 32-bit lane; the rest zero) of 16 values
/// `x` (bf16 values as f32) divided by `s` (`r` = 1/s): [`bf16_quotient`], for EAGER
/// rounded to bf16, and [`e4m3`], lane by lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn e4m3_x16<const EAGER: bool>(x: __m512, s: __m512, r: __m512) -> __m512i {
    let (a, negative) = magnitude_x16::<EAGER>(x, s, r);
    let mag = e4m3_small_x16(a, e4m3_normal_x16(a));
    _mm512_mask_or_epi32(mag, negative, mag, _mm512_set1_epi32(0x80))
}

/// As [`e4m3_x16`] for 4 x 16 values; the step for e4m3's subnormals (which weights seldom
/// need: quotients below 2^-6, i.e. below 2^-15 of the row's largest) runs only where one
/// of the 64 needs it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn e4m3_x64<const EAGER: bool>(x: [__m512; 4], s: __m512, r: __m512) -> [__m512i; 4] {
    let [m0, m1, m2, m3] = x.map(|x| magnitude_x16::<EAGER>(x, s, r));
    let mut mag = [m0.0, m1.0, m2.0, m3.0].map(|a| e4m3_normal_x16(a));
    let small = _mm512_set1_epi32(0x3C80_0000);
    let any_small = _mm512_cmplt_epu32_mask(_mm512_min_epu32(m0.0, m1.0), small)
        | _mm512_cmplt_epu32_mask(_mm512_min_epu32(m2.0, m3.0), small);
    if any_small != 0 {
        mag = [
            e4m3_small_x16(m0.0, mag[0]),
            e4m3_small_x16(m1.0, mag[1]),
            e4m3_small_x16(m2.0, mag[2]),
            e4m3_small_x16(m3.0, mag[3]),
        ];
    }
    let sign = _mm512_set1_epi32(0x80);
    [
        _mm512_mask_or_epi32(mag[0], m0.1, mag[0], sign),
        _mm512_mask_or_epi32(mag[1], m1.1, mag[1], sign),
        _mm512_mask_or_epi32(mag[2], m2.1, mag[2], sign),
        _mm512_mask_or_epi32(mag[3], m3.1, mag[3], sign),
    ]
}

/// The bits of the clamped `|v|` of [`e4m3`] and where `v + 0` is negative, for `v` the
/// quotients of `x` (bf16 values as f32) by `s` (`r` = 1/s), for EAGER rounded to bf16.
///
/// Two of [`e4m3`]'s steps take an equivalent form here (for finite `v`, and only finite
/// values get here): the clamp to +-448 is an integer min of the magnitude bits (the order
/// of non-negative floats is that of their bits, and the clamp keeps the sign), and the
/// sign of `v + 0` (which only turns -0 into +0) is that of `v` unless `v` is -0: the
/// bits of `v` are above 0x8000_0000.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn magnitude_x16<const EAGER: bool>(x: __m512, s: __m512, r: __m512) -> (__m512i, __mmask16) {
    // Markstein: q = x r, rem = fma(-q, s, x) (exactly -(q s) + x, rounded once), fma(rem, r, q)
    let q = _mm512_mul_ps(x, r);
    let rem = _mm512_fnmadd_ps(q, s, x);
    let v = _mm512_castps_si512(_mm512_fmadd_ps(rem, r, q));
    let (negative, a) = if EAGER {
        // round_bf16: b = v + 0x7FFF + ((v >> 16) & 1), whose low 16 bits are then cleared:
        // of the rounded value, bits above 0x8000_0000 are b above 0x8000_FFFF, and the
        // magnitude is b & 0x7FFF_0000
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
        let b = _mm512_add_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(0x7FFF)), lsb);
        (
            _mm512_cmpgt_epu32_mask(b, _mm512_set1_epi32(0x8000_FFFFu32 as i32)),
            _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_0000)),
        )
    } else {
        (
            _mm512_cmpgt_epu32_mask(v, _mm512_set1_epi32(i32::MIN)),
            _mm512_and_si512(v, _mm512_set1_epi32(0x7FFF_FFFF)),
        )
    };
    // the clamp: 448 is 0x43E0_0000
    (
        _mm512_min_epu32(a, _mm512_set1_epi32(0x43E0_0000)),
        negative,
    )
}

/// [`e4m3`]'s byte for a magnitude `a` (bits) from 2^-6 (0x3C80_0000) up:
/// `((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)`; other lanes are garbage.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn e4m3_normal_x16(a: __m512i) -> __m512i {
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<20>(a), _mm512_set1_epi32(1));
    // the - (120 << 3) after the shift is a - (120 << 23) before it: no borrow for a
    // from 2^-6 up
    let a = _mm512_add_epi32(a, _mm512_set1_epi32(0x7FFFF - (120 << 23)));
    _mm512_srli_epi32::<20>(_mm512_add_epi32(a, lsb))
}

/// `normal`, with the lanes of `a` below 2^-6 replaced by [`e4m3`]'s subnormal bytes:
/// `(|v| 512 + 2^23).to_bits() & 0x7FFFFF` (|v| 512 is exact, so one fma rounds as the
/// multiply and the add do).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn e4m3_small_x16(a: __m512i, normal: __m512i) -> __m512i {
    let sub = _mm512_fmadd_ps(
        _mm512_castsi512_ps(a),
        _mm512_set1_ps(512.0),
        _mm512_set1_ps(8_388_608.0),
    );
    let sub = _mm512_and_si512(_mm512_castps_si512(sub), _mm512_set1_epi32(0x7F_FFFF));
    let small = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x3C80_0000));
    _mm512_mask_blend_epi32(small, normal, sub)
}

/// One row on AVX2 (`row` holds `q.len()` bf16 values) whose amax is at least `floor`;
/// returns its scale. The bulk by table where the scale allows ([`lut_blocks_avx2`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn bf16_row_avx2<const EAGER: bool>(row: &[u8], q: &mut [u8], floor: u16) -> u16 {
    let n = q.len();
    assert_eq!(row.len(), 2 * n);
    let (s, sf, r) = match bf16_scale(amax_avx2(row).max(floor)) {
        Scale::Normal(s, sf, r) => (s, sf, r),
        Scale::NonFinite(s) => {
            q.fill(FP8_NAN);
            return s;
        }
        Scale::Subnormal => return bf16_row(row, q, EAGER, floor),
    };
    let (vs, vr) = (_mm256_set1_ps(sf), _mm256_set1_ps(r));
    let (src, dst) = (row.as_ptr(), q.as_mut_ptr());
    let mut i = 0;
    let e_s = s >> 7;
    if e_s >= LUT_MIN_SCALE_EXP {
        let t = &quotient_bytes(EAGER)[usize::from(s & 0x7F)];
        i = lut_blocks_avx2::<EAGER>(row, q, t, e_s, vs, vr);
    }
    while i + 32 <= n {
        // SAFETY: i + 32 <= n: the 64 bytes at 2i lie inside `row` (2n bytes) and the 32
        // bytes at i inside `q` (n bytes), which nothing else borrows.
        unsafe { block_x32::<EAGER>(src.add(2 * i), dst.add(i), vs, vr) };
        i += 32;
    }
    // the last n % 32 elements: the scalar steps
    for (o, b) in q[i..].iter_mut().zip(row[2 * i..].chunks_exact(2)) {
        let v = bf16_quotient(bf16_f32(u16::from_le_bytes([b[0], b[1]])), sf, r);
        *o = e4m3(if EAGER { bf16_f32(round_bf16(v)) } else { v });
    }
    s
}

/// As [`block_x64`], for 32 values on AVX2.
///
/// # Safety
/// The 64 bytes at `src` and the 32 at `dst` are valid for their reads and writes (any
/// alignment).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_x32<const EAGER: bool>(src: *const u8, dst: *mut u8, vs: __m256, vr: __m256) {
    // SAFETY: the caller's contract; the loads take any alignment.
    let (x0, x1) = unsafe {
        (
            _mm256_loadu_si256(src.cast()),
            _mm256_loadu_si256(src.add(32).cast()),
        )
    };
    // as in block_x64: zero words interleaved below the values make them f32 (elements 0-3
    // and 4-7 of each 128-bit lane), and the packs undo the interleaving
    let zero = _mm256_setzero_si256();
    let x = [
        _mm256_unpacklo_epi16(zero, x0),
        _mm256_unpackhi_epi16(zero, x0),
        _mm256_unpacklo_epi16(zero, x1),
        _mm256_unpackhi_epi16(zero, x1),
    ];
    let [lo0, hi0, lo1, hi1] = e4m3_x32::<EAGER>(x.map(|x| _mm256_castsi256_ps(x)), vs, vr);
    // lanes of at most 0xFF, which the saturating packs keep: 128-bit lane l of w holds the
    // bytes of x0[8l..8l + 8], then of x1[8l..8l + 8]; the qword permute puts x0's before
    // x1's
    let w = _mm256_packus_epi16(_mm256_packus_epi32(lo0, hi0), _mm256_packus_epi32(lo1, hi1));
    let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(w);
    // SAFETY: the caller's contract; the store takes any alignment.
    unsafe { _mm256_storeu_si256(dst.cast(), w) };
}

/// As [`lut_blocks_vbmi`], 32 values at a time on AVX2: the 128-byte row `t` of the table
/// is eight 16-byte shuffles (`pshufb` on the low 4 bits of `m_x`), of which three rounds
/// of byte blends keep the one bits 4 - 6 name. Returns how many elements it wrote (a
/// multiple of 32).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lut_blocks_avx2<const EAGER: bool>(
    row: &[u8],
    q: &mut [u8],
    t: &[u8; 128],
    e_s: u16,
    vs: __m256,
    vr: __m256,
) -> usize {
    let n = q.len();
    assert_eq!(row.len(), 2 * n);
    // SAFETY: each 16-byte load lies inside `t` (128 bytes); they take any alignment.
    let tabs: [__m256i; 8] = std::array::from_fn(|j| unsafe {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr().add(16 * j).cast()))
    });
    let c = _mm256_set1_epi16((8 * e_s) as i16);
    let (low_byte, m_bits) = (_mm256_set1_epi16(0xFF), _mm256_set1_epi8(0x7F));
    let (exp_bits, top, nine) = (
        _mm256_set1_epi16(0x7F8),
        _mm256_set1_epi16(0x7E),
        _mm256_set1_epi16(9),
    );
    let sign = _mm256_set1_epi16(0x80);
    let (src, dst) = (row.as_ptr(), q.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n, so the 64 bytes at 2i lie inside `row` (2n bytes); the
        // loads take any alignment.
        let (x0, x1) = unsafe {
            (
                _mm256_loadu_si256(src.add(2 * i).cast()),
                _mm256_loadu_si256(src.add(2 * i + 32).cast()),
            )
        };
        // m_x of the 32 values, lane l holding x0's 8 of lane l, then x1's (the unpacks
        // below undo it); bit 7 (e_x's lowest) cleared: pshufb reads it as "zero"
        let m = _mm256_and_si256(
            _mm256_packus_epi16(
                _mm256_and_si256(x0, low_byte),
                _mm256_and_si256(x1, low_byte),
            ),
            m_bits,
        );
        let p: [__m256i; 8] = tabs.map(|tab| _mm256_shuffle_epi8(tab, m));
        // blendv keys on each byte's top bit: bit b of m shifted up to bit 7 (a 16-bit
        // shift, so each byte's bit 7 is its own bit b)
        let b4 = _mm256_slli_epi16::<3>(m);
        let b5 = _mm256_slli_epi16::<2>(m);
        let b6 = _mm256_slli_epi16::<1>(m);
        let q01 = _mm256_blendv_epi8(p[0], p[1], b4);
        let q23 = _mm256_blendv_epi8(p[2], p[3], b4);
        let q45 = _mm256_blendv_epi8(p[4], p[5], b4);
        let q67 = _mm256_blendv_epi8(p[6], p[7], b4);
        let q03 = _mm256_blendv_epi8(q01, q23, b5);
        let q47 = _mm256_blendv_epi8(q45, q67, b5);
        let tb = _mm256_blendv_epi8(q03, q47, b6);
        let zero = _mm256_setzero_si256();
        let tw = [
            _mm256_unpacklo_epi8(tb, zero),
            _mm256_unpackhi_epi8(tb, zero),
        ];
        // t[m_x] + 8 e_x - 8 e_s: (w >> 4) & 0x7F8 is 8 e_x
        let b = [x0, x1].map(|x| _mm256_and_si256(_mm256_srli_epi16::<4>(x), exp_bits));
        let v = [
            _mm256_add_epi16(tw[0], _mm256_sub_epi16(b[0], c)),
            _mm256_add_epi16(tw[1], _mm256_sub_epi16(b[1], c)),
        ];
        let low = _mm256_or_si256(
            _mm256_cmpgt_epi16(nine, v[0]),
            _mm256_cmpgt_epi16(nine, v[1]),
        );
        if _mm256_testz_si256(low, low) == 0 {
            // SAFETY: as for the loads above, and the 32 bytes at i lie inside `q`.
            unsafe { block_x32::<EAGER>(src.add(2 * i), dst.add(i), vs, vr) };
            i += 32;
            continue;
        }
        // the clamp, then x's sign (bit 15, shifted to bit 7) or'ed in
        let w = [(v[0], x0), (v[1], x1)].map(|(v, x)| {
            _mm256_or_si256(
                _mm256_min_epi16(v, top),
                _mm256_and_si256(_mm256_srli_epi16::<8>(x), sign),
            )
        });
        // as in block_x32: the pack interleaves the lanes, the qword permute puts them back
        let out = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(w[0], w[1]));
        // SAFETY: the 32 bytes at i lie inside `q` (n bytes), which nothing else borrows;
        // the store takes any alignment.
        unsafe { _mm256_storeu_si256(dst.add(i).cast(), out) };
        i += 32;
    }
    i
}

/// The largest `bits & 0x7FFF` of the bf16 values in `row`, on AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn amax_avx2(row: &[u8]) -> u16 {
    let n = row.len() / 2;
    let src = row.as_ptr();
    let mask = _mm256_set1_epi16(0x7FFF);
    let (mut m0, mut m1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n: both 32-byte loads lie inside `row` (2n bytes); they take
        // any alignment.
        let (a, b) = unsafe {
            (
                _mm256_loadu_si256(src.add(2 * i).cast()),
                _mm256_loadu_si256(src.add(2 * i + 32).cast()),
            )
        };
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(a, mask));
        m1 = _mm256_max_epu16(m1, _mm256_and_si256(b, mask));
        i += 32;
    }
    if i + 16 <= n {
        // SAFETY: i + 16 <= n: the 32 bytes at 2i lie inside `row`.
        let a = unsafe { _mm256_loadu_si256(src.add(2 * i).cast()) };
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(a, mask));
        i += 16;
    }
    let m = _mm256_max_epu16(m0, m1);
    let m = hmax_epu15(_mm_max_epu16(
        _mm256_castsi256_si128(m),
        _mm256_extracti128_si256::<1>(m),
    ));
    row[2 * i..]
        .chunks_exact(2)
        .fold(m, |m, b| m.max(u16::from_le_bytes([b[0], b[1]]) & 0x7FFF))
}

/// As [`e4m3_x64`], for 4 x 8 values on AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn e4m3_x32<const EAGER: bool>(x: [__m256; 4], s: __m256, r: __m256) -> [__m256i; 4] {
    let [m0, m1, m2, m3] = x.map(|x| magnitude_x8::<EAGER>(x, s, r));
    let mut mag = [m0.0, m1.0, m2.0, m3.0].map(|a| e4m3_normal_x8(a));
    // a lane below 2^-6 (0x3C80_0000), as a signed compare (a < 2^31)
    let small = _mm256_set1_epi32(0x3C80_0000);
    let min = _mm256_min_epu32(_mm256_min_epu32(m0.0, m1.0), _mm256_min_epu32(m2.0, m3.0));
    if _mm256_movemask_epi8(_mm256_cmpgt_epi32(small, min)) != 0 {
        mag = [
            e4m3_small_x8(m0.0, mag[0]),
            e4m3_small_x8(m1.0, mag[1]),
            e4m3_small_x8(m2.0, mag[2]),
            e4m3_small_x8(m3.0, mag[3]),
        ];
    }
    let sign = _mm256_set1_epi32(0x80);
    [
        _mm256_or_si256(mag[0], _mm256_and_si256(m0.1, sign)),
        _mm256_or_si256(mag[1], _mm256_and_si256(m1.1, sign)),
        _mm256_or_si256(mag[2], _mm256_and_si256(m2.1, sign)),
        _mm256_or_si256(mag[3], _mm256_and_si256(m3.1, sign)),
    ]
}

/// As [`magnitude_x16`], for 8 values on AVX2; the lanes where `v + 0` is negative are
/// all ones.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn magnitude_x8<const EAGER: bool>(x: __m256, s: __m256, r: __m256) -> (__m256i, __m256i) {
    let q = _mm256_mul_ps(x, r);
    let rem = _mm256_fnmadd_ps(q, s, x);
    let v = _mm256_castps_si256(_mm256_fmadd_ps(rem, r, q));
    // (bits, magnitude mask, the largest bits of a -0): as in magnitude_x16
    let (bits, abs, zero) = if EAGER {
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(v), _mm256_set1_epi32(1));
        let b = _mm256_add_epi32(_mm256_add_epi32(v, _mm256_set1_epi32(0x7FFF)), lsb);
        (b, 0x7FFF_0000, 0x8000_FFFFu32 as i32)
    } else {
        (v, 0x7FFF_FFFF, i32::MIN)
    };
    // v < 0 (not -0): bits above `zero` (unsigned), as a signed compare of both with their
    // top bits flipped
    let flip = _mm256_set1_epi32(i32::MIN);
    let negative = _mm256_cmpgt_epi32(
        _mm256_xor_si256(bits, flip),
        _mm256_set1_epi32(zero ^ i32::MIN),
    );
    let a = _mm256_and_si256(bits, _mm256_set1_epi32(abs));
    // the clamp: 448 is 0x43E0_0000
    (
        _mm256_min_epu32(a, _mm256_set1_epi32(0x43E0_0000)),
        negative,
    )
}

/// As [`e4m3_normal_x16`], for 8 values on AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn e4m3_normal_x8(a: __m256i) -> __m256i {
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<20>(a), _mm256_set1_epi32(1));
    let a = _mm256_add_epi32(a, _mm256_set1_epi32(0x7FFFF - (120 << 23)));
    _mm256_srli_epi32::<20>(_mm256_add_epi32(a, lsb))
}

/// As [`e4m3_small_x16`], for 8 values on AVX2.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn e4m3_small_x8(a: __m256i, normal: __m256i) -> __m256i {
    let sub = _mm256_fmadd_ps(
        _mm256_castsi256_ps(a),
        _mm256_set1_ps(512.0),
        _mm256_set1_ps(8_388_608.0),
    );
    let sub = _mm256_and_si256(_mm256_castps_si256(sub), _mm256_set1_epi32(0x7F_FFFF));
    // a < 2^-6, as a signed compare (a < 2^31)
    let small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C80_0000), a);
    _mm256_blendv_epi8(normal, sub, small)
}
