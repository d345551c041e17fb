//! Hot loops of the approximate search passes, compiled twice: portable, and with AVX2 + FMA selected at run
//! time (the default x86-64 target has only SSE2).

/// Query tokens processed together (fixed width, so the loops vectorise).
pub(crate) const LANES: usize = 32;

/// A centroid code as stored (u16 or u32).
pub(crate) trait Code: Copy + Send + Sync {
    fn idx(self) -> usize;
}
impl Code for u16 {
    #[inline(always)]
    fn idx(self) -> usize {
        self as usize
    }
}
impl Code for u32 {
    #[inline(always)]
    fn idx(self) -> usize {
        self as usize
    }
}

macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<C: Code>($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub(crate) fn $name<C: Code>($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic<C: Code>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<C: Code>($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the enabled features (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

multiversion! {
    /// Centroid-interaction score of one document: `Σ_j max_t sp[code_t][j]`, skipping tokens whose centroid
    /// scores below `threshold` for every query token (`cmax[c] < threshold`). `sp` is the padded centroid-score
    /// matrix, `groups` blocks of `LANES` per centroid.
    fn bag_score<C: Code>(codes: &[C], sp: &[f32], groups: usize, cmax: &[f32], threshold: f32) -> f32 {
        let mut total = 0f32;
        for g in 0..groups {
            let mut acc = [0f32; LANES];
            for &c in codes {
                let c = c.idx();
                if cmax[c] >= threshold {
                    let row: &[f32; LANES] = sp[(c * groups + g) * LANES..][..LANES].try_into().expect("lanes");
                    for i in 0..LANES {
                        acc[i] = acc[i].max(row[i]);
                    }
                }
            }
            total += acc.iter().sum::<f32>();
        }
        total
    }
}

multiversion! {
    /// Residual-aware score of one document: `Σ_j max_t (sp[code_t][j] + Σ_p table[p][byte_tp][j])`, where
    /// `tables[g]` is the per-query lookup table of group `g` (rows `LANES` wide) and `res` holds `bpt` packed
    /// bytes per token.
    fn residual_score<C: Code>(
        codes: &[C],
        res: &[u8],
        bpt: usize,
        sp: &[f32],
        groups: usize,
        tables: &[Vec<f32>],
        lq: usize,
    ) -> f32 {
        let mut total = 0f32;
        for (g, table) in tables.iter().enumerate() {
            let mut acc = [f32::NEG_INFINITY; LANES];
            for (t, &c) in codes.iter().enumerate() {
                let mut v: [f32; LANES] = sp[(c.idx() * groups + g) * LANES..][..LANES].try_into().expect("lanes");
                for (p, &b) in res[t * bpt..(t + 1) * bpt].iter().enumerate() {
                    let row: &[f32; LANES] =
                        table[(p * 256 + b as usize) * LANES..][..LANES].try_into().expect("lanes");
                    for i in 0..LANES {
                        v[i] += row[i];
                    }
                }
                for i in 0..LANES {
                    acc[i] = acc[i].max(v[i]);
                }
            }
            let rows = (lq - g * LANES).min(LANES);
            total += acc[..rows].iter().sum::<f32>();
        }
        total
    }
}
