//! CPU level detection: one [`Cpu`] per process, detected on first use and capped by the environment.
//!
//! The cap is read once from `LATTE_SIMD` (`portable`, `avx2`, `avx512`, `amx`, or `native` for no cap). The
//! older switch `LATTE_NO_AVX512=1` (any value but empty or `0`) is an alias of `LATTE_SIMD=avx2`; when both
//! are set the lower cap wins. An unknown `LATTE_SIMD` value is reported once on standard error and ignored.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// A SIMD level, ordered from the narrowest: every level implies the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust (what the compiler vectorises for the baseline target).
    Portable,
    /// AVX2 with FMA (x86-64 v3).
    Avx2,
    /// AVX-512 F and BW (and whatever of BF16 / VNNI the CPU has, see [`Cpu`]).
    Avx512,
    /// AVX-512 plus the AMX tile unit with BF16 and INT8 (Intel Xeon, Sapphire Rapids and later).
    Amx,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 4] = [Level::Portable, Level::Avx2, Level::Avx512, Level::Amx];

    /// The name used by `LATTE_SIMD`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown level name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLevel(pub String);

impl fmt::Display for UnknownLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown SIMD level {:?}: expected portable, avx2, avx512, amx or native",
            self.0
        )
    }
}

impl std::error::Error for UnknownLevel {}

impl FromStr for Level {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Ok(Level::Portable),
            "avx2" => Ok(Level::Avx2),
            "avx512" | "avx-512" => Ok(Level::Avx512),
            "amx" | "native" => Ok(Level::Amx),
            _ => Err(UnknownLevel(s.to_string())),
        }
    }
}

/// What this process may use: the detected features, capped by the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// The widest usable level.
    pub level: Level,
    /// AVX-512 BF16 (`vdpbf16ps`); false below [`Level::Avx512`].
    pub avx512_bf16: bool,
    /// AVX-512 VNNI (`vpdpbusd`); false below [`Level::Avx512`].
    pub avx512_vnni: bool,
    /// AMX INT8 (`tdpbssd` / `tdpbusd`); false below [`Level::Amx`].
    pub amx_int8: bool,
}

impl Cpu {
    /// Detects the features of this CPU, capped at `cap`.
    pub fn detect(cap: Level) -> Cpu {
        let found = Self::detect_uncapped().capped(cap);
        if found.level == Level::Amx && !amx_permission() {
            // The tile instructions would fault without the tile state: stay at AVX-512.
            return found.capped(Level::Avx512);
        }
        found
    }

    /// This CPU as it is, ignoring the environment.
    pub fn detect_uncapped() -> Cpu {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx512 = has!("avx512f") && has!("avx512bw");
            let (amx_tile, amx_bf16, amx_int8) = amx_cpuid();
            let amx = avx512 && amx_tile && amx_bf16;
            let level = if amx {
                Level::Amx
            } else if avx512 {
                Level::Avx512
            } else if has!("avx2") && has!("fma") {
                Level::Avx2
            } else {
                Level::Portable
            };
            Cpu {
                level,
                avx512_bf16: avx512 && has!("avx512bf16"),
                avx512_vnni: avx512 && has!("avx512vnni"),
                amx_int8: amx && amx_int8,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Cpu {
                level: Level::Portable,
                avx512_bf16: false,
                avx512_vnni: false,
                amx_int8: false,
            }
        }
    }

    /// The same CPU with everything above `cap` switched off.
    pub fn capped(self, cap: Level) -> Cpu {
        let level = self.level.min(cap);
        Cpu {
            level,
            avx512_bf16: self.avx512_bf16 && level >= Level::Avx512,
            avx512_vnni: self.avx512_vnni && level >= Level::Avx512,
            amx_int8: self.amx_int8 && level >= Level::Amx,
        }
    }

    /// Whether the AVX-512 kernels may run.
    pub fn avx512(&self) -> bool {
        self.level >= Level::Avx512
    }

    /// Whether the AVX2 + FMA kernels may run.
    pub fn avx2(&self) -> bool {
        self.level >= Level::Avx2
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level.name())?;
        for (on, name) in [
            (self.avx512_bf16, "avx512_bf16"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.amx_int8, "amx_int8"),
        ] {
            if on {
                write!(f, "+{name}")?;
            }
        }
        Ok(())
    }
}

