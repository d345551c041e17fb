//! The dropout generator: a seed set by [`with_dropout`] for a forward pass, and one key per dropout site
//! in the order the sites run, so a pass can be replayed with the same masks.

thread_local! {
    static DROPOUT: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with dropout switched on (for [`Mode::Train`](crate::Mode) forward passes on this thread),
/// masks drawn deterministically from `seed`: the same seed and the same sequence of ops give the same
/// masks, which is what gradient caching needs to replay a forward pass. `None` runs `f` with dropout off.
pub fn with_dropout<R>(seed: Option<u64>, f: impl FnOnce() -> R) -> R {
    let prev = DROPOUT.with(|d| d.replace(seed.map(|s| (s, 0))));
    let out = f();
    DROPOUT.with(|d| d.set(prev));
    out
}

/// The seed of the enclosing [`with_dropout`], if dropout is on.
pub fn dropout_seed() -> Option<u64> {
    DROPOUT.with(|d| d.get().map(|(s, _)| s))
}

/// SplitMix64's mixing step (the first draw of [`latte_kernels::random`]'s stream `z`).
pub(crate) fn splitmix(z: u64) -> u64 {
    latte_kernels::random::draw(z, 0)
}

/// The dropout mask of sub-stream `index` (a row, a chunk) of dropout site `key`: `out[e]` is 0 or `keep`,
/// drawn from the sub-stream's own key, the same on every call.
pub(crate) fn mask(key: u64, index: u64, threshold: u64, keep: f32, out: &mut [f32]) {
    let stream = splitmix(key ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    latte_kernels::random::dropout_mask(stream, threshold, keep, out);
}

/// The key of the next dropout site of the enclosing [`with_dropout`] (advancing its counter), or `None`
/// when dropout is off.
pub(crate) fn next_dropout_key() -> Option<u64> {
    DROPOUT.with(|d| {
        let (seed, counter) = d.get()?;
        d.set(Some((seed, counter + 1)));
        Some(splitmix(seed ^ splitmix(counter)))
    })
}
