//! Locating the Python interpreter that carries the pinned PyTorch, for the tools that
//! compare Tessera against PyTorch and Hugging Face `transformers`.

use std::path::PathBuf;

/// `$TESSERA_PYTHON`, else a `.venv/bin/python` in the working directory, the
/// executable's directory or any of their ancestors, else `python3`.
pub fn find() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_PYTHON") {
        return p.into();
    }
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let candidate = dir.join(".venv/bin/python");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    PathBuf::from("python3")
}