/// AMX as CPUID reports it (leaf 7, EDX bits 22 BF16, 24 TILE, 25 INT8) and only when the OS saves the
/// tile state (XCR0 bits 17 and 18). The standard library's feature macro does not know AMX on stable Rust.
/// Linux still wants the tile data requested per process: [`Cpu::detect`] asks ([`amx_permission`]) and
/// stays at AVX-512 when it is refused.
#[cfg(target_arch = "x86_64")]
fn amx_cpuid() -> (bool, bool, bool) {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 || !std::arch::is_x86_feature_detected!("xsave") {
        return (false, false, false);
    }
    let edx = __cpuid_count(7, 0).edx;
    let bit = |n: u32| edx & (1 << n) != 0;
    // OSXSAVE (CPUID 1, ECX bit 27) makes xgetbv legal.
    if __cpuid(1).ecx & (1 << 27) == 0 {
        return (false, false, false);
    }
    // SAFETY: xgetbv(0) is defined when OSXSAVE is set, checked just above; it reads XCR0 only.
    let xcr0 = unsafe { xgetbv0() };
    let os_tiles = xcr0 & (0b11 << 17) == (0b11 << 17);
    (
        os_tiles && bit(24),
        os_tiles && bit(22),
        os_tiles && bit(25),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// Asks Linux once per process for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`), without which the first tile instruction raises SIGILL; the answer is cached.
/// False where the kernel refuses, predates the request (Linux < 5.16), or on other systems.
pub fn amx_permission() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(request_amx)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integer arguments and touches no memory of
    // ours; it only extends the set of register state this process may use.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx() -> bool {
    false
}

/// The cap the environment sets: `LATTE_SIMD`, and `LATTE_NO_AVX512` as an alias of `avx2`.
pub fn env_cap() -> Level {
    cap_from(
        std::env::var("LATTE_SIMD").ok().as_deref(),
        std::env::var("LATTE_NO_AVX512").ok().as_deref(),
    )
}

fn cap_from(simd: Option<&str>, no_avx512: Option<&str>) -> Level {
    let mut cap = match simd.filter(|s| !s.trim().is_empty()) {
        None => Level::Amx,
        Some(s) => match s.parse::<Level>() {
            Ok(level) => level,
            Err(e) => {
                eprintln!("latte: LATTE_SIMD ignored: {e}");
                Level::Amx
            }
        },
    };
    if no_avx512.is_some_and(|v| !v.is_empty() && v != "0") {
        cap = cap.min(Level::Avx2);
    }
    cap
}

/// The CPU this process uses, detected once (see the module documentation for the cap).
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(|| Cpu::detect(env_cap()))
}

/// Shorthand for `cpu().level`.
pub fn level() -> Level {
    cpu().level
}

/// The levels this machine can run, narrowest first, up to and including the detected one (for tests that
/// run a kernel at every level).
pub fn levels_here() -> Vec<Level> {
    let top = cpu().level;
    Level::ALL.into_iter().filter(|l| *l <= top).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parse() {
        assert!(
            Level::Portable < Level::Avx2
                && Level::Avx2 < Level::Avx512
                && Level::Avx512 < Level::Amx
        );
        for l in Level::ALL {
            assert_eq!(l.name().parse::<Level>(), Ok(l));
        }
        assert_eq!("AVX2".parse::<Level>(), Ok(Level::Avx2));
        assert!("sse9".parse::<Level>().is_err());
    }

    #[test]
    fn environment_caps() {
        assert_eq!(cap_from(None, None), Level::Amx);
        assert_eq!(cap_from(Some("portable"), None), Level::Portable);
        assert_eq!(cap_from(Some("avx512"), None), Level::Avx512);
        assert_eq!(cap_from(None, Some("1")), Level::Avx2);
        assert_eq!(cap_from(None, Some("0")), Level::Amx);
        assert_eq!(cap_from(None, Some("")), Level::Amx);
        assert_eq!(cap_from(Some("portable"), Some("1")), Level::Portable);
        assert_eq!(cap_from(Some("avx512"), Some("1")), Level::Avx2);
        assert_eq!(cap_from(Some("bogus"), None), Level::Amx);
    }

    #[test]
    fn capping_switches_off_extensions() {
        let full = Cpu {
            level: Level::Amx,
            avx512_bf16: true,
            avx512_vnni: true,
            amx_int8: true,
        };
        let c = full.capped(Level::Avx512);
        assert_eq!(c.level, Level::Avx512);
        assert!(c.avx512_bf16 && c.avx512_vnni && !c.amx_int8);
        let c = full.capped(Level::Avx2);
        assert!(!c.avx512_bf16 && !c.avx512_vnni && !c.amx_int8 && c.avx2() && !c.avx512());
        assert_eq!(full.capped(Level::Portable).level, Level::Portable);
    }

    #[test]
    fn detection_respects_the_process_cap() {
        let here = cpu();
        assert!(here.level <= Cpu::detect_uncapped().level);
        assert!(here.level <= env_cap());
        assert_eq!(levels_here().last().copied(), Some(here.level));
        eprintln!("kernel level in this process: {here}");
    }
}
