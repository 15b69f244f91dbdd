//! With the `torch` feature, torch-sys reports where libtorch's shared libraries are
//! (`DEP_TCH_LIBTORCH_LIB`); record that directory as an rpath in kolo's binaries, examples
//! and tests so they run without LD_LIBRARY_PATH. Without the feature this does nothing.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let unix = std::env::var("CARGO_CFG_UNIX").is_ok();
    if let (true, Ok(dir)) = (unix, std::env::var("DEP_TCH_LIBTORCH_LIB")) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
