//! Compiles `cpp/ext.cpp` against the libtorch headers of the libtorch torch-sys links: found from
//! `DEP_TCH_LIBTORCH_LIB` (torch-sys' `links = "tch"` metadata), whose `../include` holds them in
//! both a libtorch download and a PyTorch wheel (`torch/lib`, `torch/include`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=cpp/ext.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        std::env::var_os("DEP_TCH_LIBTORCH_LIB")
            .expect("DEP_TCH_LIBTORCH_LIB is not set: torch-sys must be a direct dependency"),
    );
    let include = lib
        .parent()
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("ATen").is_dir())
        .unwrap_or_else(|| panic!("no libtorch headers beside {}", lib.display()));
    // torch-sys' own default; PyTorch wheels have used the C++11 ABI since 2.7.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .file("cpp/ext.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("autopipe_torch_ext");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}
