//! With the `torch` feature, torch-sys reports where libtorch's shared libraries are
//! (`DEP_TCH_LIBTORCH_LIB`); record that directory as an rpath in kolo's binaries, examples
//! and tests so they run without LD_LIBRARY_PATH, and compile the autograd-hook shim
//! (src/torch/hooks.cpp) against the headers next to it. Without the feature this does
//! nothing.
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
    #[cfg(feature = "torch")]
    hooks::build();
}

#[cfg(feature = "torch")]
mod hooks {
    use std::path::PathBuf;

    /// Compile src/torch/hooks.cpp as torch-sys compiles its own C++: C++17, position
    /// independent, the libtorch headers (`<torch>/include` and its C++ API directory; the
    /// library directory torch-sys reports is `<torch>/lib`) and the C++11-ABI setting
    /// libtorch was built with.
    pub fn build() {
        println!("cargo:rerun-if-changed=src/torch/hooks.cpp");
        println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
        println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
        let lib = PathBuf::from(
            std::env::var("DEP_TCH_LIBTORCH_LIB")
                .expect("torch-sys reports DEP_TCH_LIBTORCH_LIB with the torch feature"),
        );
        let include = lib.parent().unwrap_or(&lib).join("include");
        cc::Build::new()
            .cpp(true)
            .pic(true)
            .std("c++17")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi().as_str())
            .define("GLOG_USE_GLOG_EXPORT", None)
            // libtorch's headers warn about themselves.
            .warnings(false)
            .file("src/torch/hooks.cpp")
            .compile("kolo_torch_hooks");
    }

    /// `LIBTORCH_CXX11_ABI` when set; else, for the Python wheel (`LIBTORCH_USE_PYTORCH`),
    /// what `torch._C._GLIBCXX_USE_CXX11_ABI` says, as torch-sys asks it; else 1 (the
    /// default torch-sys assumes too).
    fn cxx11_abi() -> String {
        if let Ok(v) = std::env::var("LIBTORCH_CXX11_ABI") {
            return v;
        }
        if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
                ])
                .output()
                .expect("run python3 to ask torch for its C++11 ABI setting");
            let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(
                out.status.success() && (v == "0" || v == "1"),
                "python3 could not tell torch's C++11 ABI setting: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return v;
        }
        "1".into()
    }
}
