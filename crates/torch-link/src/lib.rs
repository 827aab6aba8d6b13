//! Build-script helper for the binaries that run libtorch on a device (`autopipe-store`,
//! `autopipe`, the bench).
//!
//! torch-sys asks for `-ltorch_cuda`, but nothing in autopipe calls into libtorch_cuda directly,
//! so the linker's default `--as-needed` drops it from the binary's `DT_NEEDED`. libtorch then
//! never loads its CUDA backend and `--device cuda` finds no GPU even on a GPU machine. Linking it
//! with `--no-as-needed` keeps it, when (and only when) the libtorch being built against has it.

use std::path::PathBuf;

/// The libtorch `lib/` folder torch-sys built against: `DEP_TCH_LIBTORCH_LIB`, which cargo gives
/// the build script of a package that depends on `torch-sys` directly (its `links = "tch"`).
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from)
}

/// Call from `build.rs`: links the binaries with libtorch_cuda kept in `DT_NEEDED` when
/// `libtorch_cuda.so` is in libtorch's folder; a CPU-only libtorch changes nothing.
pub fn link_cuda_if_present() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(dir) = libtorch_lib_dir() else {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: depend on torch-sys directly to link libtorch_cuda"
        );
        return;
    };
    if dir.join("libtorch_cuda.so").is_file() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    }
}
