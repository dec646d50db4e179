//! Fingerprints the code that decides what keygen produces (this crate's sources and the patched
//! halo2_proofs), so that proving keys cached on disk by an older build are never used by a
//! newer one whose circuit may differ for the same spec (see `Keys::load_or_create`).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let roots = [
        manifest.join("src"),
        manifest.join("../../vendor/halo2_proofs/src"),
    ];
    let mut hash = Sha256::new();
    for root in &roots {
        println!("cargo:rerun-if-changed={}", root.display());
        let mut all = Vec::new();
        files(root, &mut all);
        all.sort();
        for path in all {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            hash.update(rel.to_string_lossy().as_bytes());
            hash.update([0]);
            hash.update(std::fs::read(&path).unwrap_or_default());
            hash.update([0]);
        }
    }
    let digest: [u8; 32] = hash.finalize().into();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    println!("cargo:rustc-env=MODELHUB_ZK_CODE_HASH={hex}");
}
