//! Fuzz target: any bytes as a manifest object. A manifest that parses must survive a round
//! trip through `to_json` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgferry::storage::manifest::Manifest;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(manifest) = Manifest::from_json("fuzz/manifest.json", bytes) {
        let _ = manifest.ratio();
        let again = Manifest::from_json("fuzz/again.json", &manifest.to_json())
            .expect("a manifest we wrote parses again");
        assert_eq!(again, manifest, "manifest round trip");
    }
});
