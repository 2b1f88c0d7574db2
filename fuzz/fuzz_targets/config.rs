//! Fuzz target: any UTF-8 text as a config file. Parsing and validation may refuse it, but must
//! not panic; a config that validates must also render its redacted form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|text: &str| {
    if let Ok(config) = pgferry::config::Config::from_str_at(text, Path::new("/fuzz/pgferry.toml"))
    {
        let _ = config.redacted_toml();
    }
});
