//! Builds nothing of its own: it exists so that `cargo test --workspace` (which compiles every example)
//! also compiles this package's library, and with it the Python extension module
//! `target/debug/deps/lib_latte.so`, with the same dependency features as the rest of the workspace. `.ci/run`
//! copies that file into a staging copy of `python/latte/` and runs the Python tests on it, so CI compiles
//! the dependencies once. (`pip install .` and `maturin develop` build the module the usual way.)

fn main() {
    println!("the extension module is target/<profile>/deps/lib_latte.so; see README.md (Python) to install it");
}
