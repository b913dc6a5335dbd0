//! What the fuzz targets share: the shipped example configs, compiled.

use std::sync::OnceLock;

use tally::topology::Topology;

/// Every config in `examples/`, compiled once: their sources, metrics and every aggregate
/// kind are what the targets decode and fold against.
pub fn examples() -> &'static [Topology] {
    static TOPOS: OnceLock<Vec<Topology>> = OnceLock::new();
    TOPOS.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut files: Vec<_> = std::fs::read_dir(dir).expect("examples/").filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| {
                let text = std::fs::read_to_string(p).expect("example config");
                Topology::compile(&tally::config::Config::from_toml_str(&text).expect("example parses")).expect("example compiles")
            })
            .collect()
    })
}
