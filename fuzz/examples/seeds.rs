//! Writes each fuzz target's seed inputs (`godwit_fuzz::seeds`) to `fuzz/seeds/<target>/`.
//!
//! Run from `fuzz/`: `cargo run --example seeds`.

use std::fs;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, seeds) in godwit_fuzz::seeds::all() {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        for (name, bytes) in seeds {
            let path = dir.join(name);
            fs::write(&path, &bytes)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            println!("{} ({} bytes)", path.display(), bytes.len());
        }
    }
}
