//! AMX kernels (Intel Sapphire Rapids and later): one 32 × 32 output block as 2 × 2 accumulator tiles of
//! 16 × 16, two A tiles (16 rows each) and two B tiles (16 columns each) reloaded per k step and reused
//! across the four products, k streamed 32 bf16 / 64 int8 at a time.
//!
//! The AMX intrinsics are unstable in Rust, so each kernel is one `asm!` block: configure the tiles, zero
//! the accumulators, loop over k, store, release. Tile registers are never touched by compiled code, and
//! every block leaves them released. Only called at [`Level::Amx`], which [`crate::cpu()`] reports only
//! when the CPU has AMX and Linux granted this process the tile state (see [`crate::cpu::amx_permission`]).
//!
//! Untested on hardware so far (written on a Zen 4); the tests run it wherever the CPU has AMX. Before the
//! first use each kernel checks itself once per process against the portable kernel ([`bf16_ok`],
//! [`i8_ok`]) and, should they disagree, the level falls back to AVX-512 with one line on stderr.

use std::sync::OnceLock;

use super::{BLOCK, PANEL};
#[cfg(target_arch = "x86_64")]
use crate::cpu::{cpu, Level};

/// A tile configuration (palette 1): every tile used here is 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn all_16x64() -> TileConfig {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg[48 + t] = 16;
        }
        TileConfig(cfg)
    }
}

/// `acc` (32 × 32, row-major) = the bf16 products of the 32 rows of `a` (row stride `kp`) with panels `p0`
/// and `p1` (`kp / 2` rows of 16 pairs each).
pub(crate) fn block_bf16(a: &[u16], kp: usize, p0: &[u16], p1: &[u16], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu().level >= Level::Amx && kp.is_multiple_of(32) && kp > 0);
        assert!(a.len() >= BLOCK * kp && p0.len() >= kp * PANEL && p1.len() >= kp * PANEL);
        assert!(acc.len() >= BLOCK * BLOCK);
        let cfg = TileConfig::all_16x64();
        let stride_a = kp * 2;
        // SAFETY: AMX-BF16 is present and Linux granted the tile state (`Level::Amx`, asserted). The loop
        // runs kp / 32 times; step s loads A rows 0..16 and 16..32 at bytes 64 s .. 64 s + 64 of rows of
        // `kp * 2` bytes (inside `a`, asserted) and B rows 16 s .. 16 s + 16 of 64 bytes of each panel
        // (inside `p0` / `p1`, asserted); the stores write 32 rows of 128 bytes, all of `acc` (asserted).
        // tmm0-7 are not visible to the compiler; the block configures them first and releases them last.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c} + {sc}*1 + 2048], tmm2",
                "tilestored [{c} + {sc}*1 + 2112], tmm3",
                "tilerelease",
                cfg = in(reg) cfg.0.as_ptr(),
                a0 = inout(reg) a.as_ptr() => _,
                a1 = inout(reg) a.as_ptr().add(16 * kp) => _,
                b0 = inout(reg) p0.as_ptr() => _,
                b1 = inout(reg) p1.as_ptr() => _,
                steps = inout(reg) kp / 32 => _,
                sa = in(reg) stride_a,
                sb = in(reg) 64usize,
                c = in(reg) acc.as_mut_ptr(),
                sc = in(reg) BLOCK * 4,
                options(nostack),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, kp, p0, p1, acc);
        unreachable!("the AMX level exists on x86-64 only");
    }
}

