//! Dropout masks from a keyed counter-based generator: element `i` of a stream depends only on the stream's
//! key and `i`, so a mask can be drawn in any order, on any thread, again in the backward pass, and the
//! draws vectorise (no draw waits for the previous one).

/// SplitMix64's increment (2⁶⁴ / φ).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function of one state.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th 64-bit draw of stream `key`: SplitMix64 started at `key` (its state after `i + 1` steps).
#[inline(always)]
pub fn draw(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// An inverted-dropout mask: `out[e]` is 0 where the 32-bit draw of element `e` is below `threshold`
/// (`p · 2³²` for a drop probability `p`), `keep` (`1 / (1 − p)`) elsewhere. Elements `2i` and `2i + 1`
/// take the low and the high half of [`draw`]`(key, i)`. The same on every CPU level.
pub fn dropout_mask(key: u64, threshold: u64, keep: f32, out: &mut [f32]) {
    dropout_mask_widest(key, threshold, keep, out)
}

widest!(dropout_mask_widest = dropout_mask_body(key: u64, threshold: u64, keep: f32, out: &mut [f32]));

#[inline(always)]
fn dropout_mask_body(key: u64, threshold: u64, keep: f32, out: &mut [f32]) {
    let mut pairs = out.chunks_exact_mut(2);
    for (i, pair) in (&mut pairs).enumerate() {
        let r = draw(key, i as u64);
        pair[0] = if (r & 0xFFFF_FFFF) >= threshold {
            keep
        } else {
            0.0
        };
        pair[1] = if (r >> 32) >= threshold { keep } else { 0.0 };
    }
    let n = out.len();
    if n % 2 == 1 {
        let r = draw(key, (n / 2) as u64);
        out[n - 1] = if (r & 0xFFFF_FFFF) >= threshold {
            keep
        } else {
            0.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: SplitMix64 stepped one state at a time.
    fn stepped(key: u64, n: usize, threshold: u64, keep: f32) -> Vec<f32> {
        let mut state = key;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            state = state.wrapping_add(GAMMA);
            let r = mix(state);
            for half in [r & 0xFFFF_FFFF, r >> 32] {
                if out.len() < n {
                    out.push(if half >= threshold { keep } else { 0.0 });
                }
            }
        }
        out
    }

    #[test]
    fn masks_follow_the_stepped_generator_at_every_length() {
        for (n, key) in [
            (0, 1u64),
            (1, 2),
            (2, 3),
            (7, 4),
            (64, 5),
            (385, 6),
            (1001, u64::MAX),
        ] {
            let threshold = (0.1 * (1u64 << 32) as f64) as u64;
            let mut got = vec![9f32; n];
            dropout_mask(key, threshold, 1.0 / 0.9, &mut got);
            assert_eq!(got, stepped(key, n, threshold, 1.0 / 0.9), "n = {n}");
        }
    }

    #[test]
    fn masks_drop_the_asked_share() {
        let mut m = vec![0f32; 200_000];
        let threshold = (0.25 * (1u64 << 32) as f64) as u64;
        dropout_mask(42, threshold, 4.0 / 3.0, &mut m);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.25).abs() < 0.005, "dropped share {dropped}");
        assert!(m.iter().all(|&v| v == 0.0 || v == 4.0 / 3.0));
        // Another key gives another mask.
        let mut other = vec![0f32; 200_000];
        dropout_mask(43, threshold, 4.0 / 3.0, &mut other);
        assert_ne!(m, other);
    }
}
