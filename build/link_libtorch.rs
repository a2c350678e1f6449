//! Build script shared by every crate whose tests or binaries link libtorch.
//!
//! `torch-sys` finds libtorch (with `LIBTORCH_USE_PYTORCH=1`, inside the project's
//! virtual environment) and publishes its library directory as `DEP_TCH_LIBTORCH_LIB`.
//! We bake that directory into the binaries' run path so `tessera` and the test
//! executables start without `LD_LIBRARY_PATH`. Where the wheel carries CUDA we also
//! force `libtorch_cuda` to load: nothing references its symbols directly, and without
//! it the CUDA backend never registers.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if std::path::Path::new(&lib_dir)
        .join("libtorch_cuda.so")
        .exists()
    {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