/// `acc` (32 × 32, row-major) = the signed int8 products (`tdpbssd`) of the 32 rows of `a` (row stride
/// `kp` bytes) with panels `p0` and `p1` (`kp / 4` rows of 16 groups of 4 bytes each).
pub(crate) fn block_i8(a: &[u8], kp: usize, p0: &[i8], p1: &[i8], acc: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu().amx_int8 && kp.is_multiple_of(64) && kp > 0);
        assert!(a.len() >= BLOCK * kp && p0.len() >= kp * PANEL && p1.len() >= kp * PANEL);
        assert!(acc.len() >= BLOCK * BLOCK);
        let cfg = TileConfig::all_16x64();
        // SAFETY: AMX-INT8 is present and Linux granted the tile state (`amx_int8` holds only at
        // `Level::Amx`, asserted). The loop runs kp / 64 times; step s loads A rows 0..16 and 16..32 at bytes
        // 64 s .. 64 s + 64 of rows of `kp` bytes (inside `a`, asserted) and B rows 16 s .. 16 s + 16 of 64
        // bytes of each panel (inside `p0` / `p1`, asserted); the stores write 32 rows of 128 bytes, all of
        // `acc` (asserted). The block configures tmm0-7 first and releases them last.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tdpbssd tmm1, tmm4, tmm7",
                "tdpbssd tmm2, tmm5, tmm6",
                "tdpbssd tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c} + {sc}*1 + 2048], tmm2",
                "tilestored [{c} + {sc}*1 + 2112], tmm3",
                "tilerelease",
                cfg = in(reg) cfg.0.as_ptr(),
                a0 = inout(reg) a.as_ptr() => _,
                a1 = inout(reg) a.as_ptr().add(16 * kp) => _,
                b0 = inout(reg) p0.as_ptr() => _,
                b1 = inout(reg) p1.as_ptr() => _,
                steps = inout(reg) kp / 64 => _,
                sa = in(reg) kp,
                sb = in(reg) 64usize,
                c = in(reg) acc.as_mut_ptr(),
                sc = in(reg) BLOCK * 4,
                options(nostack),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, kp, p0, p1, acc);
        unreachable!("the AMX level exists on x86-64 only");
    }
}

/// Whether [`block_bf16`] gives the portable kernel's sums on this CPU (asked only at [`Level::Amx`]):
/// checked once per process on one block of small integers, whose products and sums are exact in f32 in
/// any order, so the two must agree bit for bit.
pub(crate) fn bf16_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let kp = 64;
        // bf16 of a small integer is the upper half of its f32.
        let small = |i: usize, salt: usize| {
            let v = ((i * 7 + salt) % 5) as f32 - 2.0;
            (v.to_bits() >> 16) as u16
        };
        let a: Vec<u16> = (0..BLOCK * kp).map(|i| small(i, 3)).collect();
        let p0: Vec<u16> = (0..kp * PANEL).map(|i| small(i, 1)).collect();
        let p1: Vec<u16> = (0..kp * PANEL).map(|i| small(i, 4)).collect();
        let (mut want, mut got) = (vec![0f32; BLOCK * BLOCK], vec![f32::NAN; BLOCK * BLOCK]);
        super::bf16::portable_block(&a, kp, BLOCK, &p0, &p1, &mut want);
        block_bf16(&a, kp, &p0, &p1, &mut got);
        verdict("bf16", got == want)
    })
}

/// Whether [`block_i8`] gives the portable kernel's sums on this CPU (asked only where AMX-INT8 is
/// usable): checked once per process on one block; integer sums are exact, so they must be equal.
pub(crate) fn i8_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let kp = 128;
        let small = |i: usize, salt: usize| ((i * 7 + salt) % 7) as i8 - 3;
        let a: Vec<u8> = (0..BLOCK * kp).map(|i| small(i, 2) as u8).collect();
        let p0: Vec<i8> = (0..kp * PANEL).map(|i| small(i, 5)).collect();
        let p1: Vec<i8> = (0..kp * PANEL).map(|i| small(i, 1)).collect();
        let (mut want, mut got) = (vec![0i32; BLOCK * BLOCK], vec![i32::MIN; BLOCK * BLOCK]);
        super::int8::portable_block(&a, kp, BLOCK, &p0, &p1, &mut want);
        block_i8(&a, kp, &p0, &p1, &mut got);
        verdict("int8", got == want)
    })
}

fn verdict(what: &str, agree: bool) -> bool {
    if !agree {
        eprintln!(
            "latte: the AMX {what} kernel disagreed with the portable kernel on this CPU; \
             using the AVX-512 level for {what}"
        );
    }
    agree
}
