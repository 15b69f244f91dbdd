//! With the `torch` feature, torch-sys reports where libtorch's shared libraries are
//! (`DEP_TCH_LIBTORCH_LIB`); record that directory as an rpath in kolo's binaries, examples
//! and tests so they run without LD_LIBRARY_PATH. Without the feature this does nothing.
//!
//! When that libtorch has CUDA (`libtorch_cuda.so`, as the PyPI wheel does), link it even
//! though no symbol of it is used: its static initializers register the CUDA backend, and
//! without them `tch::Cuda::is_available()` is false on a GPU machine (the linker drops a
//! library nothing refers to; tch-rs issues #907 and #980).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let unix = std::env::var("CARGO_CFG_UNIX").is_ok();
    if let (true, Ok(dir)) = (unix, std::env::var("DEP_TCH_LIBTORCH_LIB")) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
        if linux && std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{dir},-ltorch_cuda,--as-needed");
        }
    }
}
